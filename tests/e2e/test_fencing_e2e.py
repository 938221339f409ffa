"""Health verdicts reach the kubelet: fake NVML -> exporter -> device plugin -> fake kubelet.

The fake kubelet is a real gRPC Registration server on a unix socket that dials the
plugin back and records every ListAndWatch message, like the real one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deviceplugin.fakekubelet_registration import FakeKubelet, Received, running_kubelet
from tests.e2e.harness import ROOT
from tests.e2e.nvmlnode import NvmlNode
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

RESOURCE = "nvidia.com/gpu"


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    with running_kubelet() as k:
        yield k


def two_gpu_node(build: FakeNvmlBuild, tmp: Path, kubelet: FakeKubelet, *args: str) -> NvmlNode:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:2]
    return NvmlNode(
        build,
        tmp,
        scenario,
        ["-c", "500", "--device-plugin", "--device-plugin-dir", kubelet.plugin_dir, *args],
    )


def mig_node(build: FakeNvmlBuild, tmp: Path, kubelet: FakeKubelet, *args: str) -> NvmlNode:
    """The MIG scenario with the device plugin in mixed strategy (one resource per profile)."""
    plugin = ["--device-plugin", "--device-plugin-dir", kubelet.plugin_dir, "--mig-strategy", "mixed"]
    return NvmlNode(build, tmp, "mig", ["-c", "500", *plugin, *args])


def health_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", "health", *args],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def uuids(node: NvmlNode) -> list[str]:
    return [d["uuid"] for d in json.loads(node.exporter.get("/gpus")[1])["devices"] if "parent" not in d]


def test_fence_reaches_kubelet_within_a_second_and_survives_kill_9(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    node = two_gpu_node(fakenvml_build, tmp_path, kubelet, "--replicas", "2")
    exp = node.exporter
    exp.wait_ready()
    assert kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == 4, timeout=10), kubelet.errors
    gpu0, gpu1 = uuids(node)

    # XID 79 (fallen off the bus) on GPU 1: both of its replicas become Unhealthy within 1 s
    t0 = time.monotonic()
    node.control("xid", gpu=1, xid=79)
    assert kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == 2, timeout=1.0), "verdict not at kubelet in 1 s"
    latency = time.monotonic() - t0
    last = kubelet.latest(RESOURCE)
    assert last is not None
    assert {last.health_of(f"{gpu1}::{n}") for n in (0, 1)} == {"Unhealthy"}
    assert {last.health_of(f"{gpu0}::{n}") for n in (0, 1)} == {"Healthy"}
    assert last.ids == {f"{u}::{n}" for u in (gpu0, gpu1) for n in (0, 1)}  # capacity unchanged

    # /gpus and /metrics say why and what to do
    devices = {d["uuid"]: d for d in json.loads(exp.get("/gpus")[1])["devices"]}
    assert devices[gpu1]["state"] == "unhealthy" and devices[gpu0]["state"] == "healthy"
    assert any(r["signal"] == "xid" and r["code"] == "79" for r in devices[gpu1]["reasons"])
    assert devices[gpu1]["action"] not in ("", "none")
    text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 2)
    assert 'signal="xid",code="79",class="fence"' in text
    assert node.value(text, "DCGM_FI_DEV_XID_ERRORS", gpu="1") == 79

    # kill -9, start again: the very first ListAndWatch message already fences GPU 1
    exp.stop(signal.SIGKILL)
    seen = len(kubelet.registrations)
    exp = node.restart()
    assert kubelet.wait_for(lambda: len(kubelet.registrations) > seen, timeout=15), exp.logs()
    registered_at = kubelet.registrations[-1][0]

    def after_restart() -> list[Received]:
        return [m for m in kubelet.messages(RESOURCE) if m.at > registered_at]

    assert kubelet.wait_for(lambda: bool(after_restart()), timeout=5)
    first = next(iter(after_restart()))
    assert {first.health_of(f"{gpu1}::{n}") for n in (0, 1)} == {"Unhealthy"}
    exp.wait_ready()
    assert node.value(exp.metrics(), "gpuhealth_health_state", gpu="1") == 2
    # the XID counter did not lose its count across the restart
    assert 'xid="79",class="fence"} 1' in exp.metrics()

    # health list / clear through the local control socket
    listing = health_cli("list", "--state-dir", str(node.state_dir), "--json")
    assert listing.returncode == 0, listing.stderr
    assert gpu1 in listing.stdout and "unhealthy" in listing.stdout
    cleared = health_cli(
        "clear", "--gpu", gpu1, "--reason", "reseated and passed diagnostics", "--state-dir", str(node.state_dir)
    )
    assert cleared.returncode == 0, cleared.stderr
    assert kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == 4, timeout=2.0)
    exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 0)
    assert "reseated and passed diagnostics" in exp.logs()
    assert exp.stop() == 0
    assert latency < 1.0


def test_kubelet_restart_reregisters_and_resends(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    node = two_gpu_node(fakenvml_build, tmp_path, kubelet)
    exp = node.exporter
    try:
        exp.wait_ready()
        assert kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == 2, timeout=10)
        node.control("xid", gpu=0, xid=48)
        assert kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == 1, timeout=2)
        t0 = time.monotonic()
        kubelet.restart()  # sockets wiped, new kubelet.sock
        assert kubelet.wait_for(lambda: len(kubelet.registrations) == 1, timeout=1.5)
        assert kubelet.registrations[0][0] - t0 < 1.0
        assert kubelet.wait_for(lambda: kubelet.capacity(RESOURCE) == 2 and kubelet.allocatable(RESOURCE) == 1)
    finally:
        assert exp.stop() == 0


def test_mig_instance_xid_fences_only_that_instance(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    node = mig_node(fakenvml_build, tmp_path, kubelet)
    exp = node.exporter
    try:
        exp.wait_ready()
        res = "nvidia.com/mig-1g.10gb"
        assert kubelet.wait_for(lambda: kubelet.allocatable(res) == 2, timeout=10), kubelet.resources()
        # XID 31 (page fault) attributed to GPU instance 9: fences that MIG device only... when configured to
        # fence; by default 31 is an application error. XID 62 concerns the whole GPU: everything on GPU 0 goes.
        node.control("xid", gpu=0, xid=31, gi=9, ci=0)
        exp.wait_for(lambda t: node.value(t, "gpuhealth_xid_errors_total", gpu="0", xid="31") == 1, timeout=5)
        assert kubelet.allocatable(res) == 2  # judged (counted above) and not fenced
        node.control("xid", gpu=0, xid=62, gi=9, ci=0)
        assert kubelet.wait_for(lambda: kubelet.allocatable(res) == 0, timeout=1.0)
        assert kubelet.wait_for(lambda: kubelet.allocatable("nvidia.com/mig-3g.40gb") == 0, timeout=1.0)
    finally:
        assert exp.stop() == 0


def test_mig_instance_fence_with_attributed_xid(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    node = mig_node(fakenvml_build, tmp_path, kubelet, "--health-fence-xids", "31")
    exp = node.exporter
    try:
        exp.wait_ready()
        res = "nvidia.com/mig-1g.10gb"
        assert kubelet.wait_for(lambda: kubelet.allocatable(res) == 2, timeout=10)
        node.control("xid", gpu=0, xid=31, gi=9, ci=0)
        assert kubelet.wait_for(lambda: kubelet.allocatable(res) == 1, timeout=1.0)
        assert kubelet.allocatable("nvidia.com/mig-3g.40gb") == 1
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu_i_id="9") == 2)
        assert node.value(text, "gpuhealth_health_state", gpu_i_id="10") == 0
        assert node.value(text, "gpuhealth_health_state", gpu="0", gpu_i_id="2") == 0
    finally:
        assert exp.stop() == 0
