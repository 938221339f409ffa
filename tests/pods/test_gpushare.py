"""GpuShare: per pod and container memory and utilisation on each device, the process count, /gpus."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exporter.labels import RenderContext
from exporter.model import GpuProcess
from exporter.pods.gpushare import FAMILIES, GpuShare
from exporter.pods.kube import PodMeta, pod_meta
from exporter.snapshot import Snapshot
from tests.e2e.harness import run_exporter
from tests.pods.fakeproc import FakeProc, cgroupfs_path, systemd_path, v1_file, v2_file
from tests.pods.podfixtures import gpu_uuid, make_inventory, mig_uuid

UID_A = "aaaaaaaa-1111-4111-8111-000000000001"
UID_B = "bbbbbbbb-2222-4222-8222-000000000002"
CID_A = "a1" * 32
CID_B = "b2" * 32
GIB = 1 << 30
INV = make_inventory(2, mig={1: [(1, "1g.10gb")]})


def pod(name: str, uid: str, cid: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "team", "uid": uid},
        "status": {"containerStatuses": [{"name": "main", "containerID": f"containerd://{cid}"}]},
    }


class Pods:
    def __init__(self) -> None:
        self.version = 0
        self.items: dict[Any, PodMeta] = {}

    def set(self, *pods: dict[str, Any]) -> None:
        self.items = dict(pod_meta(p) for p in pods)
        self.version += 1

    def __call__(self) -> tuple[int, Mapping[Any, PodMeta]] | None:
        return (self.version, self.items) if self.version else None


def snap(processes: Mapping[str, tuple[GpuProcess, ...]], read_at: float) -> Snapshot:
    return Snapshot(INV, (), read_at, 0.0, processes=processes, processes_read_at=read_at)


def ctx() -> RenderContext:
    c = RenderContext("Hostname", "node1")
    c.rebuild(INV)
    return c


def setup(tmp_path: Path, **kw: Any) -> tuple[GpuShare, FakeProc, Pods]:
    proc = FakeProc(tmp_path / "proc")
    proc.place(101, v2_file(systemd_path(UID_A, CID_A)))
    proc.place(102, v2_file(systemd_path(UID_A, CID_A)))  # a second process of the same container
    proc.place(201, v1_file(cgroupfs_path(UID_B, CID_B)))
    proc.place(301, v2_file("/system.slice/xorg.service"))
    pods = Pods()
    return GpuShare(proc.root, pod_items=pods, **kw), proc, pods


SHARED = {
    gpu_uuid(0): (
        GpuProcess(101, "compute", 3 * GIB, sm_util=30.0, mem_util=10.0, enc_util=0.0, dec_util=0.0),
        GpuProcess(102, "compute", 1 * GIB, sm_util=5.0),
        GpuProcess(201, "compute", 2 * GIB, sm_util=40.0, mem_util=20.0),
        GpuProcess(301, "graphics", GIB // 2),
        GpuProcess(999, "compute", None),  # no /proc entry, no memory figure
    ),
    mig_uuid(1, 1): (GpuProcess(201, "compute", GIB, gpu_instance_id=1, compute_instance_id=0),),
}


def line(c: RenderContext, name: str, uuid: str, labels: str, value: str) -> str:
    return f"{name}{{{c.device_labels(uuid)},{labels}}} {value}\n"


def test_two_pods_on_one_gpu_get_their_own_memory_and_sm_share(tmp_path: Path) -> None:
    share, _proc, pods = setup(tmp_path)
    pods.set(pod("a", UID_A, CID_A), pod("b", UID_B, CID_B))
    share.on_snapshot(snap(SHARED, 1.0))
    c = ctx()
    text = share.render_metrics(c)
    a = 'scope="pod",namespace="team",pod="a",container="main"'
    b = 'scope="pod",namespace="team",pod="b",container="main"'
    host = 'scope="host",namespace="",pod="",container=""'
    unknown = 'scope="unknown",namespace="",pod="",container=""'
    mem, sm = "gpuhealth_pod_gpu_memory_used_bytes", "gpuhealth_pod_sm_utilization_ratio"
    g0 = gpu_uuid(0)
    assert line(c, mem, g0, a, str(4 * GIB)) in text  # both of a's processes
    assert line(c, mem, g0, b, str(2 * GIB)) in text
    assert line(c, mem, g0, host, str(GIB // 2)) in text
    assert f"{mem}{{{c.device_labels(g0)},{unknown}}}" not in text  # no figure: no sample, not a zero
    assert line(c, sm, g0, a, "0.35") in text
    assert line(c, sm, g0, b, "0.4") in text
    assert line(c, "gpuhealth_pod_memory_utilization_ratio", g0, b, "0.2") in text
    assert line(c, "gpuhealth_pod_encoder_utilization_ratio", g0, a, "0") in text
    assert line(c, "gpuhealth_gpu_processes", g0, 'in_pod="true"', "3") in text
    assert line(c, "gpuhealth_gpu_processes", g0, 'in_pod="false"', "2") in text
    # the MIG instance carries its own series, with its MIG labels
    assert line(c, mem, mig_uuid(1, 1), b, str(GIB)) in text
    assert "gpu_i_id=" in c.device_labels(mig_uuid(1, 1))
    # every family has its header, and nothing but declared families is written
    for f in FAMILIES:
        assert f.header in text
    names = {ln.split("{")[0] for ln in text.splitlines() if not ln.startswith("#")}
    assert names <= {f.name for f in FAMILIES}


def test_no_pod_watch_still_reports_pods_with_empty_names(tmp_path: Path) -> None:
    share, _proc, _pods = setup(tmp_path)
    share.on_snapshot(snap(SHARED, 1.0))
    text = share.render_metrics(ctx())
    assert 'scope="pod",namespace="",pod="",container=""} 6442450944\n' in text  # a's 4 GiB + b's 2 GiB


def test_names_follow_the_pod_watch_without_a_new_process_read(tmp_path: Path) -> None:
    share, _proc, pods = setup(tmp_path)
    share.on_snapshot(snap(SHARED, 1.0))
    pods.set(pod("a", UID_A, CID_A))
    share.on_snapshot(snap(SHARED, 1.0))  # the same read (--process-interval > 1)
    assert 'pod="a",container="main"}' in share.render_metrics(ctx())
    assert share.resolver.cgroup_reads == 4  # no cgroup file read twice


def test_per_pid_adds_the_pid(tmp_path: Path) -> None:
    share, _proc, pods = setup(tmp_path, per_pid=True)
    pods.set(pod("a", UID_A, CID_A))
    share.on_snapshot(snap(SHARED, 1.0))
    text = share.render_metrics(ctx())
    assert 'pod="a",container="main",pid="101"} 3221225472\n' in text
    assert 'pod="a",container="main",pid="102"} 1073741824\n' in text


def test_a_failed_query_is_absent_and_utilisation_is_capped(tmp_path: Path) -> None:
    share, _proc, _pods = setup(tmp_path)
    busy = (GpuProcess(101, "compute", 1, sm_util=80.0), GpuProcess(102, "compute", 1, sm_util=70.0))
    share.on_snapshot(snap({gpu_uuid(1): busy}, 2.0))  # GPU 0's query failed: absent
    c = ctx()
    text = share.render_metrics(c)
    assert c.device_labels(gpu_uuid(0)) not in text
    assert "gpuhealth_pod_sm_utilization_ratio{" + c.device_labels(gpu_uuid(1)) in text
    assert 'container=""} 1\n' in text  # 150 % of samples is a full GPU, not more


def test_gpus_json_lists_processes_with_pod_or_host(tmp_path: Path) -> None:
    share, _proc, pods = setup(tmp_path)
    pods.set(pod("a", UID_A, CID_A), pod("b", UID_B, CID_B))
    devices = [{"uuid": gpu_uuid(0), "state": "healthy"}, {"uuid": gpu_uuid(1), "state": "healthy"}]
    assert [d["processes"] for d in share.add_processes(devices)] == [None, None]  # not read yet
    share.on_snapshot(snap(SHARED, 1.0))
    g0, g1 = share.add_processes(devices)
    assert g0["state"] == "healthy" and g1["processes"] is None
    by_pid = {p["pid"]: p for p in g0["processes"]}
    assert by_pid[101] | {} == {
        "pid": 101, "kind": "compute", "used_memory_bytes": 3 * GIB, "sm_util": 30.0, "mem_util": 10.0,
        "enc_util": 0.0, "dec_util": 0.0, "scope": "pod", "namespace": "team", "pod": "a", "container": "main",
        "pod_uid": UID_A, "container_id": CID_A}  # fmt: skip
    assert (by_pid[301]["scope"], by_pid[999]["scope"], by_pid[201]["pod"]) == ("host", "unknown", "b")


def test_a_reused_pid_moves_to_its_new_pod(tmp_path: Path) -> None:
    share, proc, pods = setup(tmp_path)
    pods.set(pod("a", UID_A, CID_A), pod("b", UID_B, CID_B))
    one = {gpu_uuid(0): (GpuProcess(101, "compute", GIB),)}
    share.on_snapshot(snap(one, 1.0))
    proc.place(101, v2_file(systemd_path(UID_B, CID_B)), start_time=5000)  # a's process ended; b got PID 101
    share.on_snapshot(snap(one, 2.0))
    text = share.render_metrics(ctx())
    assert 'pod="b",container="main"} 1073741824\n' in text
    assert 'pod="a"' not in text


def test_on_without_k_imports_neither_grpc_nor_kubernetes(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from exporter.app import App\n"
        "from exporter.config import parse_config\n"
        f"args = ['--simulate', '--state-dir', {str(tmp_path)!r}, '--process-metrics', 'per-pod']\n"
        "app = App(parse_config(args, environ={}))\n"
        "assert app.gpushare is not None\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'kubernetes'))\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=60)
    assert r.returncode == 0, r.stderr


def test_a_host_proc_that_is_not_a_directory_is_exit_2_with_the_flag_named(tmp_path: Path) -> None:
    args = ["--simulate", "--state-dir", str(tmp_path / "s"), "--process-metrics", "per-pod"]
    r = run_exporter([*args, "--host-proc", str(tmp_path / "missing")])
    assert r.returncode == 2, r.stderr
    assert f"--host-proc {tmp_path / 'missing'}: not a directory" in r.stderr
    assert "Traceback" not in r.stderr
