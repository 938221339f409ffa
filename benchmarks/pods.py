#!/usr/bin/env python3
"""Pod attribution benchmarks: what the kubelet mapping costs per cycle, and how often we call the kubelet.

    .venv/bin/python benchmarks/pods.py

- mapping cost: PodMapper in this process, the fake kubelet (tests/fakekubelet.py) in its own
  process, so the CPU measured is ours alone (gRPC client, protobuf decoding, mapping, labels_for
  for every device), not the fake's serialisation. One "cycle" = refresh() until the worker is
  idle, then labels_for on every GPU and MIG device.
- kubelet calls: the real exporter process on the fake NVML (h100x8; --simulate if the fake is
  not built) at a 1 s interval, scraped 5 times a second, against an in-process FakeKubelet
  whose `calls` counter is read before and after.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from google.protobuf import json_format  # noqa: E402

from benchmarks.common import FAKE_LIB, SCENARIOS, free_port, report  # noqa: E402
from exporter.labels import RenderContext  # noqa: E402
from exporter.model import Inventory  # noqa: E402
from exporter.pods import PodMapper, PodMappingConfig  # noqa: E402
from podresources.api.v1 import podresources_pb2 as v1_pb2  # noqa: E402
from tests.fakekubelet import FakeKubelet  # noqa: E402
from tests.pods.podfixtures import big_layout, gpu_uuid, make_inventory, mig_uuid  # noqa: E402

GPU = "nvidia.com/gpu"
MIG_1G = "nvidia.com/mig-1g.10gb"
MIG_GIS = (7, 8, 9, 10, 11, 12, 13)  # the 7 GPU instance ids of 1g.10gb on an H100


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit within 10 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------- layouts


def mig_node() -> tuple[Inventory, dict[str, Any]]:
    """110 pods (the kubelet's default max) on 8 GPUs x 7 MIG 1g.10gb (mixed strategy, MIG-<uuid> ids):
    56 pods with one MIG device each (plus a sidecar without devices), 54 pods without GPUs."""
    inv = make_inventory(8, mig={i: [(gi, "1g.10gb") for gi in MIG_GIS] for i in range(8)})
    migs = [mig_uuid(i, gi) for i in range(8) for gi in MIG_GIS]
    pods: list[dict[str, Any]] = []
    for p in range(110):
        containers: list[dict[str, Any]] = [{"name": "sidecar", "devices": [], "cpu_ids": [p % 64]}]
        if p < len(migs):
            containers.insert(0, {"name": "main", "devices": [{"resource_name": MIG_1G, "device_ids": [migs[p]]}]})
        else:
            containers.insert(
                0, {"name": "main", "devices": [{"resource_name": "example.com/nic", "device_ids": [f"nic-{p}"]}]}
            )
        pods.append({"name": f"pod-{p}", "namespace": f"ns-{p % 9}", "containers": containers})
    return inv, {"pods": pods, "allocatable": [{"resource_name": MIG_1G, "device_ids": migs}]}


def big_node() -> tuple[Inventory, dict[str, Any]]:
    """200 pods x 8 containers with SR-IOV devices and 64 CPUs each on 8 GPUs: a List reply over 4 MiB."""
    allocatable = [{"resource_name": GPU, "device_ids": [gpu_uuid(i) for i in range(8)]}]
    return make_inventory(8), {"pods": big_layout(200, 8), "allocatable": allocatable}


def reply_bytes(layout: dict[str, Any]) -> int:
    return int(json_format.ParseDict({"pod_resources": layout["pods"]}, v1_pb2.ListPodResourcesResponse()).ByteSize())


@contextmanager
def kubelet_process(layout: dict[str, Any]) -> Iterator[str]:
    """tests/fakekubelet.py in its own process (its CPU is not ours); yields the socket path."""
    d = tempfile.mkdtemp(prefix="ghe-kb-", dir="/tmp")
    sock = os.path.join(d, "kubelet.sock")
    layout_path = os.path.join(d, "layout.json")
    with open(layout_path, "w") as fh:
        json.dump(layout, fh)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fakekubelet.py"), "--socket", sock, "--layout", layout_path],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fake kubelet did not start")
            time.sleep(0.05)
        yield sock
    finally:
        _terminate(proc)
        shutil.rmtree(d, ignore_errors=True)


def devices_of(inv: Inventory) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for g in inv.gpus:
        out.append((g.uuid, None))
        out.extend((g.uuid, m.gpu_instance_id) for m in g.migs)
    return out


def measure_mapping(label: str, inv: Inventory, layout: dict[str, Any], seconds: float = 4.0) -> None:
    devices = devices_of(inv)
    ctx = RenderContext("Hostname", "node-1")
    ctx.rebuild(inv)
    with kubelet_process(layout) as sock:
        mapper = PodMapper(PodMappingConfig(socket_path=sock))
        try:

            def cycle() -> tuple[float, float, int]:
                c0, w0 = time.process_time(), time.perf_counter()
                mapper.refresh(inv)
                if not mapper.wait_idle(30):
                    raise RuntimeError("refresh did not finish")
                labelled = sum(1 for uuid, gi in devices if mapper.labels_for(uuid, gi))
                return time.process_time() - c0, time.perf_counter() - w0, labelled

            cold_cpu, cold_wall, labelled = cycle()
            if "pod_mapping_refresh_success 1" not in mapper.render_metrics(ctx):
                raise RuntimeError("refresh failed: " + mapper.render_metrics(ctx)[:500])
            cpu: list[float] = []
            wall: list[float] = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or len(cpu) < 5:
                c, w, labelled = cycle()
                cpu.append(c)
                wall.append(w)
            r0 = time.process_time()
            for _ in range(20):
                mapper.render_metrics(ctx)
            render_ms = (time.process_time() - r0) / 20 * 1e3
        finally:
            mapper.close()
    pods = len(layout["pods"])
    containers = sum(len(p["containers"]) for p in layout["pods"])
    report(
        "pods",
        f"{label}: pods / containers / devices / labelled",
        f"{pods} / {containers} / {len(devices)} / {labelled}",
    )
    report("pods", f"{label}: List reply (MiB)", f"{reply_bytes(layout) / 2**20:.2f}")
    report("pods", f"{label}: first cycle CPU / wall (ms)", f"{cold_cpu * 1e3:.1f} / {cold_wall * 1e3:.1f}")
    report(
        "pods",
        f"{label}: CPU per cycle, median / max (ms, {len(cpu)} cycles)",
        f"{statistics.median(cpu) * 1e3:.2f} / {max(cpu) * 1e3:.2f}",
    )
    report("pods", f"{label}: wall per cycle, median (ms)", f"{statistics.median(wall) * 1e3:.2f}")
    report("pods", f"{label}: render_metrics (own families) CPU (ms)", f"{render_ms:.3f}")


# --------------------------------------------------------------------------- the exporter process


def _exporter(sock: str, state: str) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NODE_NAME": "bench-node"}
    if FAKE_LIB.is_file():
        backend = ["--nvml-library", str(FAKE_LIB)]
        env["FAKENVML_CONFIG"] = str(SCENARIOS / "h100x8.json")
        name = "fake NVML h100x8"
    else:
        backend, name = ["--simulate"], "simulated 8x H100"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exporter",
            "-a",
            f"127.0.0.1:{port}",
            "--state-dir",
            state,
            "--log-level",
            "warning",
            *backend,
            "-c",
            "1000",
            "-k",
            "--pod-resources-kubelet-socket",
            sock,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    return proc, port, name


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return bytes(r.read()).decode()


def _collections(text: str) -> float:
    m = re.search(r"^gpuhealth_collections_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def measure_kubelet_calls(seconds: float = 20.0, scrape_hz: float = 5.0) -> None:
    uuids = [d["uuid"] for d in json.loads((SCENARIOS / "h100x8.json").read_text())["devices"]]
    d = tempfile.mkdtemp(prefix="ghe-kc-", dir="/tmp")
    fake = FakeKubelet(os.path.join(d, "kubelet.sock"))
    fake.set_pods(
        [
            {
                "name": f"pod-{p}",
                "namespace": "ns",
                "containers": [
                    {
                        "name": "c",
                        "devices": ([{"resource_name": GPU, "device_ids": [uuids[p]]}] if p < len(uuids) else []),
                    }
                ],
            }
            for p in range(110)
        ]
    )
    fake.set_allocatable([{"resource_name": GPU, "device_ids": uuids}])
    fake.start()
    proc, port, backend = _exporter(fake.socket_path, os.path.join(d, "state"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if 'pod="pod-0"' in _scrape(port):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("exporter did not start or map pods")
            time.sleep(0.1)
        calls0, cycles0, t0 = dict(fake.calls), _collections(_scrape(port)), time.monotonic()
        scrapes = 0
        while time.monotonic() - t0 < seconds:
            _scrape(port)
            scrapes += 1
            time.sleep(1 / scrape_hz)
        text = _scrape(port)
        elapsed = time.monotonic() - t0
        calls = {k: v - calls0.get(k, 0) for k, v in fake.calls.items()}
        cycles = _collections(text) - cycles0
    finally:
        _terminate(proc)
        fake.stop()
        shutil.rmtree(d, ignore_errors=True)
    lists = calls.get("List", 0)
    report("pods", f"exporter ({backend}, 1 s interval, {scrapes} scrapes in {elapsed:.0f} s): cycles", f"{cycles:.0f}")
    report("pods", "kubelet List calls per minute", f"{lists / elapsed * 60:.1f}")
    report(
        "pods",
        "kubelet GetAllocatableResources calls per minute",
        f"{calls.get('GetAllocatableResources', 0) / elapsed * 60:.1f}",
    )
    report("pods", "List calls per collection cycle (at most 1)", f"{lists / max(cycles, 1):.2f}")
    report("pods", "List calls per scrape (dcgm-exporter: 1)", f"{lists / max(scrapes, 1):.2f}")


def bench_pods(call_seconds: float = 20.0, mapping_seconds: float = 4.0) -> None:
    print("pod attribution (PodMapper in-process, fake kubelet in its own process)")
    inv, layout = mig_node()
    measure_mapping("110 pods, 8 GPUs x 7 MIG", inv, layout, mapping_seconds)
    inv, layout = big_node()
    measure_mapping("200 pods x 8 containers, 8 GPUs", inv, layout, mapping_seconds)
    print(f"kubelet calls (exporter process, in-process fake kubelet, {call_seconds:.0f} s)")
    measure_kubelet_calls(call_seconds)


if __name__ == "__main__":
    t_start = time.monotonic()
    bench_pods()
    print(f"  {'(pods benchmark runtime, s)':<62} {time.monotonic() - t_start:.1f}")
