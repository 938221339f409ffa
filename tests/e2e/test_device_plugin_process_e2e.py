"""`gpu-health-exporter device-plugin` as its own process beside the daemon, as the chart runs them:
the same state directory, the fake NVML for both, a fake kubelet with real gRPC on unix sockets."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deviceplugin.fakekubelet_registration import FakeKubelet, running_kubelet
from tests.e2e.harness import ExporterProcess
from tests.e2e.nvmlnode import NvmlNode
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

RESOURCE = "nvidia.com/gpu"


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    with running_kubelet() as k:
        yield k


def daemon(build: FakeNvmlBuild, tmp: Path) -> NvmlNode:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:2]
    return NvmlNode(build, tmp, scenario, ["-c", "500"])


def plugin(node: NvmlNode, kubelet: FakeKubelet, tmp: Path) -> ExporterProcess:
    return ExporterProcess(
        ["--nvml-library", str(node.lib), "--device-plugin-dir", kubelet.plugin_dir],
        tmp,
        node.env,
        state_dir=node.state_dir,
        subcommand="device-plugin",
    )


def ready_reason(p: ExporterProcess) -> str:
    status, body = p.get("/ready")
    return "" if status == 200 else body.decode()


def test_plugin_process_follows_verdicts_and_outlives_the_daemon(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    node = daemon(fakenvml_build, tmp_path / "daemon")
    node.exporter.wait_ready()
    dp = plugin(node, kubelet, tmp_path / "plugin")
    try:
        dp.wait_ready()  # registered and hearing the daemon
        assert kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == 2, timeout=10), kubelet.errors
        gpu1 = json.loads(node.exporter.get("/gpus")[1])["devices"][1]["uuid"]

        # A fence in the daemon reaches the kubelet through the stream and the plugin process in 1 s.
        t0 = time.monotonic()
        node.control("xid", gpu=1, xid=79)
        assert kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == 1, timeout=2.0), dp.logs()
        latency = time.monotonic() - t0
        last = kubelet.latest(RESOURCE)
        assert last is not None and last.health_of(gpu1) == "Unhealthy"

        # The daemon dies (kill -9): the plugin stays registered and keeps GPU 1 fenced.
        registrations = len(kubelet.registrations)
        node.exporter.stop(signal.SIGKILL)
        assert kubelet.wait_for(lambda: "keeping its last verdicts" in ready_reason(dp), timeout=10)
        assert dp.get("/health")[0] == 200  # alive: the exporter's fate does not restart it
        assert kubelet.allocatable(RESOURCE) == 1 and len(kubelet.registrations) == registrations
        assert not kubelet.errors

        # The daemon comes back: the plugin hears it again and is ready.
        node.restart().wait_ready()
        assert kubelet.wait_for(lambda: ready_reason(dp) == "", timeout=15), ready_reason(dp)
        assert kubelet.allocatable(RESOURCE) == 1
    finally:
        dp.stop()
        node.exporter.stop()
    assert latency < 1.0


def test_plugin_started_without_a_daemon_never_advertises_a_fenced_gpu(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    node = daemon(fakenvml_build, tmp_path / "daemon")
    node.exporter.wait_ready()
    node.control("xid", gpu=0, xid=79)
    node.exporter.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="0") == 2)
    assert node.exporter.stop() == 0  # the fence is on disk; no daemon now
    seen = len(kubelet.registrations)
    dp = plugin(node, kubelet, tmp_path / "plugin")
    try:
        assert kubelet.wait_for(lambda: len(kubelet.registrations) > seen, timeout=20), dp.logs()
        assert kubelet.wait_for(lambda: kubelet.latest(RESOURCE) is not None, timeout=5)
        first = kubelet.messages(RESOURCE)[0]  # the very first message already fences GPU 0
        assert sorted(h for _, h, _ in first.devices) == ["Healthy", "Unhealthy"]
        assert "state file" in ready_reason(dp)
    finally:
        dp.stop()


def test_plugin_process_refuses_bad_flags_with_exit_2(tmp_path: Path) -> None:
    dp = ExporterProcess(["--replicas", "0"], tmp_path, subcommand="device-plugin")
    assert dp.proc.wait(30) == 2
    assert "replicas" in dp.logs() and "Traceback" not in dp.logs()
