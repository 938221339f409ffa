"""Allocate responses without gRPC: every strategy x id strategy x device specs, MIG caps, CDI specs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from exporter.config import ConfigError, parse_config
from exporter.deviceplugin import DevicePluginConfig
from exporter.deviceplugin.allocate import (
    AllocateError,
    AllocateOptions,
    MigMinors,
    Target,
    container_response,
    normalise_strategies,
    parse_mig_minors,
    read_mig_minors,
    targets_for,
)
from exporter.deviceplugin.cdi import (
    GenerateSettings,
    SpecError,
    SpecGenerator,
    SpecIndex,
    check_nvidia_ctk,
    parse_spec,
)

from .fakes import gpu, inventory, mig_uuid, uuid

# GPU 1 has minor 5 so that a mix-up of NVML index and device minor shows.
INV = inventory([gpu(0), dataclasses.replace(gpu(1, migs=("1g.10gb", "1g.10gb")), minor=5)])
MINORS = parse_mig_minors(
    "config 1\nmonitor 2\ngpu5/gi1/access 21\ngpu5/gi1/ci0/access 22\ngpu5/gi2/access 30\ngpu5/gi2/ci0/access 31\n",
    "/proc/driver/nvidia-caps/mig-minors",
)
CONTROL = {"/dev/nvidiactl", "/dev/nvidia-uvm"}  # what `exists` says is there (uvm-tools, modeset absent)


def respond(uuids: list[str], **kw: object) -> object:
    opts = AllocateOptions(**kw)  # type: ignore[arg-type]
    return container_response(
        targets_for(INV, uuids),
        opts,
        response_id="11111111-2222-3333-4444-555555555555",
        mig_minors=lambda: MINORS,
        exists=lambda p: p in CONTROL or p.removeprefix("/host") in CONTROL,
    )


# --- strategies -------------------------------------------------------------------------------------

GPU_IDS = {"uuid": [uuid(0), uuid(1)], "index": ["0", "1"]}
MIG_IDS = {"uuid": [mig_uuid(1, 1)], "index": ["1:1"]}


@pytest.mark.parametrize(
    ("strategies", "id_strategy", "specs"),
    list(
        itertools.product(
            [
                ("envvar",),
                ("volume-mounts",),
                ("cdi-annotations",),
                ("cdi-cri",),
                ("envvar", "cdi-cri"),
                ("cdi-annotations", "cdi-cri"),
                ("envvar", "volume-mounts"),
            ],
            ["uuid", "index"],
            [False, True],
        )
    ),
)
def test_every_strategy_by_id_strategy_and_device_specs(
    strategies: tuple[str, ...], id_strategy: str, specs: bool
) -> None:
    r = respond([uuid(0), uuid(1)], strategies=strategies, id_strategy=id_strategy, pass_device_specs=specs)
    ids = GPU_IDS[id_strategy]
    kind = "k8s.device-plugin.nvidia.com/gpu"
    names = [f"{kind}={i}" for i in ids]
    all_cdi = all(s.startswith("cdi-") for s in strategies)
    envs = dict(r.envs)  # type: ignore[attr-defined]
    if all_cdi:
        assert envs == {"NVIDIA_VISIBLE_DEVICES": "void"}
    elif "volume-mounts" in strategies:
        assert envs == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    else:
        assert envs == {"NVIDIA_VISIBLE_DEVICES": ",".join(ids)}
    mounts = [(m.container_path, m.host_path, m.read_only) for m in r.mounts]  # type: ignore[attr-defined]
    if "volume-mounts" in strategies:
        assert mounts == [(f"/var/run/nvidia-container-devices/{i}", "/dev/null", False) for i in ids]
    else:
        assert mounts == []
    cdi = [d.name for d in r.cdi_devices]  # type: ignore[attr-defined]
    assert cdi == (names if "cdi-cri" in strategies else [])
    annotations = dict(r.annotations)  # type: ignore[attr-defined]
    if "cdi-annotations" in strategies:
        assert annotations == {"cdi.k8s.io/nvidia-device-plugin_11111111-2222-3333-4444-555555555555": ",".join(names)}
    else:
        assert annotations == {}
    devices = [(d.container_path, d.host_path, d.permissions) for d in r.devices]  # type: ignore[attr-defined]
    if specs and not all_cdi:
        # Control nodes only where present; the GPUs by minor (GPU 1 is /dev/nvidia5), not by index.
        assert devices == [
            ("/dev/nvidiactl", "/dev/nvidiactl", "rw"),
            ("/dev/nvidia-uvm", "/dev/nvidia-uvm", "rw"),
            ("/dev/nvidia0", "/dev/nvidia0", "rw"),
            ("/dev/nvidia5", "/dev/nvidia5", "rw"),
        ]
    else:
        # With CDI only, the spec carries the device nodes (as upstream).
        assert devices == []


@pytest.mark.parametrize("id_strategy", ["uuid", "index"])
def test_mig_device_ids_and_capability_nodes(id_strategy: str) -> None:
    r = respond([mig_uuid(1, 1)], strategies=("envvar",), id_strategy=id_strategy, pass_device_specs=True)
    assert dict(r.envs) == {"NVIDIA_VISIBLE_DEVICES": MIG_IDS[id_strategy][0]}  # type: ignore[attr-defined]
    paths = [d.container_path for d in r.devices]  # type: ignore[attr-defined]
    # Parent's node by minor, then the GI (gi2 -> 30) and CI (gi2/ci0 -> 31) capability nodes.
    assert paths == [
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia5",
        "/dev/nvidia-caps/nvidia-cap30",
        "/dev/nvidia-caps/nvidia-cap31",
    ]


def test_two_mig_devices_share_the_parent_node_once() -> None:
    r = respond([mig_uuid(1, 0), mig_uuid(1, 1)], pass_device_specs=True)
    paths = [d.container_path for d in r.devices]  # type: ignore[attr-defined]
    assert paths.count("/dev/nvidia5") == 1
    assert paths[-4:] == [f"/dev/nvidia-caps/nvidia-cap{n}" for n in (21, 22, 30, 31)]


def test_dev_root_prefixes_host_paths_only() -> None:
    r = respond([uuid(1)], pass_device_specs=True, dev_root="/host")
    assert [(d.container_path, d.host_path) for d in r.devices] == [  # type: ignore[attr-defined]
        ("/dev/nvidiactl", "/host/dev/nvidiactl"),
        ("/dev/nvidia-uvm", "/host/dev/nvidia-uvm"),
        ("/dev/nvidia5", "/host/dev/nvidia5"),
    ]


def test_custom_annotation_prefix_and_kind() -> None:
    r = respond(
        [uuid(0)], strategies=("cdi-annotations",), cdi_annotation_prefix="example.com/", cdi_kind="nvidia.com/gpu"
    )
    assert dict(r.annotations) == {  # type: ignore[attr-defined]
        "example.com/nvidia-device-plugin_11111111-2222-3333-4444-555555555555": f"nvidia.com/gpu={uuid(0)}"
    }


def test_annotation_key_is_unique_per_response() -> None:
    opts = AllocateOptions(strategies=("cdi-annotations",))
    a = container_response(targets_for(INV, [uuid(0)]), opts)
    b = container_response(targets_for(INV, [uuid(0)]), opts)
    (ka,), (kb,) = a.annotations.keys(), b.annotations.keys()
    assert ka != kb and ka.startswith("cdi.k8s.io/nvidia-device-plugin_") and len(ka.split("/", 1)[1]) <= 63


def test_unknown_uuid_is_a_clear_error() -> None:
    with pytest.raises(AllocateError, match="GPU-gone is no longer in the GPU inventory"):
        targets_for(INV, ["GPU-gone"])


def test_strategy_list_parsing() -> None:
    assert normalise_strategies("envvar, cdi ,cdi-cri,envvar") == ("envvar", "cdi-cri")
    with pytest.raises(ValueError, match="'volume' is not one of envvar, volume-mounts"):
        normalise_strategies("envvar,volume")
    with pytest.raises(ValueError, match="empty"):
        normalise_strategies(" , ")


# --- MIG minors ---------------------------------------------------------------------------------------


def test_mig_minors_bad_lines_are_reported_not_fatal() -> None:
    table = parse_mig_minors("gpu0/gi1/access 12\ngpu0/gi1/ci0/access x\ngarbage\n\ngpu0/gi1/ci0/access 13\n", "/m")
    assert table.gi_minor(0, 1) == 12 and table.ci_minor(0, 1, 0) == 13
    assert table.problems == ("/m:2: unparsable line 'gpu0/gi1/ci0/access x'", "/m:3: unparsable line 'garbage'")


def test_mig_minors_missing_entry_fails_the_allocation_with_the_file_named() -> None:
    t = Target(mig_uuid(1, 1), "1:1", 5, gi=2, ci=0)
    table = parse_mig_minors("gpu5/gi2/access 30\n", "/proc/driver/nvidia-caps/mig-minors")
    with pytest.raises(AllocateError, match=r"mig-minors has no line 'gpu5/gi2/ci0/access'"):
        container_response(
            [t], AllocateOptions(pass_device_specs=True), mig_minors=lambda: table, exists=lambda p: False
        )


def test_mig_minors_file_missing_or_unreadable(tmp_path: Path) -> None:
    assert read_mig_minors(str(tmp_path / "none")).missing
    t = Target(mig_uuid(1, 1), "1:1", 5, gi=2, ci=0)
    with pytest.raises(AllocateError, match="does not exist"):
        container_response(
            [t],
            AllocateOptions(pass_device_specs=True),
            mig_minors=lambda: MigMinors(str(tmp_path / "none"), missing=True),
            exists=lambda p: False,
        )
    f = tmp_path / "minors"
    f.write_text("gpu0/gi1/access 3\n")
    assert read_mig_minors(str(f)).gi_minor(0, 1) == 3


# --- CDI spec look-up ------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def test_spec_index_reads_yaml_and_json_and_ignores_broken_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc, run = tmp_path / "etc", tmp_path / "run"
    etc.mkdir()
    run.mkdir()
    _write(etc / "a.yaml", "cdiVersion: 0.6.0\nkind: nvidia.com/gpu\ndevices:\n- name: '0'\n- name: all\n")
    _write(run / "b.json", json.dumps({"kind": "example.com/gpu", "devices": [{"name": "GPU-x"}]}))
    _write(run / "broken.json", "{not json")
    _write(run / "ignored.yml", "kind: other.com/gpu\ndevices: [{name: z}]\n")  # the runtime reads no .yml
    index = SpecIndex([str(etc), str(run), str(tmp_path / "absent")])
    assert index.devices() == {"nvidia.com/gpu": frozenset({"0", "all"}), "example.com/gpu": frozenset({"GPU-x"})}
    assert index.missing(["nvidia.com/gpu=0", "nvidia.com/gpu=1", "example.com/gpu=GPU-x", "other.com/gpu=z"]) == [
        "nvidia.com/gpu=1",
        "other.com/gpu=z",
    ]
    out = capsys.readouterr().out
    assert out.count("CDI spec file ignored") == 1 and "broken.json" in out
    index.devices()
    assert "CDI spec file ignored" not in capsys.readouterr().out  # logged once per file version
    # Fixing the file is picked up without a restart.
    _write(run / "broken.json", json.dumps({"kind": "nvidia.com/gpu", "devices": [{"name": "1"}]}))
    assert index.missing(["nvidia.com/gpu=1"]) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n", "must be a mapping"),
        ("kind: gpu\ndevices: []\n", "'kind' must be '<vendor>/<class>'"),
        ("kind: a.com/gpu\n", "'devices' must be a list"),
        ("kind: a.com/gpu\ndevices: [{}]\n", r"devices\[0\] has no 'name'"),
        ("kind: a.com/gpu\ndevices: [{name: 0}]\n", r"devices\[0\].name must be a non-empty string, found 0"),
        ("kind: [unclosed\n", "not valid YAML"),
    ],
)
def test_parse_spec_errors_name_the_file(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        parse_spec(text, "/etc/cdi/x.yaml")
    assert str(info.value).startswith("/etc/cdi/x.yaml: ")


# --- regeneration -------------------------------------------------------------------------------------

FAKE_CTK = """#!{python}
import json, sys, time
args = dict(a.split("=", 1) for a in sys.argv[3:] if a.startswith("--") and "=" in a)
assert sys.argv[1:3] == ["cdi", "generate"], sys.argv
if "--fail" in sys.argv: sys.exit("boom: no NVML")
if "--hang" in sys.argv: time.sleep(30)
with open({log!r}, "a") as f: f.write(" ".join(sys.argv[1:]) + "\\n")
names = ["0", "1"] if args["--device-name-strategy"] == "index" else ["GPU-a", "GPU-b"]
kind = args["--vendor"] + "/" + args["--class"]
spec = {{"cdiVersion": "0.6.0", "kind": kind, "devices": [{{"name": n}} for n in names]}}
yaml = "kind: %s\\ndevices:\\n" % kind + "".join("- name: '%s'\\n" % n for n in names)
with open(args["--output"], "w") as f:
    f.write(json.dumps(spec) if args["--format"] == "json" else yaml)
"""


def fake_ctk(tmp_path: Path) -> tuple[str, Path]:
    log = tmp_path / "ctk.log"
    path = tmp_path / "nvidia-ctk"
    path.write_text(FAKE_CTK.format(python=sys.executable, log=str(log)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path), log


@pytest.mark.parametrize(("ext", "id_strategy"), [(".json", "uuid"), (".yaml", "index")])
def test_generator_runs_nvidia_ctk_and_replaces_the_spec(tmp_path: Path, ext: str, id_strategy: str) -> None:
    ctk, log = fake_ctk(tmp_path)
    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir()
    settings = GenerateSettings(ctk, str(spec_dir / f"k8s.device-plugin.nvidia.com-gpu{ext}"), id_strategy=id_strategy)
    gen = SpecGenerator(settings)
    assert gen.wait(gen.request(), 10) and gen.last_error is None
    names = ("0", "1") if id_strategy == "index" else ("GPU-a", "GPU-b")
    index = SpecIndex([str(spec_dir)])
    assert index.devices() == {"k8s.device-plugin.nvidia.com/gpu": frozenset(names)}
    fmt = ext[1:]
    assert log.read_text().splitlines() == [
        f"cdi generate --output={spec_dir}/.gpu-health-exporter/k8s.device-plugin.nvidia.com-gpu{ext} "
        f"--format={fmt} --vendor=k8s.device-plugin.nvidia.com --class=gpu --device-name-strategy={id_strategy}"
    ]
    assert os.listdir(spec_dir / ".gpu-health-exporter") == []  # renamed into place, nothing left behind


@pytest.mark.parametrize(("arg", "error"), [("--fail", "exited with 1: boom: no NVML"), ("--hang", "did not finish")])
def test_failed_generation_keeps_the_previous_spec(tmp_path: Path, arg: str, error: str) -> None:
    ctk, _ = fake_ctk(tmp_path)
    spec = tmp_path / "nvidia.json"
    good = json.dumps({"kind": "k8s.device-plugin.nvidia.com/gpu", "devices": [{"name": "GPU-old"}]})
    spec.write_text(good)
    gen = SpecGenerator(GenerateSettings(ctk, str(spec), extra_args=(arg,), timeout_s=1))
    assert gen.wait(gen.request(), 10)
    assert gen.last_error is not None and error in gen.last_error
    assert spec.read_text() == good


def test_generated_spec_of_another_kind_is_not_installed(tmp_path: Path) -> None:
    ctk, _ = fake_ctk(tmp_path)
    spec = tmp_path / "x.json"
    gen = SpecGenerator(
        GenerateSettings(ctk, str(spec), kind="k8s.device-plugin.nvidia.com/gpu", extra_args=("--vendor=other.com",))
    )
    assert gen.wait(gen.request(), 10)
    assert gen.last_error is not None and "wrote kind 'other.com/gpu'" in gen.last_error and not spec.exists()


def test_check_nvidia_ctk(tmp_path: Path) -> None:
    ctk, _ = fake_ctk(tmp_path)
    assert check_nvidia_ctk(ctk) == ctk
    with pytest.raises(ValueError, match="nvidia-ctk not found or not executable at '/nope/nvidia-ctk'"):
        check_nvidia_ctk("/nope/nvidia-ctk")


# --- configuration ----------------------------------------------------------------------------------


def test_flags_reach_the_plugin_config() -> None:
    cfg = parse_config(
        [
            "--device-list-strategy", "envvar, cdi",
            "--device-id-strategy", "index",
            "--pass-device-specs",
            "--cdi-generate-args", "--driver-root=/run/nvidia/driver '--dev-root=/a b'",
        ],
        environ={},
    )  # fmt: skip
    assert cfg.device_list_strategy == "envvar,cdi"
    assert cfg.cdi_generate_args == ("--driver-root=/run/nvidia/driver", "--dev-root=/a b")
    c = DevicePluginConfig(
        device_list_strategy=cfg.device_list_strategy,
        device_id_strategy=cfg.device_id_strategy,
        pass_device_specs=cfg.pass_device_specs,
    )
    assert c.strategies == ("envvar", "cdi-cri") and c.generates_cdi_spec
    assert c.allocate_options().id_strategy == "index" and c.allocate_options().pass_device_specs


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--device-list-strategy", "envvar,volume"], "'volume' is not one of envvar, volume-mounts"),
        (["--device-list-strategy", ","], "give at least one of"),
        (["--device-id-strategy", "name"], "invalid choice: 'name'"),
        (["--cdi-generate-args", "'unclosed"], "not a valid argument list"),
    ],
)
def test_bad_flags_are_config_errors(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(argv, environ={})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"device_id_strategy": "name"}, "device id strategy 'name'"),
        ({"cdi_kind": "nvidia.com"}, "--cdi-kind 'nvidia.com' must be <vendor>/<class>"),
        ({"cdi_annotation_prefix": "cdi.k8s.io"}, "--cdi-annotation-prefix"),
        ({"cdi_spec_file": "/var/run/cdi/x.yml"}, "ending in .json or .yaml"),
        ({"device_list_strategy": "cdi", "cdi_spec_file": "/tmp/x.json"}, "not in one of --cdi-spec-dirs"),
        ({"cdi_spec_dirs": ("etc/cdi",)}, "absolute paths"),
        ({"dev_root": "host"}, "--dev-root 'host' must be an absolute path"),
        ({"cdi_generate_timeout_s": 0.0}, "--cdi-generate-timeout must be > 0"),
    ],
)
def test_plugin_config_rejects(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DevicePluginConfig(**kw)  # type: ignore[arg-type]


def test_spec_outside_the_dirs_is_fine_when_not_generated() -> None:
    c = DevicePluginConfig(device_list_strategy="cdi", nvidia_ctk_path="", cdi_spec_file="/tmp/x.json")
    assert c.uses_cdi and not c.generates_cdi_spec


def test_failed_generation_is_retried_without_a_new_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.deviceplugin.cdi as cdi_module

    monkeypatch.setattr(cdi_module, "RETRY_FIRST_S", 0.05)
    ctk, _ = fake_ctk(tmp_path)
    spec = tmp_path / "x.json"
    flag = tmp_path / "fail-once"
    flag.write_text("")
    # A wrapper that fails while the flag file exists (the driver is not ready yet), then succeeds.
    wrapper = tmp_path / "ctk-wrapper"
    wrapper.write_text(f'#!/bin/sh\nif [ -e {flag} ]; then rm {flag}; exit 3; fi\nexec {ctk} "$@"\n')
    wrapper.chmod(0o755)
    gen = SpecGenerator(GenerateSettings(str(wrapper), str(spec)))
    assert gen.wait(gen.request(), 10) and gen.last_error is not None
    deadline = time.monotonic() + 5
    while not spec.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spec.exists() and gen.runs >= 2 and gen.last_error is None
