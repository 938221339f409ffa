"""End to end with a real Prometheus: exporter -> Prometheus -> rules, dashboards, compat queries.

One scenario for the whole module (started once, ~20 s):
- node-a: `python -m exporter --simulate=SPEC_A -k` (8x H100; GPU 0 in MIG mode with four instances)
  next to a fake kubelet (tests/fakekubelet.py) whose layout is built from the simulated UUIDs:
  whole-GPU pods, MIG pods, a time-shared GPU (replicas ::0..3, three pods), free devices, and GPU 1
  left out of allocatable (the kubelet deems it unhealthy). Scheduled faults: fence XID 79 on GPU 1,
  a double-bit ECC error on GPU 4 (XID 48, row remap pending), a row-remap failure on GPU 5 (XID 64),
  HW thermal slowdown on GPU 6.
- node-b: `--simulate=SPEC_B` (2x V100, other seed, no kubelet) with a DBE: V100s retire pages, so the
  RETIRED_PENDING flag has data; a second target also proves legends/joins across instances.
- node-c: `--simulate=SPEC_C --mig-layout parent`: a MIG GPU in our own layout (the GPU's series plus
  per-instance ones), where node-a shows its MIG GPU as dcgm-exporter does (only as its instances), so
  every dashboard is checked under both layouts.
- Debian's `prometheus` scrapes both every 1 s with job="gpu-health-exporter" and honor_labels: true
  (what the ServiceMonitor sets) and evaluates the real rules file -- in a temporary copy where every
  `for:` is rewritten to FOR (production durations are minutes to hours; the expressions are untouched).

Checks: every dashboard query returns data (ALLOWLIST documents the exceptions), the fence XID takes
GpuUnhealthy to `firing` in /api/v1/alerts (plus the joins between own and DCGM families), the own
families of the live scrape pass `promtool check metrics` with zero lints, and the panel queries of
grafana.com dashboard 12239 return data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.simulate import SimulatedBackend
from tests.deploy.deploy_common import (
    COMPAT_QUERIES,
    DASHBOARD_NAMES,
    RULES,
    load_dashboard,
    promtool,
    substitute_grafana_vars,
)
from tests.deploy.prom_helpers import PrometheusServer, make_config, start_prometheus
from tests.e2e.harness import ExporterProcess
from tests.fakeapiserver import FakeApiServer
from tests.fakekubelet import FakeKubelet
from tests.pods.fakeproc import FakeProc, systemd_path, v2_file

JOB = "gpu-health-exporter"
FOR = "2s"
SPEC_A = "mig=0:3g.40gb+2g.20gb+1g.10gb+1g.10gb,faults=xid:1:79@1;dbe:4@1;remap-failure:5@1;thermal:6@1"
SPEC_B = "v100x2,seed=2,faults=dbe:1@1"
SPEC_C = "mig=0:3g.40gb+2g.20gb+1g.10gb+1g.10gb,seed=3"
# Grafana's built-in variables as Grafana would fill them for "last 5 minutes" at a 1 s scrape
# interval. Dashboard variables ($node, $gpu, $namespace, ...) become ALL_VALUE: "All" in Grafana is
# ".*", but ".*" also matches a missing label, so `hostname=~"$node"` on a family that has only
# `Hostname` would still return data; ".+" requires the label, which catches a wrong label scheme.
GRAFANA_VALUES = {
    "$__rate_interval": "10s",
    "$__interval_ms": "1000",
    "$__interval": "1s",
    "$__range_s": "300",
    "$__range": "5m",
    "${__range}": "5m",
}
ALL_VALUE = ".+"

# Dashboard queries that may return no data in this scenario, with the reason. Keys are
# "<dashboard>/<panel title>/<refId>" (or "<dashboard>/annotation/<name>"). A query that returns no
# data and is not listed here fails the test; a listed query that does return data fails it too
# (keep the list honest).
ALLOWLIST = {
    # The simulator never produces NVML errors (docs/simulate.md: ReadResult.errors is always
    # empty), so gpuhealth_nvml_errors_total has no series; on real GPUs unsupported fields fill it.
    "health-errors/NVML errors/A": "simulator reports no NVML errors",
}
# grafana.com 12239 panels that have no data with this exporter (see the notes in the file).
# (The Tensor Core panels have data since DCGM_FI_PROF_PIPE_TENSOR_ACTIVE comes from NVML GPM on Hopper.)
COMPAT_ALLOWLIST: dict[str, str] = {}


@dataclass
class Scenario:
    prom: PrometheusServer
    node_a: ExporterProcess
    node_b: ExporterProcess
    node_c: ExporterProcess
    kubelet: FakeKubelet
    started: float
    uuids: dict[int, str]
    shared_pods: dict[str, float]  # --process-metrics: pod on the time-shared GPU 2 -> its share of the memory


def kubelet_layout(spec: str) -> dict[str, Any]:
    """Pods and allocatable devices of node-a, from the simulator's deterministic UUIDs."""
    gpus = {g.index: g for g in SimulatedBackend.from_spec(spec).discover().gpus}
    migs = {m.gpu_instance_id: m for m in gpus[0].migs}
    assert sorted(migs) == [2, 3, 9, 10], migs

    def pod(namespace: str, name: str, resource: str, *ids: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": namespace,
            "containers": [{"name": "main", "devices": [{"resource_name": resource, "device_ids": list(ids)}]}],
        }

    shared = [f"{gpus[2].uuid}::{i}" for i in range(4)]
    pods = [
        pod("ml", "train-1", "nvidia.com/gpu", gpus[1].uuid),  # whole GPU (fenced by XID 79)
        pod("ml", "idle-holder", "nvidia.com/gpu", gpus[3].uuid),  # whole GPU, "hold" workload: 0 %
        pod("infer", "infer-a", "nvidia.com/gpu", shared[0]),  # time-shared GPU 2 ...
        pod("infer", "infer-b", "nvidia.com/gpu", shared[1]),
        pod("infer", "infer-c", "nvidia.com/gpu", shared[2]),  # ... replica ::3 stays free
        pod("research", "mig-big", "nvidia.com/mig-3g.40gb", migs[2].uuid),
        pod("research", "mig-mid", "nvidia.com/mig-2g.20gb", migs[3].uuid),
        pod("ml", "mig-small", "nvidia.com/mig-1g.10gb", migs[9].uuid),  # GI 10 stays free
    ]
    # GPU 1 is missing from allocatable: the kubelet considers it unhealthy (so does the exporter).
    whole = [gpus[i].uuid for i in (3, 4, 5, 6, 7)] + shared
    allocatable = [
        {"resource_name": "nvidia.com/gpu", "device_ids": whole},
        {"resource_name": "nvidia.com/mig-3g.40gb", "device_ids": [migs[2].uuid]},
        {"resource_name": "nvidia.com/mig-2g.20gb", "device_ids": [migs[3].uuid]},
        {"resource_name": "nvidia.com/mig-1g.10gb", "device_ids": [migs[9].uuid, migs[10].uuid]},
    ]
    return {"pods": pods, "allocatable": allocatable}


def place_processes(spec: str, proc: FakeProc, api: FakeApiServer) -> dict[str, float]:
    """--process-metrics on node-a: the simulator's processes on the time-shared GPU 2 placed (fake host
    /proc) in the cgroups of pods infer-a and infer-b, which the fake API server serves with their
    container IDs; every other simulated process is a host process. Returns pod -> its memory share."""
    backend = SimulatedBackend.from_spec(spec)
    gpus = backend.discover().gpus
    shared = backend.processes(gpus[2].uuid)
    assert len(shared) == 2, shared  # the simulator's deterministic split for this seed
    shares = {}
    total = sum(p.used_memory_bytes or 0 for p in shared)
    for i, (p, name) in enumerate(zip(shared, ("infer-a", "infer-b"), strict=True)):
        uid, cid = f"5a4ed000-0000-4000-8000-00000000000{i}", f"{i}f" * 32
        proc.place(p.pid, v2_file(systemd_path(uid, cid)))
        status = {"containerStatuses": [{"name": "main", "containerID": f"containerd://{cid}"}]}
        meta = {"name": name, "namespace": "infer", "uid": uid}
        api.upsert_pod({"metadata": meta, "spec": {"nodeName": "node-a"}, "status": status})
        shares[name] = (p.used_memory_bytes or 0) / total
    for gpu in gpus:
        for p in backend.processes(gpu.uuid) if gpu.index != 2 else ():
            proc.place(p.pid, v2_file("/system.slice/batch-job.service"))
    return shares


def fast_rules(path: Path) -> Path:
    """A copy of the real rules with every `for:` set to FOR, so alerts fire within the test."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    tmp = tmp_path_factory.mktemp("prom-e2e")
    sock_dir = tempfile.mkdtemp(prefix="k", dir="/tmp")  # unix socket paths are limited to 107 bytes
    started = time.time()
    kubelet = FakeKubelet(Path(sock_dir) / "kubelet.sock", kubelet_layout(SPEC_A)).start()
    api = FakeApiServer().start()
    proc = FakeProc(tmp / "hostproc")
    shared_pods = place_processes(SPEC_A, proc, api)
    args_a = [f"--simulate={SPEC_A}", "-c", "500", "-k", "--pod-resources-kubelet-socket", kubelet.socket_path]
    args_a += ["--process-metrics", "per-pod", "--host-proc", str(proc.root)]
    args_a += ["--kubeconfig", api.write_kubeconfig(Path(sock_dir) / "kubeconfig")]
    node_a = ExporterProcess(args_a, tmp / "node-a", env={"NODE_NAME": "node-a"})
    node_b = ExporterProcess([f"--simulate={SPEC_B}", "-c", "500"], tmp / "node-b", env={"NODE_NAME": "node-b"})
    node_c = ExporterProcess(
        [f"--simulate={SPEC_C}", "-c", "500", "--mig-layout", "parent"], tmp / "node-c", env={"NODE_NAME": "node-c"}
    )
    prom = None
    try:
        config = make_config(
            [f"127.0.0.1:{node_a.port}", f"127.0.0.1:{node_b.port}", f"127.0.0.1:{node_c.port}"],
            job=JOB,
            rule_files=[fast_rules(tmp / "rules.yml")],
            honor_labels=True,
        )
        prom = start_prometheus(config, workdir=tmp / "prometheus")
        node_a.wait_ready()
        node_b.wait_ready()
        node_c.wait_ready()
        prom.wait_for_targets_up(JOB, timeout=30)
        uuids = {g.index: g.uuid for g in SimulatedBackend.from_spec(SPEC_A).discover().gpus}
        yield Scenario(prom, node_a, node_b, node_c, kubelet, started, uuids, shared_pods)
    finally:
        if prom is not None:
            prom.stop()
        node_a.stop()
        node_b.stop()
        node_c.stop()
        kubelet.stop()
        api.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def wait_for_history(prom: PrometheusServer, seconds: int = 12) -> None:
    """Enough scrapes of both targets that rate()/increase() over $__rate_interval have samples."""
    prom.wait_for(f'min(count_over_time(up{{job="{JOB}"}}[1m])) >= {seconds}', timeout=seconds + 30)


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(series.get("values") or series.get("value") for series in result)


def dashboard_queries() -> dict[str, tuple[str, bool, str]]:
    """Every query of every dashboard: key -> (expr, instant, legend template). Variables are queried
    as selectors; annotations carry their title/text templates as the legend."""
    out: dict[str, tuple[str, bool, str]] = {}
    for name in DASHBOARD_NAMES:
        board = load_dashboard(name)
        panels = [p for top in board["panels"] for p in [top, *top.get("panels", [])] if p["type"] != "row"]
        for panel in panels:
            for target in panel["targets"]:
                out[f"{name}/{panel['title']}/{target['refId']}"] = (
                    target["expr"],
                    bool(target.get("instant")),
                    target.get("legendFormat", ""),
                )
        for ann in board["annotations"]["list"]:
            if ann.get("expr"):
                out[f"{name}/annotation/{ann['name']}"] = (
                    ann["expr"],
                    False,
                    ann.get("titleFormat", "") + ann.get("textFormat", ""),
                )
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                match = re.fullmatch(r"label_values\((.*), *\w+\)", var["definition"])
                assert match, var["definition"]
                out[f"{name}/variable/{var['name']}"] = (match.group(1), True, "")
    return out


def evaluate(prom: PrometheusServer, expr: str, instant: bool, start: float) -> list[dict[str, Any]]:
    if instant:
        return prom.query(expr)
    return prom.query_range(expr, start=start, end=time.time(), step="1s")


def test_every_dashboard_query_returns_data(scenario: Scenario) -> None:
    prom = scenario.prom
    wait_for_history(prom)
    # Fault panels (XID tables, remap flags, unhealthy reasons) need the scheduled faults applied.
    prom.wait_for("gpuhealth_health_state == 2", lambda r: len(r) >= 3, timeout=30)
    queries = dashboard_queries()
    assert len(queries) > 60
    empty, errors, legends = [], [], []
    for key, (expr, instant, legend) in queries.items():
        plain = substitute_grafana_vars(expr, GRAFANA_VALUES, ALL_VALUE)
        assert "$" not in plain, f"{key}: unsubstituted variable in {plain}"
        try:
            result = evaluate(prom, plain, instant, scenario.started)
        except Exception as exc:  # collect every failure, report them at once
            errors.append(f"{key}: {exc}")
            continue
        if not has_data(result):
            empty.append(key)
        # Every {{label}} of the legend must exist on some series (a DCGM name on an own family
        # would leave it blank on all of them).
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if result and not any(s["metric"].get(label) for s in result):
                legends.append(f"{key}: legend {{{{{label}}}}} matches no label of {result[0]['metric']}")
    assert not errors, "\n".join(errors)
    assert not legends, "\n".join(legends)
    unexpected = sorted(set(empty) - set(ALLOWLIST))
    assert not unexpected, "no data (add a fault/pod to the scenario, or allowlist with a reason):\n" + "\n".join(
        f"{k}: {substitute_grafana_vars(queries[k][0], GRAFANA_VALUES, ALL_VALUE)}" for k in unexpected
    )
    stale = sorted(set(ALLOWLIST) - set(empty))
    assert not stale, f"allowlisted but returned data (or no longer exists): {stale}"


def test_panels_see_pods_mig_and_shared_gpus(scenario: Scenario) -> None:
    """Spot checks that the data is the scenario's, not just any series."""
    prom = scenario.prom
    wait_for_history(prom)
    pods = {
        (s["metric"]["namespace"], s["metric"]["pod"])
        for s in prom.query('gpuhealth_gpu_allocation_info{hostname=~".*", namespace=~".*", pod!=""}')
    }
    assert pods == {
        ("ml", "train-1"),
        ("ml", "idle-holder"),
        ("infer", "infer-a"),
        ("infer", "infer-b"),
        ("infer", "infer-c"),
        ("research", "mig-big"),
        ("research", "mig-mid"),
        ("ml", "mig-small"),
    }
    migs = prom.query('gpuhealth_health_state{hostname="node-a", gpu_i_id!=""}')
    assert {s["metric"]["gpu_i_id"] for s in migs} == {"2", "3", "9", "10"}
    # the shared GPU's DCGM series repeat per pod; per-GPU panels aggregate them to one series
    shared = prom.query(f'max by (Hostname, gpu, UUID) (DCGM_FI_DEV_GPU_TEMP{{UUID="{scenario.uuids[2]}"}})')
    assert len(shared) == 1
    per_pod = prom.query(f'DCGM_FI_DEV_GPU_UTIL{{UUID="{scenario.uuids[2]}", pod!=""}}')
    assert {s["metric"]["pod"] for s in per_pod} == {"infer-a", "infer-b", "infer-c"}
    # GPU 6 is in HW thermal slowdown all the time: the throttled-time panel reads about 1 (the violation
    # counters count ns, so a wrong unit would read 1000x off)
    throttled = [
        expr
        for key, (expr, _instant, _legend) in dashboard_queries().items()
        if "/Time throttled" in key and "THERMAL_VIOLATION" in expr
    ]
    assert len(throttled) == 1
    values = {**GRAFANA_VALUES, "$node": "node-a"}
    fraction = prom.query(substitute_grafana_vars(throttled[0], values, ALL_VALUE).replace("{", '{gpu="6",', 1))
    assert len(fraction) == 1 and 0.5 <= float(fraction[0]["value"][1]) <= 1.05, fraction
    hosts = {s["metric"]["Hostname"] for s in prom.query("DCGM_FI_DEV_GPU_TEMP")}
    assert hosts == {"node-a", "node-b", "node-c"}


def test_shared_gpu_row_shows_each_pods_memory_and_sm(scenario: Scenario) -> None:
    """The workload dashboard's Shared GPU row: the time-shared GPU 2's two pods, each with its own
    values (the simulator's split of the GPU between its two processes), host processes left out."""
    prom = scenario.prom
    wait_for_history(prom)
    queries = {k: v for k, v in dashboard_queries().items() if "(per device)" in k}
    assert len(queries) == 3, sorted(queries)
    values = {**GRAFANA_VALUES, "$node": "node-a", "$namespace": ".+"}
    by_panel: dict[str, dict[str, float]] = {}
    for key, (expr, _instant, _legend) in queries.items():
        result = prom.query(substitute_grafana_vars(expr, values, ALL_VALUE))
        on_gpu2 = [s for s in result if s["metric"].get("uuid") == scenario.uuids[2]]
        by_panel[key.split("/")[1]] = {s["metric"]["pod"]: float(s["value"][1]) for s in on_gpu2}
        assert {s["metric"]["namespace"] for s in result} == {"infer"}, key  # host processes are not pods
    memory = by_panel["GPU memory by pod (per device)"]
    share = by_panel["GPU memory share by pod (per device)"]
    sm = by_panel["SM share by pod (per device)"]
    assert set(memory) == set(share) == set(sm) == {"infer-a", "infer-b"}
    assert memory["infer-a"] != memory["infer-b"] and min(memory.values()) > 0
    for pod, expected in scenario.shared_pods.items():
        assert abs(share[pod] - expected) < 0.01, (pod, share, scenario.shared_pods)
    assert all(0 <= v <= 1 for v in sm.values()) and sm["infer-a"] != sm["infer-b"]


def test_mig_gpu_panels_work_under_both_layouts(scenario: Scenario) -> None:
    """GPU 0 is in MIG mode on node-a (dcgm layout) and node-c (parent layout): the node detail
    dashboard shows the same panels for it, with one GPU-level line per panel either way."""
    prom = scenario.prom
    wait_for_history(prom)
    # The two layouts really differ: node-a has no series of the MIG GPU itself.
    per_instance = prom.query('DCGM_FI_DEV_POWER_USAGE{Hostname="node-a", gpu="0"}')
    assert sorted(s["metric"].get("GPU_I_ID", "") for s in per_instance) == ["10", "2", "3", "9"]
    own = prom.query('DCGM_FI_DEV_POWER_USAGE{Hostname="node-c", gpu="0"}')
    assert [s["metric"].get("GPU_I_ID", "") for s in own] == [""]
    with_data: dict[str, set[str]] = {}
    for node in ("node-a", "node-c"):
        values = {**GRAFANA_VALUES, "$node": node, "$gpu": "0"}
        for key, (expr, instant, _legend) in dashboard_queries().items():
            if not key.startswith("node-gpu-detail/") or "/variable/" in key or "/annotation/" in key:
                continue
            if "/Pods on these GPUs/" in key:  # node-c has no kubelet: no pods anywhere on it
                continue
            result = evaluate(prom, substitute_grafana_vars(expr, values, ALL_VALUE), instant, scenario.started)
            if has_data(result):
                with_data.setdefault(node, set()).add(key)
                gpu_level = [r for r in result if "GPU_I_ID" not in r["metric"] and "gpu_i_id" not in r["metric"]]
                assert len({r["metric"].get("UUID") or r["metric"].get("uuid") for r in gpu_level}) <= 1, key
    assert with_data["node-a"] == with_data["node-c"], with_data["node-a"] ^ with_data["node-c"]
    for panel in ("GPU temperature", "Power draw and limit", "Framebuffer used", "Framebuffer free"):
        assert any(f"/{panel}/" in key for key in with_data["node-a"]), panel


def alerts_named(prom: PrometheusServer, name: str) -> list[dict[str, Any]]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


def wait_for_alert(prom: PrometheusServer, name: str, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        firing = alerts_named(prom, name)
        if firing:
            return firing
        time.sleep(0.25)
    raise AssertionError(f"{name} not firing after {timeout}s: {json.dumps(prom.alerts(), indent=1)[:4000]}")


def test_fence_xid_fires_gpu_unhealthy(scenario: Scenario) -> None:
    prom = scenario.prom
    firing = wait_for_alert(prom, "GpuUnhealthy")
    (alert,) = [a for a in firing if a["labels"]["gpu"] == "1" and a["labels"]["hostname"] == "node-a"]
    labels = alert["labels"]
    assert labels["uuid"] == scenario.uuids[1] and labels["severity"] == "critical"
    assert labels["action"] == "reboot_node" and labels["model_name"] == "NVIDIA H100 80GB HBM3"
    assert "UUID" not in labels and "Hostname" not in labels
    # The description queries gpuhealth_health_reason with the alert's snake_case labels.
    description = alert["annotations"]["description"]
    assert f"({scenario.uuids[1]}, NVIDIA H100 80GB HBM3) on node-a" in description
    assert "Active reasons: xid 79 (fence, reboot_node);" in description
    (xid,) = [
        a
        for a in wait_for_alert(prom, "GpuXidFenceError")
        if a["labels"]["gpu"] == "1" and a["labels"]["hostname"] == "node-a"
    ]
    assert xid["labels"]["xid"] == "79"


def test_joins_between_own_and_dcgm_families_fire(scenario: Scenario) -> None:
    prom = scenario.prom
    (idle,) = wait_for_alert(prom, "GpuAllocatedButIdle")  # allocation (snake_case) x DCGM util
    assert (idle["labels"]["pod"], idle["labels"]["gpu"], idle["labels"]["hostname"]) == ("idle-holder", "3", "node-a")
    # GPU 4 (DBE -> XID 48) is fenced but allocatable; GPU 1 is fenced and out of allocatable.
    allocatable = {
        (a["labels"]["hostname"], a["labels"]["gpu"]) for a in wait_for_alert(prom, "GpuUnhealthyButAllocatable")
    }
    assert ("node-a", "4") in allocatable and ("node-a", "1") not in allocatable
    assert not alerts_named(prom, "GpuUnhealthyOnlyInKubelet")
    (remap,) = wait_for_alert(prom, "GpuRowRemapFailed")  # DCGM-only rule keeps dcgm-exporter's labels
    assert (remap["labels"]["Hostname"], remap["labels"]["gpu"]) == ("node-a", "5")
    (retired,) = wait_for_alert(prom, "GpuRetiredPagesPending")
    assert (retired["labels"]["Hostname"], retired["labels"]["gpu"]) == ("node-b", "1")
    for name in ("GpuExporterDown", "GpuCollectionFailing", "GpuDataStale", "GpuExporterCollectionStale"):
        assert not alerts_named(prom, name), name


def own_families(text: str) -> str:
    """The exposition without DCGM_* and python_* families (HELP/TYPE lines and samples)."""
    keep = []
    for line in text.splitlines():
        name = line.split()[2] if line.startswith("# ") and len(line.split()) > 2 else re.split(r"[{ ]", line)[0]
        if not name.startswith(("DCGM_", "python_")):
            keep.append(line)
    return "\n".join(keep) + "\n"


def test_promtool_check_metrics_on_live_scrape(scenario: Scenario) -> None:
    scenario.prom.wait_for("gpuhealth_xid_errors_total", timeout=30)
    for node in (scenario.node_a, scenario.node_b):
        text = own_families(node.metrics())
        for family in ("gpuhealth_device_up", "gpuhealth_health_state", "gpuhealth_xid_errors_total"):
            assert f"# TYPE {family} " in text, family
        if node is scenario.node_a:
            assert "# TYPE gpuhealth_gpu_allocation_info " in text
        result = subprocess.run(
            [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
        )
        lints = (result.stdout + result.stderr).strip()
        assert result.returncode == 0 and not lints, lints


def test_grafana_12239_queries_return_data(scenario: Scenario) -> None:
    prom = scenario.prom
    wait_for_history(prom, 3)
    lines = [line for line in COMPAT_QUERIES.read_text().splitlines() if line and not line.startswith("#")]
    queries = dict(line.split("\t", 1) for line in lines)
    empty = sorted(title for title, expr in queries.items() if not has_data(prom.query(expr)))
    assert empty == sorted(COMPAT_ALLOWLIST), empty
