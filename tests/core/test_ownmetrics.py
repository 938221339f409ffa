"""What exporter/ownmetrics.py promises: docs/metrics.md lists exactly the own families the daemon
serves, with the HELP text, TYPE and labels it serves them with.

Served expositions come from
- the golden expositions of every shipped fake-NVML scenario (tests/e2e/golden: what the real
  daemon serves, kept current by tests/e2e/test_nvml_e2e.py), so a HELP text changed in its
  declaration only (and not reviewed into the goldens) fails here;
- one feature run of the real daemon on the fake NVML with every part on: pod attribution
  through a fake PodResources kubelet, the device plugin registered with a fake kubelet, an XID
  (window count, reasons, XID counter), and a health field that goes missing (the only way to
  see gpuhealth_health_signal_missing), plus the families the goldens leave out as volatile;
- one `--simulate` run (the simulated backend).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exporter.family import DCGM_DEVICE_LABELS, DEVICE_LABELS, Family
from exporter.labels import escape_help
from exporter.ownmetrics import BY_NAME, OWN_METRICS
from tests.deviceplugin.fakekubelet_registration import FakeKubelet as RegistrationKubelet
from tests.e2e.harness import ExporterProcess
from tests.e2e.nvmlnode import GOLDEN, SCENARIOS, NvmlNode
from tests.fakeapiserver import FakeApiServer
from tests.fakekubelet import FakeKubelet as PodResourcesKubelet
from tests.fakenvmllib import FakeNvmlBuild, load_scenario
from tests.pods.fakeproc import FakeProc, systemd_path, v2_file

ROOT = Path(__file__).resolve().parents[2]
GPU_RESOURCE = "nvidia.com/gpu"
MISSING_FIELD = "DCGM_FI_DEV_ROW_REMAP_FAILURE"

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="(?:[^"\\]|\\.)*"')
# How a labels_doc entry is written on a sample (a regex over the comma-joined label names).
_LABEL_GROUPS = {
    DEVICE_LABELS: r"gpu,uuid,pci_bus_id,device,model_name(,gpu_i_profile,gpu_i_id)?(,hostname)?",
    DCGM_DEVICE_LABELS: r"gpu,UUID,pci_bus_id,device,modelName(,GPU_I_PROFILE,GPU_I_ID)?(,Hostname|,hostname)?",
}


@dataclass
class Served:
    """One family as served: its HELP (escaped, as on the wire), TYPE and each sample's label names."""

    help: str | None = None
    type: str | None = None
    label_names: set[tuple[str, ...]] = field(default_factory=set)


def own_families(text: str) -> dict[str, Served]:
    """The exposition's own families (`gpuhealth_*`, and any other family declared as ours)."""
    out: dict[str, Served] = {}

    def ours(name: str) -> Served | None:
        return out.setdefault(name, Served()) if name.startswith("gpuhealth_") or name in BY_NAME else None

    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            _, kind, name, *rest = line.split(" ", 3)
            fam = ours(name)
            if fam is None:
                continue
            value = rest[0] if rest else ""
            if kind == "HELP":
                assert fam.help is None, f"{name}: two HELP lines"
                fam.help = value
            else:
                assert fam.type is None, f"{name}: two TYPE lines"
                fam.type = value
        elif line and not line.startswith("#"):
            m = _LINE.match(line)
            assert m, f"unparseable line {line!r}"
            fam = ours(m.group(1))
            if fam is not None:
                fam.label_names.add(tuple(_LABEL.findall(m.group(2) or "")))
    return out


def labels_pattern(f: Family) -> re.Pattern[str]:
    parts = [_LABEL_GROUPS.get(p, re.escape(p)) for p in f.labels_doc.split(", ")] if f.labels_doc else []
    return re.compile(",".join(parts))


def check_documented(source: str, served: dict[str, Served]) -> list[str]:
    """Every served own family is declared with the HELP, TYPE and labels it is served with."""
    problems = []
    for name, got in sorted(served.items()):
        f = BY_NAME.get(name)
        if f is None:
            problems.append(f"{source}: {name} is served but not declared (exporter/ownmetrics.py)")
            continue
        if got.help != escape_help(f.help):
            problems.append(f"{source}: {name} HELP served {got.help!r}, declared {escape_help(f.help)!r}")
        if got.type != f.type:
            problems.append(f"{source}: {name} TYPE served {got.type!r}, declared {f.type!r}")
        pattern = labels_pattern(f)
        for names in sorted(got.label_names):
            if not pattern.fullmatch(",".join(names)):
                problems.append(f"{source}: {name} served with labels {names}, declared {f.labels_doc!r}")
    return problems


# ---------------------------------------------------------------------------------- the sources


def golden(scenario: str) -> dict[str, Served]:
    return own_families((GOLDEN / f"{scenario}.prom").read_text())


@pytest.fixture(scope="module")
def feature_run(fakenvml_build: FakeNvmlBuild, tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of the real daemon on two fake H100s with pods and the device plugin on, an XID, NVML errors,
    a health field that goes missing, and a process of pod ns/p on GPU 0 (--process-metrics)."""
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:2]
    gpu0 = scenario["devices"][0]["uuid"]
    # A real process, placed in pod ns/p's cgroup in a fake host /proc, listed by NVML with utilisation samples.
    worker = subprocess.Popen(["sleep", "600"])
    proc = FakeProc(tmp_path_factory.mktemp("hostproc"))
    pod_uid, container_id = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9", "c0" * 32
    proc.place(worker.pid, v2_file(systemd_path(pod_uid, container_id)))
    scenario["devices"][0]["processes"] = [
        {"pid": worker.pid, "used_memory_mib": 1024, "sm": 30, "mem": 10, "enc": 1, "dec": 2}
    ]
    short = tempfile.mkdtemp(prefix="ghe-om-", dir="/tmp")  # unix socket paths: 107 bytes at most
    pods = PodResourcesKubelet(os.path.join(short, "pod-resources", "kubelet.sock"))
    pod = {"name": "p", "namespace": "ns", "containers": [{"name": "c", "devices": [
        {"resource_name": GPU_RESOURCE, "device_ids": [gpu0]}]}]}  # fmt: skip
    pods.set_pods([pod])
    pods.set_allocatable([{"resource_name": GPU_RESOURCE, "device_ids": [gpu0]}])  # GPU 1: unhealthy to the kubelet
    pods.start()
    registration = RegistrationKubelet(os.path.join(short, "device-plugins")).start()
    # The scheduling consumers (exporter/scheduling/) against a fake API server serving DeviceTaintRule.
    api = FakeApiServer(dra_taint_versions=("v1",)).start()
    api.set_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "test-node"}, "spec": {}})
    device = {"name": "gpu-0", "attributes": {"uuid": {"string": gpu0}}}
    spec = {"driver": "gpu.nvidia.com", "nodeName": "test-node", "pool": {"name": "test-node"}, "devices": [device]}
    api.upsert_resource_slice({"metadata": {"name": "s"}, "spec": spec})
    status = {"containerStatuses": [{"name": "c", "containerID": f"containerd://{container_id}"}]}
    meta = {"name": "p", "namespace": "ns", "uid": pod_uid}
    api.upsert_pod({"metadata": meta, "spec": {"nodeName": "test-node"}, "status": status})
    args = ["-c", "200", "-k", "--pod-resources-kubelet-socket", pods.socket_path]
    args += ["--device-plugin", "--device-plugin-dir", registration.plugin_dir]
    args += ["--kubeconfig", api.write_kubeconfig(os.path.join(short, "kubeconfig")), "--dra-device-taints"]
    args += ["--health-node-taint", "gpu-health-exporter/unhealthy:NoSchedule", "--kubernetes-events"]
    args += ["--process-metrics", "per-pod", "--host-proc", str(proc.root)]
    node = NvmlNode(fakenvml_build, tmp_path_factory.mktemp("feature"), scenario, args)
    exp = node.exporter
    try:
        exp.wait_ready()
        exp.wait_for(lambda t: node.value(t, MISSING_FIELD, gpu="0") is not None)  # the model has the field
        node.control("set", gpu=1, field=MISSING_FIELD, value=None)
        node.control("xid", gpu=0, xid=79)
        node.control("error", gpu=1, call="nvmlDeviceGetClockInfo", code=999, count=3)
        wanted = [f.name for f in OWN_METRICS]
        try:
            text = exp.wait_for(lambda t: all(f"\n{n}{{" in t or f"\n{n} " in t for n in wanted), timeout=20)
        except AssertionError:
            text = exp.metrics()  # the test below names what is missing
    finally:
        assert exp.stop() == 0
        worker.kill()
        worker.wait()
        registration.stop()
        pods.stop()
        api.stop()
        shutil.rmtree(short, ignore_errors=True)
    return text


@pytest.fixture(scope="module")
def simulate_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    exp = ExporterProcess(["--simulate", "-c", "200"], tmp_path_factory.mktemp("simulate"))
    try:
        exp.wait_ready()
        return exp.wait_for(lambda t: re.search(r"^gpuhealth_collections_total [2-9]", t, re.M) is not None)
    finally:
        assert exp.stop() == 0


# ---------------------------------------------------------------------------------- the tests


def test_every_shipped_scenario_has_a_golden() -> None:
    # mig-upstream-counters: the mig scenario with every line of dcgm-exporter's default-counters.csv
    assert sorted(p.stem for p in GOLDEN.glob("*.prom")) == sorted([*SCENARIOS, "mig-upstream-counters"])


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_served_families_in_every_scenario_are_documented(scenario: str) -> None:
    served = golden(scenario)
    assert "gpuhealth_device_up" in served  # the parse found the own families at all
    assert check_documented(f"golden {scenario}", served) == []


def test_served_families_with_every_part_on_are_documented(feature_run: str) -> None:
    assert check_documented("feature run", own_families(feature_run)) == []


def test_served_families_of_the_simulated_backend_are_documented(simulate_run: str) -> None:
    served = own_families(simulate_run)
    assert 'backend="simulated"' in simulate_run
    assert check_documented("--simulate", served) == []


def test_every_documented_family_is_served(feature_run: str, simulate_run: str) -> None:
    sources = {f"golden {s}": golden(s) for s in SCENARIOS}
    sources["feature run"] = own_families(feature_run)
    sources["--simulate"] = own_families(simulate_run)
    with_samples = {name for served in sources.values() for name, got in served.items() if got.label_names}
    headed = {name for served in sources.values() for name, got in served.items() if got.help is not None}
    assert [f.name for f in OWN_METRICS if f.name not in headed] == []
    # and with a sample somewhere, so the labels were checked too
    assert [f.name for f in OWN_METRICS if f.name not in with_samples] == []


def test_declared_parts_are_the_parts_served(feature_run: str) -> None:
    parts = set(re.findall(r'^gpuhealth_render_success\{part="([^"]+)"\} 1$', feature_run, re.M))
    assert {"dcgm", "dcgm_exp", "core", "health", "events", "pods", "device_plugin"} <= parts
    assert {f.name: f.part for f in OWN_METRICS if f.part not in parts | {"renderer"}} == {}


def test_every_declared_family_is_collected() -> None:
    """A Family constant left out of its module's FAMILIES would be served but not documented."""
    declared = {
        f"{name}.{attr}": v.name
        for name, module in sorted(sys.modules.items())
        if name == "exporter" or name.startswith("exporter.")
        for attr, v in vars(module).items()
        if isinstance(v, Family)
    }
    assert {k: v for k, v in declared.items() if v not in BY_NAME} == {}
    assert set(declared.values()) == set(BY_NAME)


def test_no_help_text_is_written_by_hand() -> None:
    """HELP and TYPE lines come from Family.header (own families) or the field catalogue (DCGM)."""
    # render.py: the DCGM families' headers; dcgmexp.py: the DCGM_EXP_* families', from the counters file.
    allowed = {"exporter/family.py", "exporter/render.py", "exporter/dcgmexp.py"}
    written = re.compile(r"""["']# (HELP|TYPE) """)  # a string starting a HELP or TYPE line
    found = {
        str(p.relative_to(ROOT)): len(written.findall(p.read_text(encoding="utf-8")))
        for p in sorted((ROOT / "exporter").rglob("*.py"))
    }
    assert {path: n for path, n in found.items() if n and path not in allowed} == {}
    assert found["exporter/render.py"] == 1, "render.py writes HELP lines for the DCGM plan only"


def test_docs_table_shows_the_declared_texts() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    for f in OWN_METRICS:
        assert f"| `{f.name}` | {f.type} | {f.labels_doc or '-'} | {f.part} | {f.help}" in text, f.name
