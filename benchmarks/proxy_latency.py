"""XID -> Unhealthy at the kubelet through the device plugin proxy, and a clear -> Healthy again.

    .venv/bin/python benchmarks/proxy_latency.py [--rounds 200]

The chain measured, every part a real process or real gRPC on unix sockets: an XID 79 appended to the
fake NVML's control file -> the daemon (`-c 1000`, h100x8) fences the GPU -> its verdict stream ->
`gpu-health-exporter device-plugin-proxy` -> the kubelet's ListAndWatch (the fake kubelet of the
tests) shows the GPU Unhealthy. A stand-in NVIDIA plugin (tests/proxy/standin.py) lists the 8 GPUs
to the proxy. Each round then clears the fence over the control socket and times the GPU coming back
Healthy. The goal (issue #12): p99 under 100 ms for XID -> Unhealthy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import FAKE_LIB, SCENARIOS, report
from exporter.health.control import request
from tests.deviceplugin.fakekubelet_registration import FakeKubelet
from tests.e2e.harness import ExporterProcess
from tests.proxy.standin import StandInPlugin

RESOURCE = "nvidia.com/gpu"
SECTION = "proxy"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(values: list[float]) -> str:
    return f"{percentile(values, 0.5) * 1e3:.1f} / {percentile(values, 0.99) * 1e3:.1f} / {max(values) * 1e3:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200, help="fences and clears (each one XID, one clear)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="ghe-bench-proxy-", dir="/tmp"))
    kubelet = FakeKubelet(str(tmp / "kubelet")).start()
    upstream_dir = tmp / "up"
    upstream_dir.mkdir()
    control = tmp / "control.jsonl"
    control.touch()
    env = {"FAKENVML_CONFIG": str(SCENARIOS / "h100x8.json"), "FAKENVML_CONTROL": str(control)}
    daemon = ExporterProcess(["--nvml-library", str(FAKE_LIB), "-c", "1000"], tmp / "daemon", env)
    proxy: ExporterProcess | None = None
    plugin: StandInPlugin | None = None
    print(f"proxy: fake NVML (h100x8) -> daemon -> verdict stream -> proxy -> fake kubelet, {args.rounds} rounds")
    try:
        daemon.wait_ready()
        devices = json.loads(daemon.get("/gpus")[1])["devices"]
        index_of = {d["uuid"]: d["index"] for d in devices if "parent" not in d}
        uuids = sorted(index_of)
        plugin = StandInPlugin(str(upstream_dir), uuids).start()
        proxy = ExporterProcess(
            [
                "--nvml-library",
                str(FAKE_LIB),
                "--upstream-dir",
                str(upstream_dir),
                "--device-plugin-dir",
                kubelet.plugin_dir,
            ],
            tmp / "proxy",
            env,
            state_dir=daemon.state_dir,
            subcommand="device-plugin-proxy",
        )
        proxy.wait_ready()
        if not kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == len(uuids), timeout=20):
            raise RuntimeError(f"the kubelet never saw {len(uuids)} healthy GPUs: {proxy.logs()[-2000:]}")

        def health(uuid: str) -> str | None:
            last = kubelet.latest(RESOURCE)
            return last.health_of(uuid) if last is not None else None

        def unhealthy(uuid: str) -> Callable[[], bool]:
            return lambda: health(uuid) == "Unhealthy"

        fence: list[float] = []
        clear: list[float] = []
        for i in range(args.rounds):
            uuid = uuids[i % len(uuids)]
            t0 = time.monotonic()
            with open(control, "a") as fh:
                fh.write(json.dumps({"op": "xid", "gpu": index_of[uuid], "xid": 79}) + "\n")
            if not kubelet.wait_for(unhealthy(uuid), timeout=5):
                raise RuntimeError(f"round {i}: {uuid} never turned Unhealthy at the kubelet")
            fence.append(time.monotonic() - t0)
            t0 = time.monotonic()
            request(daemon.state_dir / "control.sock", {"op": "clear", "target": uuid, "reason": "benchmark"})
            if not kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == len(uuids), timeout=5):
                raise RuntimeError(f"round {i}: {uuid} never came back Healthy at the kubelet")
            clear.append(time.monotonic() - t0)
        report(
            SECTION,
            f"XID 79 -> kubelet Unhealthy via the proxy, {args.rounds} XIDs: p50 / p99 / max (ms)",
            figures(fence),
        )
        report(
            SECTION,
            f"clear -> kubelet Healthy via the proxy, {args.rounds} clears: p50 / p99 / max (ms)",
            figures(clear),
        )
        goal = percentile(fence, 0.99) < 0.100
        report(SECTION, "goal: XID -> Unhealthy p99 under 100 ms", "met" if goal else "NOT met")
        return 0 if goal else 1
    finally:
        if proxy is not None:
            proxy.stop()
        if plugin is not None:
            plugin.stop()
        daemon.stop()
        kubelet.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
