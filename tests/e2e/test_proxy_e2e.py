"""`gpu-health-exporter device-plugin-proxy` as a process between a stand-in NVIDIA plugin and the fake
kubelet, fed by the real daemon on the fake NVML through the verdict stream (as the chart runs them)."""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.manager import VERDICT_SOURCE
from exporter.ownmetrics import PROXY_METRICS
from tests.deviceplugin.fakekubelet_registration import FakeKubelet, running_kubelet
from tests.e2e.harness import ExporterProcess
from tests.e2e.nvmlnode import NvmlNode
from tests.fakenvmllib import FakeNvmlBuild, load_scenario
from tests.proxy.standin import StandInPlugin

RESOURCE = "nvidia.com/gpu"


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    with running_kubelet() as k:
        yield k


@pytest.fixture
def upstream_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ghe-up-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def daemon(build: FakeNvmlBuild, tmp: Path) -> NvmlNode:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:2]
    return NvmlNode(build, tmp, scenario, ["-c", "500"])


def proxy(node: NvmlNode, kubelet: FakeKubelet, upstream_dir: str, tmp: Path) -> ExporterProcess:
    return ExporterProcess(
        ["--nvml-library", str(node.lib), "--device-plugin-dir", kubelet.plugin_dir, "--upstream-dir", upstream_dir],
        tmp,
        node.env,
        state_dir=node.state_dir,
        subcommand="device-plugin-proxy",
    )


def undeclared(text: str) -> list[str]:
    """Problems with the proxy's exposition against its declared families: every family served with
    its declared HELP and TYPE and labels, nothing else served."""
    declared = {f.name: f for f in (*PROXY_METRICS, VERDICT_SOURCE)}
    problems = [f"{name}: header not as declared" for name, f in declared.items() if f.header not in text]
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        name = name.split(" ")[0]
        f = declared.get(name)
        if f is None:
            problems.append(f"{name}: served, not declared")
            continue
        labels = [pair.split("=")[0] for pair in rest.rsplit("}", 1)[0].split(",")] if rest else []
        want = f.labels_doc.split(", ") if f.labels_doc else []
        if labels != want:
            problems.append(f"{name}: labels {labels}, declared {want}")
    return problems


def ready_reason(p: ExporterProcess) -> str:
    status, body = p.get("/ready")
    return "" if status == 200 else body.decode()


def test_an_xid_in_the_daemon_reaches_the_kubelet_through_the_proxy(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet, upstream_dir: str
) -> None:
    node = daemon(fakenvml_build, tmp_path / "daemon")
    node.exporter.wait_ready()
    gpus = [d["uuid"] for d in json.loads(node.exporter.get("/gpus")[1])["devices"]]
    px = proxy(node, kubelet, upstream_dir, tmp_path / "proxy")
    plugin = StandInPlugin(upstream_dir, gpus[:2])
    try:
        plugin.start()  # registers once the proxy serves its kubelet.sock (retried, as NVIDIA's does)
        px.wait_ready()  # the upstream streaming, registered with the kubelet, the daemon heard
        assert kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == 2, timeout=10), px.logs()

        t0 = time.monotonic()
        node.control("xid", gpu=1, xid=79)
        assert kubelet.wait_for(lambda: kubelet.allocatable(RESOURCE) == 1, timeout=2.0), px.logs()
        latency = time.monotonic() - t0
        last = kubelet.latest(RESOURCE)
        assert last is not None and last.health_of(gpus[1]) == "Unhealthy" and kubelet.capacity(RESOURCE) == 2

        # Allocate goes to NVIDIA's plugin and back byte for byte.
        request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=gpus[:1])])
        got = kubelet._endpoints[RESOURCE].channel.unary_unary("/v1beta1.DevicePlugin/Allocate")(
            request.SerializeToString(), timeout=10
        )
        assert plugin.allocations == [(request.SerializeToString(), got)]

        # Its families, as docs/metrics.md declares them.
        text = px.wait_for(lambda t: 'gpuhealth_device_plugin_proxy_fenced{resource="nvidia.com/gpu"} 1' in t)
        assert undeclared(text) == []
        assert "gpuhealth_device_plugin_proxy_upstreams 1" in text
        assert (
            'gpuhealth_device_plugin_proxy_forwarded_total{resource="nvidia.com/gpu",rpc="Allocate",result="ok"} 1'
            in text
        )
        assert 'gpuhealth_device_plugin_verdict_source{source="daemon"} 1' in text

        # The daemon dies (kill -9): the proxy keeps the last verdicts, GPU 1 stays fenced; then it is back.
        node.exporter.stop(signal.SIGKILL)
        assert kubelet.wait_for(lambda: "keeping its last verdicts" in ready_reason(px), timeout=10)
        assert kubelet.allocatable(RESOURCE) == 1
        assert 'gpuhealth_device_plugin_verdict_source{source="last_known"} 1' in px.wait_for(
            lambda t: 'source="last_known"} 1' in t
        )
        node.restart().wait_ready()
        assert kubelet.wait_for(lambda: ready_reason(px) == "", timeout=15), ready_reason(px)
        assert kubelet.allocatable(RESOURCE) == 1

        # The proxy restarts: NVIDIA's plugin sees its kubelet.sock re-created and registers again; the
        # kubelet's first message from the new proxy already fences GPU 1.
        starts, registrations = plugin.starts, len(kubelet.registrations)
        assert px.stop() == 0
        px = proxy(node, kubelet, upstream_dir, tmp_path / "proxy2")
        px.wait_ready()
        assert plugin.starts > starts and len(kubelet.registrations) > registrations
        assert kubelet.wait_for(lambda: kubelet.latest(RESOURCE) is not None, timeout=5)
        first = kubelet.messages(RESOURCE)[0]
        assert first.health_of(gpus[1]) == "Unhealthy" and first.health_of(gpus[0]) == "Healthy"
        assert [e for e in kubelet.errors if "Cancelling all calls" not in e] == []
    finally:
        plugin.stop()
        px.stop()
        node.exporter.stop()
    assert latency < 1.0


@pytest.mark.parametrize(
    ("args", "words"),
    [([], "--upstream-dir is required"), (["--upstream-dir", "relative/dir"], "must be an absolute path")],
    ids=["missing", "relative"],
)
def test_the_proxy_without_a_usable_upstream_dir_exits_2_naming_the_flag(
    tmp_path: Path, args: list[str], words: str
) -> None:
    px = ExporterProcess(args, tmp_path, subcommand="device-plugin-proxy")
    assert px.proc.wait(30) == 2
    assert words in px.logs() and "Traceback" not in px.logs()


def test_the_proxy_refuses_the_kubelets_own_directory_as_upstream(tmp_path: Path, kubelet: FakeKubelet) -> None:
    args = ["--upstream-dir", kubelet.plugin_dir, "--device-plugin-dir", kubelet.plugin_dir, "--simulate"]
    px = ExporterProcess(args, tmp_path, subcommand="device-plugin-proxy")
    assert px.proc.wait(30) == 2
    assert "register with itself" in px.logs() and "Traceback" not in px.logs()


def test_without_nvml_the_proxy_still_forwards_and_fences_by_uuid(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet, upstream_dir: str
) -> None:
    node = daemon(fakenvml_build, tmp_path / "daemon")
    node.exporter.wait_ready()
    gpus = [d["uuid"] for d in json.loads(node.exporter.get("/gpus")[1])["devices"]]
    node.control("xid", gpu=0, xid=79)
    node.exporter.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="0") == 2)
    args = ["--nvml-library", "/nonexistent/libnvidia-ml.so.1", "--device-plugin-dir", kubelet.plugin_dir]
    px = ExporterProcess(
        [*args, "--upstream-dir", upstream_dir],
        tmp_path / "proxy",
        node.env,
        state_dir=node.state_dir,
        subcommand="device-plugin-proxy",
    )
    plugin = StandInPlugin(upstream_dir, gpus[:2])
    try:
        plugin.start()
        assert kubelet.wait_for(lambda: kubelet.capacity(RESOURCE) == 2, timeout=20), px.logs()
        last = kubelet.latest(RESOURCE)
        assert last is not None and last.healthy == {gpus[1]}  # GPU 0's fence still applies
        status, body = px.get("/ready")
        assert status == 503 and b"NVML discovery failing" in body
        assert px.get("/health")[0] == 200 and "Traceback" not in px.logs()
    finally:
        plugin.stop()
        px.stop()
        node.exporter.stop()
