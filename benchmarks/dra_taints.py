#!/usr/bin/env python3
"""XID -> DeviceTaintRule in the API: how long a fence takes to reach the scheduler through DRA.

    .venv/bin/python benchmarks/dra_taints.py [--fences 100] [--version v1beta2]

The real exporter process on the fake NVML (h100x8: 8 GPUs; `make -C tests/fakenvml` first) with
--dra-device-taints, against tests/fakeapiserver.py in this process serving DeviceTaintRule and a
ResourceSlice like NVIDIA's DRA driver publishes (pool = node, gpu-<minor>, a uuid attribute).
Each round injects XID 48 on one GPU through the fake's control file and polls the fake server's
store (every 0.5 ms) until that GPU's rule is there: the time measured includes the fake NVML
delivering the event, the health engine's synchronous state write, discovery-free reconcile (one
POST) and the HTTP round trip. The GPU is then cleared through the control socket and the round
waits for the rule to be deleted, so every round is a fresh fence (>= 100 in all by default).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import FAKE_LIB, SCENARIOS, free_port, report, wait_ready  # noqa: E402
from exporter.health.control import CONTROL_SOCKET, request  # noqa: E402
from tests.fakeapiserver import FakeApiServer  # noqa: E402

NODE = "bench-node"
DRIVER = "gpu.nvidia.com"
SECTION = "DRA device taints"


def _slice(devices: list[dict[str, Any]]) -> dict[str, Any]:
    published = [{"name": f"gpu-{d['minor']}", "attributes": {"uuid": {"string": d["uuid"]}}} for d in devices]
    spec = {"driver": DRIVER, "nodeName": NODE, "pool": {"name": NODE, "generation": 1, "resourceSliceCount": 1}}
    return {"metadata": {"name": f"{NODE}-{DRIVER}-bench"}, "spec": {**spec, "devices": published}}


def _rule_devices(api: FakeApiServer) -> set[str]:
    return {r["spec"]["deviceSelector"]["device"] for r in api.rules().values()}


def _wait(cond: Any, timeout_s: float, what: str) -> float:
    """Poll `cond` every 0.5 ms; the monotonic time it first held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if cond():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.0005)


def bench_dra_taints(fences: int = 100, version: str = "v1beta2") -> None:
    print(f"\n{SECTION} (XID -> DeviceTaintRule created, {fences} fences, resource.k8s.io/{version})")
    if not FAKE_LIB.is_file():
        print("  skipped: the fake NVML is not built (make -C tests/fakenvml)")
        return
    scenario = json.loads((SCENARIOS / "h100x8.json").read_text())
    devices = scenario["devices"]
    tmp = Path(tempfile.mkdtemp(prefix="ghe-bench-dra-", dir="/tmp"))
    control = tmp / "control.jsonl"
    control.touch()
    state = tmp / "state"
    api = FakeApiServer(dra_taint_versions=(version,)).start()
    api.upsert_resource_slice(_slice(devices))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NODE_NAME": NODE}
    env.update(FAKENVML_CONFIG=str(SCENARIOS / "h100x8.json"), FAKENVML_CONTROL=str(control))
    log = tmp / "exporter.log"
    args = [sys.executable, "-m", "exporter", "-a", f"127.0.0.1:{port}", "--state-dir", str(state)]
    args += ["--nvml-library", str(FAKE_LIB), "-c", "1000", "--log-level", "warning"]
    args += ["--kubeconfig", api.write_kubeconfig(tmp / "kubeconfig"), "--dra-device-taints"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/ready", "exporter", log)
        latencies: list[float] = []
        for i in range(fences):
            gpu = i % len(devices)
            name = f"gpu-{devices[gpu]['minor']}"
            with open(control, "a") as fh:
                t0 = time.monotonic()
                fh.write(json.dumps({"op": "xid", "gpu": gpu, "xid": 48}) + "\n")
            t1 = _wait(lambda: name in _rule_devices(api), 10, f"the rule for {name}")  # noqa: B023
            latencies.append(t1 - t0)
            resp = request(state / CONTROL_SOCKET, {"op": "clear", "target": devices[gpu]["uuid"], "reason": "bench"})
            if not resp.get("ok"):
                raise RuntimeError(f"clear failed: {resp}")
            _wait(lambda: name not in _rule_devices(api), 10, f"{name}'s rule deleted")  # noqa: B023
        ms = sorted(x * 1000 for x in latencies)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        report(SECTION, "XID -> DeviceTaintRule in the API, p50 (ms)", f"{statistics.median(ms):.1f}")
        report(SECTION, "XID -> DeviceTaintRule in the API, p99 (ms)", f"{p99:.1f}")
        report(SECTION, "XID -> DeviceTaintRule in the API, max (ms)", f"{ms[-1]:.1f}")
        report(SECTION, "fences measured", str(len(ms)))
        report(SECTION, "p99 under the 1 s goal", "yes" if p99 < 1000 else "NO")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        api.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--fences", type=int, default=100, help="fences to measure (default 100)")
    parser.add_argument("--version", default="v1beta2", choices=("v1alpha3", "v1beta2", "v1"))
    args = parser.parse_args(argv)
    if args.fences < 1:
        parser.error("--fences must be at least 1")
    bench_dra_taints(args.fences, args.version)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
