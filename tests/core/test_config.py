from __future__ import annotations

import pytest

from exporter.config import FLAGS, ConfigError, config_fields_match_flags, parse_address, parse_config
from exporter.devices import parse_device_selector
from exporter.model import Gpu, MigDevice


def test_table_and_dataclass_agree() -> None:
    assert config_fields_match_flags()


def test_defaults_match_dcgm_exporter_where_users_expect_them() -> None:
    cfg = parse_config([], environ={})
    assert cfg.address == ":9400"
    assert cfg.devices == "f"
    assert cfg.pod_resources_socket == "/var/lib/kubelet/pod-resources/kubelet.sock"
    assert cfg.xid_count_window_ms == 300000
    assert cfg.host_label == "Hostname"


def test_flag_beats_environment_beats_default() -> None:
    env = {"GPU_HEALTH_EXPORTER_COLLECT_INTERVAL": "2000", "GPU_HEALTH_EXPORTER_ADDRESS": "127.0.0.1:9500"}
    cfg = parse_config(["-c", "1000"], environ=env)
    assert cfg.collect_interval_ms == 1000
    assert cfg.listen == ("127.0.0.1", 9500)


def test_every_flag_has_a_documented_env_var() -> None:
    envs = {f.env for f in FLAGS}
    assert len(envs) == len(FLAGS)
    assert all(e.startswith("GPU_HEALTH_EXPORTER_") for e in envs)


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["-c", "abc"], {}, "--collect-interval: 'abc' is not a whole number"),
        (["-c", "5"], {}, "--collect-interval: must be at least 100"),
        (["-a", "nonsense"], {}, "--address 'nonsense'"),
        (["-d", "g:1-x"], {}, "--devices 'g:1-x'"),
        (["--log-format", "xml"], {}, "invalid choice"),
        ([], {"GPU_HEALTH_EXPORTER_KUBERNETES": "maybe"}, "GPU_HEALTH_EXPORTER_KUBERNETES: 'maybe' is not a boolean"),
        (["--kubernetes-pod-labels-allowlist", "("], {}, "invalid regex"),
        (["--simulate", "--nvml-library", "/x.so"], {}, "exclude each other"),
        (["--no-such-flag"], {}, "unrecognized arguments"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(argv, environ=env)
    assert needle in str(info.value)


def test_simulate_takes_an_optional_spec() -> None:
    assert parse_config(["--simulate"], environ={}).simulate == ""
    assert parse_config(["--simulate=gpus=2"], environ={}).simulate == "gpus=2"
    assert parse_config([], environ={}).simulate is None


def test_parse_address_forms() -> None:
    assert parse_address(":9400") == ("", 9400)
    assert parse_address("[::1]:80") == ("::1", 80)
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
