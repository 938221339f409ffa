from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from exporter.config import (
    DEFAULTS,
    FLAGS,
    Config,
    ConfigError,
    NodeTaint,
    parse_config,
)
from exporter.devices import DeviceSelector, DeviceSelectorError, parse_device_selector
from exporter.flags import ListenAddress, parse_address
from exporter.model import Gpu, MigDevice

ROOT = Path(__file__).resolve().parents[2]


def test_one_declaration_per_flag() -> None:
    assert [f.dest for f in FLAGS] == [f.name for f in fields(Config)]
    for flag in FLAGS:
        assert getattr(DEFAULTS, flag.dest) == flag.value(flag.default), flag.dest
        assert getattr(Config, flag.dest) == getattr(DEFAULTS, flag.dest), flag.dest


def test_defaults_match_dcgm_exporter_where_users_expect_them() -> None:
    cfg = parse_config([], environ={})
    assert cfg == DEFAULTS
    assert cfg.address == ListenAddress("", 9400) and str(cfg.address) == ":9400"
    assert cfg.devices == DeviceSelector("f") and str(cfg.devices) == "f"
    assert cfg.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert cfg.xid_count_window_s == 300.0
    assert cfg.collect_interval_s == 5.0 and cfg.device_timeout_s == 2.0
    assert cfg.host_label == "Hostname"
    assert cfg.state_dir == Path("/var/lib/gpu-health-exporter")


def test_other_modules_take_their_defaults_from_the_declaration() -> None:
    from exporter.deviceplugin.config import DevicePluginConfig
    from exporter.health.cli import DEFAULT_STATE_DIR
    from exporter.health.policy import Policy
    from exporter.pods.mapper import PodMappingConfig

    plugin = DevicePluginConfig()
    assert (plugin.resource_name, plugin.plugin_dir, plugin.mig_strategy, plugin.replicas) == (
        DEFAULTS.resource_name,
        DEFAULTS.device_plugin_dir,
        DEFAULTS.mig_strategy,
        DEFAULTS.replicas,
    )
    assert plugin.device_list_strategy == DEFAULTS.device_list_strategy
    assert str(DEFAULTS.state_dir) == DEFAULT_STATE_DIR
    policy = Policy.build()
    assert (policy.nvml_timeout_grace_s, policy.slowdown_s) == (30.0, 300.0)
    pods = PodMappingConfig()
    assert (pods.socket_path, pods.gpu_id_type, pods.shared_mode) == (
        DEFAULTS.pod_resources_socket,
        DEFAULTS.kubernetes_gpu_id_type,
        DEFAULTS.kubernetes_shared_gpus,
    )


def test_flag_beats_environment_beats_default() -> None:
    env = {"GPU_HEALTH_EXPORTER_COLLECT_INTERVAL": "2000", "GPU_HEALTH_EXPORTER_ADDRESS": "127.0.0.1:9500"}
    cfg = parse_config(["-c", "1000"], environ=env)
    assert cfg.collect_interval_s == 1.0
    assert cfg.address == ("127.0.0.1", 9500)


def test_every_flag_has_a_documented_env_var() -> None:
    envs = {f.env for f in FLAGS}
    assert len(envs) == len(FLAGS)
    assert all(e.startswith("GPU_HEALTH_EXPORTER_") for e in envs)


def test_values_parse_into_their_types() -> None:
    cfg = parse_config(
        [
            "-a", "[::1]:9401",
            "-c", "250",
            "--device-timeout", "50",
            "-d", "g:0,2-3",
            "--xid-count-window-size", "60000",
            "--hostname-label", "hostname",
            "--kubernetes-gpu-id-type", "device-name",
            "--kubernetes-shared-gpus", "first-pod",
            "--nvidia-resource-names", " example.com/gpu, ,other.io/gpu ",
            "--health-fence-xids", "13, 31",
            "--health-warn-xids", "94",
            "--health-nvml-timeout-grace", "0",
            "--health-slowdown-seconds", "60",
            "--state-dir", "/tmp/s",
            "--mig-strategy", "mixed",
            "--replicas", "4",
            "--device-list-strategy", "cdi",
            "-n",
        ],
        environ={"GPU_HEALTH_EXPORTER_KUBERNETES": "yes", "GPU_HEALTH_EXPORTER_DEVICE_PLUGIN": "0"},
    )  # fmt: skip
    assert cfg.address == ListenAddress("::1", 9401) and str(cfg.address) == "[::1]:9401"
    assert (cfg.collect_interval_s, cfg.device_timeout_s, cfg.xid_count_window_s) == (0.25, 0.05, 60.0)
    assert cfg.devices == DeviceSelector("g", frozenset({0, 2, 3})) and str(cfg.devices) == "g:0,2-3"
    assert cfg.hostname_label == "hostname" and cfg.host_label is None
    assert cfg.kubernetes_gpu_id_type == "device-name" and cfg.kubernetes_shared_gpus == "first-pod"
    assert cfg.nvidia_resource_names == ("example.com/gpu", "other.io/gpu")
    assert cfg.health_fence_xids == (13, 31) and cfg.health_warn_xids == (94,) and cfg.health_ignore_xids == ()
    assert cfg.health_nvml_timeout_grace_s == 0.0 and cfg.health_slowdown_s == 60.0
    assert isinstance(cfg.health_slowdown_s, float)
    assert cfg.state_dir == Path("/tmp/s")
    assert (cfg.mig_strategy, cfg.replicas, cfg.device_list_strategy) == ("mixed", 4, "cdi")
    assert cfg.kubernetes is True and cfg.device_plugin is False and cfg.no_hostname is True


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["-c", "abc"], {}, "--collect-interval: 'abc' is not a whole number"),
        (["-c", "5"], {}, "--collect-interval: must be at least 100"),
        (["-c", "1.5"], {}, "--collect-interval: '1.5' is not a whole number"),
        (["--device-timeout", "5"], {}, "--device-timeout: must be at least 10, got 5"),
        (["--xid-count-window-size", "999"], {}, "--xid-count-window-size: must be at least 1000, got 999"),
        (["--replicas", "0"], {}, "--replicas: must be at least 1, got 0"),
        (["--replicas", "two"], {}, "--replicas: 'two' is not a whole number"),
        (["--health-nvml-timeout-grace", "-1"], {}, "--health-nvml-timeout-grace: must be at least 0, got -1"),
        (["--health-slowdown-seconds", "x"], {}, "--health-slowdown-seconds: 'x' is not a whole number"),
        (["-a", "nonsense"], {}, "--address 'nonsense'"),
        (["-a", ":70000"], {}, "--address ':70000'"),
        (["-d", "g:1-x"], {}, "--devices 'g:1-x': '1-x' is not an id or a range like 2-4"),
        (["-d", "g:4-2"], {}, "--devices 'g:4-2': range '4-2' runs backwards"),
        (["-d", "x"], {}, "--devices 'x': expected f, g[:ids] or i[:ids]"),
        (["--log-format", "xml"], {}, "invalid choice"),
        (["--mig-strategy", "both"], {}, "invalid choice: 'both'"),
        (["--health-fence-xids", "13,x"], {}, "--health-fence-xids: 'x' is not an XID number"),
        (["--health-ignore-xids", "1.5"], {}, "--health-ignore-xids: '1.5' is not an XID number"),
        ([], {"GPU_HEALTH_EXPORTER_KUBERNETES": "maybe"}, "GPU_HEALTH_EXPORTER_KUBERNETES: 'maybe' is not a boolean"),
        ([], {"GPU_HEALTH_EXPORTER_COLLECT_INTERVAL": "ten"}, "GPU_HEALTH_EXPORTER_COLLECT_INTERVAL: 'ten' is not"),
        ([], {"GPU_HEALTH_EXPORTER_REPLICAS": "0"}, "--replicas: must be at least 1, got 0"),
        ([], {"GPU_HEALTH_EXPORTER_MIG_STRATEGY": "both"}, "MIG_STRATEGY: 'both' is not one of none, single, mixed"),
        ([], {"GPU_HEALTH_EXPORTER_HEALTH_WARN_XIDS": "a"}, "--health-warn-xids: 'a' is not an XID number"),
        ([], {"GPU_HEALTH_EXPORTER_DEVICES": "g:"}, "--devices 'g:'"),
        ([], {"GPU_HEALTH_EXPORTER_ADDRESS": "9400"}, "--address '9400'"),
        (["--kubernetes-pod-labels-allowlist", "("], {}, "--kubernetes-pod-labels-allowlist: invalid regex"),
        (["--simulate", "--nvml-library", "/x.so"], {}, "exclude each other"),
        (["--no-such-flag"], {}, "unrecognized arguments"),
        (["--health-node-taint", "gpu-broken"], {}, "--health-node-taint: 'gpu-broken' is not KEY[=VALUE]:EFFECT"),
        (["--health-node-taint", "a:Evict"], {}, "--health-node-taint: effect 'Evict' is not one of NoSchedule"),
        (["--health-node-taint", "a b:NoSchedule"], {}, "taint key 'a b' is not a qualified name"),
        (["--health-node-taint", "a=b c:NoSchedule"], {}, "taint value 'b c' is not a label value"),
        (["-d", "g:0-99999999"], {}, "--devices 'g:0-99999999': id 99999999 in '0-99999999' is past the device limit"),
        (["-d", "i:256"], {}, "is past the device limit (255)"),
        (["-c", "10000000000000"], {}, "--collect-interval: must be at most 3600000, got 10000000000000"),
        (["--device-timeout", "10000000000"], {}, "--device-timeout: must be at most 600000"),
        (["--http-max-connections", "100000000"], {}, "--http-max-connections: must be at most 65536"),
        (["--state-dir", ""], {}, "--state-dir: must not be empty"),
        ([], {"GPU_HEALTH_EXPORTER_STATE_DIR": " "}, "GPU_HEALTH_EXPORTER_STATE_DIR: must not be empty"),
        (
            ["--kubeconfig", "/nonexistent/kubeconfig", "--kubernetes-node-status"],
            {},
            "--kubeconfig '/nonexistent/kubeconfig': no such file (needed by --kubernetes-node-status)",
        ),
        (
            ["--kubeconfig", "/nonexistent/k", "-k", "--kubernetes-dra", "--dra-device-taints"],
            {},
            "no such file (needed by --kubernetes-dra, --dra-device-taints)",
        ),
        (["--dra-device-taints=Evict"], {}, "--dra-device-taints: 'Evict' is not one of off, NoSchedule, NoExecute"),
        ([], {"GPU_HEALTH_EXPORTER_DRA_DEVICE_TAINTS": "x"}, "DRA_DEVICE_TAINTS: 'x' is not one of off"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(argv, environ=env)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--replicas", "0"], "--replicas: must be at least 1, got 0"),
        (["--device-timeout", "x"], "--device-timeout: 'x' is not a whole number"),
        (["--health-fence-xids", "x"], "--health-fence-xids: 'x' is not an XID number"),
        (["-d", "q"], "--devices 'q'"),
        (["-a", "localhost"], "--address 'localhost'"),
        (["--kubernetes-shared-gpus", "all"], "--kubernetes-shared-gpus: invalid choice: 'all'"),
        (["-d", "g:0-99999999"], "past the device limit"),
        (["-c", "10000000000000"], "--collect-interval: must be at most"),
        (["--state-dir", ""], "--state-dir: must not be empty"),
        (
            ["--kubeconfig", "/nonexistent", "--health-node-taint", "a:NoSchedule"],
            "--kubeconfig '/nonexistent': no such",
        ),
    ],
)
def test_bad_values_exit_2_naming_the_flag(argv: list[str], needle: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "exporter", "--simulate", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr


def test_simulate_takes_an_optional_spec() -> None:
    assert parse_config(["--simulate"], environ={}).simulate == ""
    assert parse_config(["--simulate=gpus=2"], environ={}).simulate == "gpus=2"
    assert parse_config([], environ={}).simulate is None


def test_a_kubeconfig_only_matters_to_features_that_use_the_api_server(tmp_path: Path) -> None:
    assert parse_config(["--kubeconfig", "/nonexistent"], environ={}).kubeconfig == "/nonexistent"
    assert parse_config(["--kubeconfig", "/nonexistent", "-k"], environ={}).kubernetes  # PodResources only
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("{}")
    cfg = parse_config(["--kubeconfig", str(kubeconfig), "--kubernetes-events"], environ={})
    assert cfg.kubernetes_events


def test_scheduler_flags_parse_like_kubectl_taint() -> None:
    cfg = parse_config([], environ={})
    assert (cfg.dra_device_taints, cfg.health_node_taint, cfg.kubernetes_events) == (None, None, False)
    assert parse_config(["--dra-device-taints"], environ={}).dra_device_taints == "NoSchedule"
    assert parse_config(["--dra-device-taints=noexecute"], environ={}).dra_device_taints == "NoExecute"
    assert parse_config([], environ={"GPU_HEALTH_EXPORTER_DRA_DEVICE_TAINTS": "off"}).dra_device_taints is None
    taint = parse_config(["--health-node-taint", "example.com/gpu=broken:NoExecute"], environ={}).health_node_taint
    assert (
        taint == NodeTaint("example.com/gpu", "broken", "NoExecute")
        and str(taint) == "example.com/gpu=broken:NoExecute"
    )
    taint = parse_config(["--health-node-taint=gpu-health-exporter/unhealthy:NoSchedule"], environ={}).health_node_taint
    assert taint == NodeTaint("gpu-health-exporter/unhealthy", "", "NoSchedule")


def test_parse_address_forms() -> None:
    assert parse_address(":9400") == ("", 9400)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert str(parse_address("127.0.0.1:9400")) == "127.0.0.1:9400"
    with pytest.raises(ConfigError):
        parse_address(":70000")


def test_device_selector() -> None:
    gpu0 = Gpu(0, "GPU-a", "00000000:01:00.0", 0, "X")
    gpu3 = Gpu(3, "GPU-b", "00000000:02:00.0", 3, "X")
    mig = MigDevice("MIG-a", "GPU-a", 0, 2, 0, "1g.10gb", 0)
    f = parse_device_selector("f")
    assert f.gpu_selected(gpu0) and f.mig_selected(mig)
    g = parse_device_selector("g:0,2-3")
    assert g.gpu_selected(gpu0) and g.gpu_selected(gpu3) and not g.mig_selected(mig)
    i = parse_device_selector("i:2")
    assert not i.gpu_selected(gpu0) and i.mig_selected(mig)
    assert not parse_device_selector("i:5").mig_selected(mig)
    assert str(DeviceSelector("g", frozenset({3, 1}))) == "g:1,3"


def test_device_selector_raises_its_own_error() -> None:
    with pytest.raises(DeviceSelectorError, match="runs backwards"):
        parse_device_selector("i:3-1")
    assert not issubclass(DeviceSelectorError, ConfigError)


def test_grpc_and_kubernetes_stay_unimported_while_their_features_are_off(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from exporter.app import App\n"
        "from exporter.config import parse_config\n"
        f"app = App(parse_config(['--simulate', '--state-dir', {str(tmp_path)!r}], environ={{}}))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'kubernetes'))\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
