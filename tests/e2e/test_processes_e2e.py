"""Who uses how much of a shared GPU, end to end: the real daemon (--process-metrics) on the fake NVML,
whose process lists carry the PIDs of real processes this test starts, placed in a fake host /proc
(--host-proc) whose cgroup files name their pods (cgroup v2 with the systemd driver, v1 with cgroupfs),
named through the fake API server's pods and the fake kubelet's PodResources. Asserted on /metrics
and /gpus, as a user sees them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.nvmlnode import NvmlNode
from tests.fakeapiserver import FakeApiServer
from tests.fakekubelet import FakeKubelet
from tests.fakenvmllib import FakeNvmlBuild, load_scenario
from tests.pods.fakeproc import FakeProc, cgroupfs_path, systemd_path, v1_file, v2_file

GPU_RESOURCE = "nvidia.com/gpu"
MIB = 1 << 20
MEMORY = "gpuhealth_pod_gpu_memory_used_bytes"
SM = "gpuhealth_pod_sm_utilization_ratio"


@dataclass(frozen=True)
class Workload:
    namespace: str
    pod: str
    container: str
    uid: str
    container_id: str

    def api_object(self) -> dict[str, Any]:
        status = {"containerStatuses": [{"name": self.container, "containerID": f"containerd://{self.container_id}"}]}
        meta = {"name": self.pod, "namespace": self.namespace, "uid": self.uid}
        return {"metadata": meta, "spec": {"nodeName": "test-node"}, "status": status}


ALPHA = Workload("team-a", "alpha", "train", "a0000000-0000-4000-8000-00000000000a", "aa" * 32)
BETA = Workload("team-b", "beta", "infer", "b0000000-0000-4000-8000-00000000000b", "bb" * 32)


def series(text: str, family: str) -> dict[tuple[str, str, str, str], float]:
    """(scope, namespace, pod, container) -> value, for GPU 0's series of a family."""
    out = {}
    for line in text.splitlines():
        if line.startswith(family + "{") and 'gpu="0"' in line:
            labels = dict(kv.split("=", 1) for kv in line[len(family) + 1 : line.rindex("}")].split(","))
            key = tuple(labels[k].strip('"') for k in ("scope", "namespace", "pod", "container"))
            out[key] = float(line.rsplit(" ", 1)[1])
    return out  # type: ignore[return-value]


class SharedGpu:
    """One time-sliced GPU, two pods with a process each, a host process, the daemon watching."""

    def __init__(self, build: FakeNvmlBuild, tmp: Path, short: str, *, kubernetes: bool) -> None:
        self.workers = {name: subprocess.Popen(["sleep", "600"]) for name in ("alpha", "beta", "host")}
        self.pid = {name: p.pid for name, p in self.workers.items()}
        self.proc = FakeProc(tmp / "hostproc")
        self.proc.place(self.pid["alpha"], v2_file(systemd_path(ALPHA.uid, ALPHA.container_id)))
        self.proc.place(self.pid["beta"], v1_file(cgroupfs_path(BETA.uid, BETA.container_id)))
        self.proc.place(self.pid["host"], v2_file("/system.slice/nvidia-persistenced.service"))
        scenario = load_scenario("h100x8")
        scenario["devices"] = scenario["devices"][:1]
        self.gpu0 = scenario["devices"][0]["uuid"]
        scenario["devices"][0]["processes"] = [
            {"pid": self.pid["alpha"], "used_memory_mib": 4096, "sm": 40, "mem": 20},
            {"pid": self.pid["beta"], "used_memory_mib": 2048, "sm": 25, "mem": 5},
            {"pid": self.pid["host"], "used_memory_mib": 512, "kind": "graphics"},
        ]
        args = ["-c", "200", "--process-metrics", "per-pod", "--host-proc", str(self.proc.root)]
        self.kubelet: FakeKubelet | None = None
        self.api: FakeApiServer | None = None
        if kubernetes:
            # Time-slicing: the kubelet hands the one GPU to both pods.
            self.kubelet = FakeKubelet(os.path.join(short, "kubelet.sock"))
            self.kubelet.set_pods([
                {"name": w.pod, "namespace": w.namespace, "containers": [{"name": w.container, "devices": [
                    {"resource_name": GPU_RESOURCE, "device_ids": [self.gpu0]}]}]}
                for w in (ALPHA, BETA)
            ])  # fmt: skip
            self.kubelet.start()
            self.api = FakeApiServer().start()
            for w in (ALPHA, BETA):
                self.api.upsert_pod(w.api_object())
            args += ["-k", "--pod-resources-kubelet-socket", self.kubelet.socket_path]
            args += ["--kubernetes-shared-gpus", "per-pod"]
            args += ["--kubeconfig", self.api.write_kubeconfig(os.path.join(short, "kubeconfig"))]
        self.node = NvmlNode(build, tmp / "node", scenario, args)

    def close(self) -> None:
        try:
            assert self.node.exporter.stop() == 0
        finally:
            for p in self.workers.values():
                p.kill()
                p.wait()
            if self.kubelet is not None:
                self.kubelet.stop()
            if self.api is not None:
                self.api.stop()

    def gpus(self) -> dict[int, dict[str, Any]]:
        status, body = self.node.exporter.get("/gpus")
        assert status == 200
        device = next(d for d in json.loads(body)["devices"] if d["uuid"] == self.gpu0)
        return {p["pid"]: p for p in device["processes"] or []}


@pytest.fixture
def shared(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> Iterator[SharedGpu]:
    short = tempfile.mkdtemp(prefix="ghe-gs-", dir="/tmp")  # unix socket paths: 107 bytes at most
    node = SharedGpu(fakenvml_build, tmp_path, short, kubernetes=True)
    try:
        node.node.exporter.wait_ready()
        yield node
    finally:
        node.close()
        shutil.rmtree(short, ignore_errors=True)


def pod_key(w: Workload) -> tuple[str, str, str, str]:
    return ("pod", w.namespace, w.pod, w.container)


HOST = ("host", "", "", "")
UNKNOWN = ("unknown", "", "", "")


def test_two_pods_on_one_time_sliced_gpu_each_see_their_own_memory_and_sm(shared: SharedGpu) -> None:
    exp = shared.node.exporter
    text = exp.wait_for(lambda t: len(series(t, MEMORY)) == 3 and pod_key(BETA) in series(t, MEMORY), timeout=30)
    assert series(text, MEMORY) == {pod_key(ALPHA): 4096 * MIB, pod_key(BETA): 2048 * MIB, HOST: 512 * MIB}
    text = exp.wait_for(lambda t: pod_key(ALPHA) in series(t, SM) and pod_key(BETA) in series(t, SM))
    assert (series(text, SM)[pod_key(ALPHA)], series(text, SM)[pod_key(BETA)]) == (0.4, 0.25)
    assert 'gpuhealth_gpu_processes{gpu="0"' in text
    assert shared.node.value(text, "gpuhealth_gpu_processes", gpu="0", in_pod="true") == 2
    assert shared.node.value(text, "gpuhealth_gpu_processes", gpu="0", in_pod="false") == 1
    procs = shared.gpus()
    alpha, beta, host = (procs[shared.pid[n]] for n in ("alpha", "beta", "host"))
    assert (alpha["namespace"], alpha["pod"], alpha["container"], alpha["used_memory_bytes"]) == (
        "team-a", "alpha", "train", 4096 * MIB)  # fmt: skip
    assert (beta["pod"], beta["pod_uid"], beta["container_id"]) == ("beta", BETA.uid, BETA.container_id)
    assert (host["scope"], host["pod"], host["kind"]) == ("host", "", "graphics")


def test_a_reused_pid_is_charged_to_its_new_pod_and_an_ended_process_leaves(shared: SharedGpu) -> None:
    exp = shared.node.exporter
    exp.wait_for(lambda t: pod_key(ALPHA) in series(t, MEMORY), timeout=30)
    # alpha's process ends and the kernel hands its PID to a new process of beta (a new start time).
    shared.proc.place(shared.pid["alpha"], v2_file(systemd_path(BETA.uid, BETA.container_id)), start_time=99999)
    text = exp.wait_for(lambda t: pod_key(ALPHA) not in series(t, MEMORY))
    assert series(text, MEMORY)[pod_key(BETA)] == (4096 + 2048) * MIB
    # beta's processes end; NVML lists the host process and one whose /proc entry is missing (it ended
    # between NVML's list and our read, or --host-proc is wrong): unknown, never a pod's, never dropped.
    host = {"pid": shared.pid["host"], "used_memory_mib": 512, "kind": "graphics"}
    shared.node.control("processes", gpu=0, processes=[host, {"pid": 4000000, "used_memory_mib": 256}])
    text = exp.wait_for(lambda t: series(t, MEMORY) == {HOST: 512 * MIB, UNKNOWN: 256 * MIB})
    assert shared.node.value(text, "gpuhealth_gpu_processes", gpu="0", in_pod="true") == 0
    assert shared.node.value(text, "gpuhealth_gpu_processes", gpu="0", in_pod="false") == 2
    assert {pid: p["scope"] for pid, p in shared.gpus().items()} == {shared.pid["host"]: "host", 4000000: "unknown"}


def test_without_the_api_server_processes_are_still_reported(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = SharedGpu(fakenvml_build, tmp_path, str(tmp_path), kubernetes=False)
    try:
        exp = node.node.exporter
        exp.wait_ready()
        text = exp.wait_for(lambda t: len(series(t, MEMORY)) == 2, timeout=30)
        # Both pods' processes are in a pod; without names they add up in one series, never called host.
        assert series(text, MEMORY) == {("pod", "", "", ""): 6144 * MIB, HOST: 512 * MIB}
    finally:
        node.close()


def test_off_queries_nothing_and_serves_nothing_new(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:1]
    node = NvmlNode(fakenvml_build, tmp_path, scenario, ["-c", "200"])
    exp = node.exporter
    try:
        exp.wait_ready()
        text = exp.metrics()
        assert "gpuhealth_pod_gpu_memory_used_bytes" not in text and "gpuhealth_gpu_processes" not in text
        status, body = exp.get("/gpus")
        assert status == 200 and all("processes" not in d for d in json.loads(body)["devices"])
    finally:
        assert exp.stop() == 0


# ----------------------------------------------- the NVML side (helper F1): lists, MIG, old drivers, hangs


def gpus_processes(exp: Any) -> dict[str, list[dict[str, Any]] | None]:
    """/gpus: device UUID -> its processes as served (None: not read, or the query failed)."""
    status, body = exp.get("/gpus")
    assert status == 200, body
    return {d["uuid"]: d.get("processes") for d in json.loads(body)["devices"]}


def wait_gpus(exp: Any, predicate: Any, timeout: float = 20.0) -> dict[str, list[dict[str, Any]] | None]:
    """Poll /gpus until predicate(uuid -> processes) holds; returns that view."""
    import time  # here, not at the top: this part of the file is appended by another helper

    deadline = time.monotonic() + timeout
    view = gpus_processes(exp)
    while not predicate(view):
        assert time.monotonic() < deadline, f"/gpus never matched: {view}\nlogs:\n{exp.logs()}"
        time.sleep(0.1)
        view = gpus_processes(exp)
    return view


def collections(text: str) -> float:
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("gpuhealth_collections_total "))


def pids_of(view: dict[str, list[dict[str, Any]] | None], uuid: str) -> list[int] | None:
    listed = view.get(uuid)
    return None if listed is None else sorted(p["pid"] for p in listed)


def test_mig_instances_show_their_own_processes_per_pid(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    scenario = load_scenario("mig")
    gpu = scenario["devices"][0]
    instances = {i["uuid"]: [p["pid"] for p in i["processes"]] for i in gpu["mig"]["instances"]}
    plain = scenario["devices"][1]
    node = NvmlNode(fakenvml_build, tmp_path, scenario, ["-c", "200", "--process-metrics", "per-pid"])
    exp = node.exporter
    try:
        exp.wait_ready()
        view = wait_gpus(exp, lambda v: all(v.get(u) is not None for u in [*instances, plain["uuid"]]))
        for uuid, pids in instances.items():
            assert pids_of(view, uuid) == sorted(pids), uuid  # each instance its own, the idle one none
        assert pids_of(view, plain["uuid"]) == [8051]
        (p8051,) = view[plain["uuid"]] or []
        assert (p8051["kind"], p8051["used_memory_bytes"]) == ("compute", 16384 * MIB)
        # a process's memory is charged once: not to the MIG-enabled GPU as well as to its instance
        assert not view.get(gpu["uuid"])
    finally:
        assert exp.stop() == 0


def test_an_r470_driver_lists_processes_through_the_older_calls(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    scenario = load_scenario("olddriver")
    node = NvmlNode(fakenvml_build, tmp_path, scenario, ["-c", "200", "--process-metrics", "per-pid"], old_driver=True)
    exp = node.exporter
    try:
        exp.wait_ready()
        uuids = [d["uuid"] for d in scenario["devices"]]
        view = wait_gpus(exp, lambda v: all(v.get(u) is not None for u in uuids))
        assert [pids_of(view, u) for u in uuids] == [[23101], [23102]]
        assert "FunctionNotFound" not in exp.logs()  # the missing _v3 forms fell back, nothing failed
    finally:
        assert exp.stop() == 0


def test_a_hung_process_query_leaves_that_gpu_without_a_list_and_everything_else_running(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path
) -> None:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:2]
    gpu0, gpu1 = (d["uuid"] for d in scenario["devices"])
    args = ["-c", "200", "--process-metrics", "per-pid", "--device-timeout", "500"]
    node = NvmlNode(fakenvml_build, tmp_path, scenario, args)
    exp = node.exporter
    try:
        exp.wait_ready()
        wait_gpus(exp, lambda v: pids_of(v, gpu0) == [41230, 52011] and pids_of(v, gpu1) == [41231])
        node.control("hang", gpu=0, call="nvmlDeviceGetComputeRunningProcesses", seconds=60)
        view = wait_gpus(exp, lambda v: v.get(gpu0) is None)
        assert pids_of(view, gpu1) == [41231]
        # collection keeps turning and GPU 0's own fields stay fresh: the hang is only the query's
        before = collections(exp.metrics())
        text = exp.wait_for(lambda t: collections(t) >= before + 5)
        assert node.value(text, "gpuhealth_device_up", gpu="0") == 1
        assert node.value(text, "DCGM_FI_DEV_GPU_TEMP", gpu="0") is not None
        node.control("clear", gpu=0, call="nvmlDeviceGetComputeRunningProcesses")
        wait_gpus(exp, lambda v: pids_of(v, gpu0) == [41230, 52011])
    finally:
        assert exp.stop() == 0
