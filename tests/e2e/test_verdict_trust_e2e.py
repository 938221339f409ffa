"""Verdicts you can trust, end to end: the daemon as a process on the fake NVML.

No XID is lost once /ready is green; a dead event pipeline is visible; faults of the monitor
(NVML itself failing for every GPU) are never blamed on a GPU; a one-off NOT_SUPPORTED does not
blind the health checks; a hung GPU does not slow the others; logs say each thing once.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

from tests.e2e.nvmlnode import NvmlNode
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

NVML_ERROR_UNKNOWN = 999
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4


def node_of(build: FakeNvmlBuild, tmp: Path, *args: str, gpus: int = 2) -> NvmlNode:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:gpus]
    return NvmlNode(build, tmp, scenario, ["-c", "200", *args])


def scalar(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} not served"
    return float(m.group(1))


def past(cycles: float) -> Callable[[str], bool]:
    """A wait_for predicate: the exposition shows more than `cycles` collection cycles."""
    return lambda text: cycles_of(text) > cycles


def cycles_of(text: str) -> float:
    return scalar(text, "gpuhealth_collections_total")


def fail_every_device_call(node: NvmlNode, code: int, **gpu: int) -> None:
    """Every device query (NVML's device and GPM calls) fails with `code` from now on."""
    for call in ("nvmlDevice*", "nvmlGpm*"):
        node.control("error", call=call, code=code, count=-1, **gpu)


def ready(node: NvmlNode) -> tuple[int, str]:
    status, body = node.exporter.get("/ready")
    return status, body.decode()


def wait_ready_state(node: NvmlNode, status: int, saying: str = "", timeout: float = 20.0) -> str:
    """Poll /ready until it answers `status` with a body containing `saying`; returns the body."""
    deadline = time.monotonic() + timeout
    last = (0, "")
    while time.monotonic() < deadline:
        try:
            last = ready(node)
        except OSError:  # not listening yet
            last = (0, "")
        if last[0] == status and saying in last[1]:
            return last[1]
        time.sleep(0.05)
    raise AssertionError(f"/ready never answered {status} {saying!r}; last {last}\n{node.exporter.logs()}")


def log_events(node: NvmlNode, event: str) -> list[dict[str, object]]:
    node.exporter.logs()  # flushes
    out = []
    for line in node.exporter.log_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


# ---------------------------------------------------------------- no XID is lost


def test_no_xid_is_lost_once_ready_over_30_fresh_starts(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    lost = []
    for i in range(30):
        node = node_of(fakenvml_build, tmp_path / str(i), gpus=8)
        exp = node.exporter
        try:
            # The XID goes in the moment /ready first answers 200, on the GPU registered last.
            deadline = time.monotonic() + 30
            while ready_status(node) != 200:
                assert exp.proc.poll() is None and time.monotonic() < deadline, exp.logs()
            node.control("xid", gpu=7, xid=43)
            try:
                exp.wait_for(lambda t: 'gpuhealth_xid_errors_total{gpu="7"' in t and 'xid="43"' in t, timeout=5)
            except AssertionError:
                lost.append(i)
        finally:
            assert exp.stop() == 0
    assert lost == [], f"XID injected after /ready was 200 lost in starts {lost} of 30"


def ready_status(node: NvmlNode) -> int:
    try:
        return ready(node)[0]
    except OSError:  # not listening yet
        return 0


def test_dead_event_pipeline_is_visible_and_not_a_fence(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = node_of(fakenvml_build, tmp_path)
    node.control("error", call="nvmlEventSetCreate", code=NVML_ERROR_UNKNOWN, count=-1)
    exp = node.exporter
    try:
        # first collection done, but nothing watches for XIDs: not ready, and it says why
        wait_ready_state(node, 503, "no GPU is monitored for XID events")
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 1, timeout=30)
        assert ready(node)[0] == 503
        for gpu in ("0", "1"):
            assert node.value(text, "gpuhealth_xid_monitoring_up", gpu=gpu) == 0
            assert node.value(text, "gpuhealth_health_reason", gpu=gpu, signal="unmonitored") == 1
            assert node.value(text, "gpuhealth_health_state", gpu=gpu) == 1  # degraded, never fenced
        # the pipeline comes back: monitored, ready, healthy again
        node.control("clear", call="nvmlEventSetCreate")
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_xid_monitoring_up", gpu="1") == 1, timeout=60)
        wait_ready_state(node, 200, timeout=30)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 0)
        assert node.value(text, "gpuhealth_health_reason", gpu="1", signal="unmonitored") is None
        node.control("xid", gpu=1, xid=43)
        exp.wait_for(lambda t: 'gpuhealth_xid_errors_total{gpu="1"' in t and 'xid="43"' in t)
    finally:
        assert exp.stop() == 0


# ---------------------------------------------------------------- no false fence


def test_same_error_on_every_gpu_is_a_monitor_fault_on_one_gpu_a_device_fault(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path
) -> None:
    node = node_of(fakenvml_build, tmp_path, "--health-nvml-timeout-grace", "1")
    exp = node.exporter
    try:
        exp.wait_ready()
        # every device call of every GPU fails the same way (a driver container restart)
        fail_every_device_call(node, NVML_ERROR_UNKNOWN)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 3)
        wait_ready_state(node, 503, "monitor fault")
        # well past the grace period: still unknown, never fenced
        cycles = cycles_of(text)
        text = exp.wait_for(lambda t: cycles_of(t) >= cycles + 15)
        for gpu in ("0", "1"):
            assert node.value(text, "gpuhealth_health_state", gpu=gpu) == 3
            assert node.value(text, "gpuhealth_health_reason", gpu=gpu, signal="nvml_error") is None
        # the monitor recovers: previous verdicts (healthy) come back
        node.control("clear")
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 0)
        assert node.value(text, "gpuhealth_health_state", gpu="0") == 0
        wait_ready_state(node, 200)
        # the same error on one GPU while its neighbour reads fine: that GPU's own fault
        fail_every_device_call(node, NVML_ERROR_UNKNOWN, gpu=1)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 2, timeout=20)
        assert node.value(text, "gpuhealth_health_reason", gpu="1", signal="nvml_error") == 1
        assert node.value(text, "gpuhealth_health_state", gpu="0") == 0
    finally:
        node.control("clear")
        assert exp.stop() == 0
    # a monitor fault was never written down as a device fault
    state = json.loads((node.state_dir / "state.json").read_text())
    signals = {r["signal"] for d in state["devices"].values() for r in d.get("reasons", [])}
    assert "monitor_fault" not in signals


def test_permission_error_on_one_gpu_is_ours_not_the_gpus(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = node_of(fakenvml_build, tmp_path, "--health-nvml-timeout-grace", "1")
    exp = node.exporter
    try:
        exp.wait_ready()
        fail_every_device_call(node, NVML_ERROR_NO_PERMISSION, gpu=0)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="0") == 3)
        cycles = cycles_of(text)
        text = exp.wait_for(lambda t: cycles_of(t) >= cycles + 10)
        assert node.value(text, "gpuhealth_health_state", gpu="0") == 3
        assert node.value(text, "gpuhealth_health_state", gpu="1") == 0
    finally:
        node.control("clear")
        assert exp.stop() == 0


def test_one_off_whole_call_not_supported_does_not_blind_health(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = node_of(fakenvml_build, tmp_path)
    exp = node.exporter
    try:
        exp.wait_ready()
        node.control("error", gpu=1, call="nvmlDeviceGetFieldValues", code=NVML_ERROR_NOT_SUPPORTED, count=1)
        exp.wait_for(lambda t: 'gpuhealth_nvml_errors_total{field="DCGM_FI_DEV_ROW_REMAP_FAILURE"' in t)
        exp.wait_for(lambda t: node.value(t, "DCGM_FI_DEV_ROW_REMAP_FAILURE", gpu="1") is not None)
        node.control("set", gpu=1, field="DCGM_FI_DEV_ROW_REMAP_FAILURE", value=1)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 2)
        assert node.value(text, "gpuhealth_health_reason", gpu="1", signal="row_remap_failure") == 1
    finally:
        assert exp.stop() == 0


def test_health_field_that_goes_missing_is_exported(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = node_of(fakenvml_build, tmp_path)
    exp = node.exporter
    try:
        exp.wait_ready()
        exp.wait_for(lambda t: node.value(t, "DCGM_FI_DEV_ROW_REMAP_FAILURE", gpu="1") is not None)
        node.control("set", gpu=1, field="DCGM_FI_DEV_ROW_REMAP_FAILURE", value=None)
        field = "DCGM_FI_DEV_ROW_REMAP_FAILURE"
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_signal_missing", gpu="1", field=field) == 1)
        assert node.value(text, "gpuhealth_health_signal_missing", gpu="0", field=field) is None
        assert log_events(node, "health_signal_missing")
    finally:
        assert exp.stop() == 0


# ---------------------------------------------------------------- one broken part


def test_hung_gpu_does_not_slow_the_others(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = node_of(fakenvml_build, tmp_path, "--device-timeout", "2000")
    exp = node.exporter
    try:
        exp.wait_ready()
        node.control("hang", gpu=0, call="nvmlDeviceGetPowerUsage", seconds=120)
        text = exp.wait_for(lambda t: (node.value(t, "gpuhealth_device_data_age_seconds", gpu="0") or 0) > 3)
        # GPU 0's read has been hung past its deadline: not "up", its data ages, GPU 1 stays fresh
        assert node.value(text, "gpuhealth_device_up", gpu="0") == 0
        assert node.value(text, "DCGM_FI_DEV_GPU_TEMP", gpu="0") is not None  # last good values served
        cycles = cycles_of(text)
        # cycles keep the 200 ms interval instead of waiting the 2 s deadline for the hung GPU
        text = exp.wait_for(lambda t: cycles_of(t) >= cycles + 5, timeout=4)
        durations = []
        for _ in range(5):
            text = exp.wait_for(past(cycles))
            cycles = cycles_of(text)
            durations.append(scalar(text, "gpuhealth_collection_duration_seconds"))
            assert node.value(text, "gpuhealth_device_data_age_seconds", gpu="1") == 0
        assert max(durations) < 1.0, durations
    finally:
        node.control("clear", gpu=0)
        assert exp.stop() == 0


def test_ready_is_not_green_when_nothing_is_collected(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = node_of(fakenvml_build, tmp_path, "-d", "g:99")
    exp = node.exporter
    try:
        wait_ready_state(node, 503, "no GPU selected by --devices")
        exp.wait_for(lambda t: cycles_of(t) >= 3)
        status, body = ready(node)
        assert status == 503 and "no GPU selected" in body, body
    finally:
        assert exp.stop() == 0


def test_lost_gpu_is_logged_once_not_every_cycle(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = node_of(fakenvml_build, tmp_path)
    exp = node.exporter
    try:
        exp.wait_ready()
        node.control("lost", gpu=1)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_device_up", gpu="1") == 0)
        cycles = cycles_of(text)
        exp.wait_for(lambda t: cycles_of(t) >= cycles + 20)
        assert len(log_events(node, "device_lost")) == 1
        assert len(log_events(node, "gpu_unreadable_in_discovery")) <= 1
        node.control("recover", gpu=1)
        exp.wait_for(lambda t: node.value(t, "gpuhealth_device_up", gpu="1") == 1, timeout=30)
        assert len(log_events(node, "device_readable_again")) == 1
    finally:
        assert exp.stop() == 0
    assert not re.search(r"Traceback", exp.logs())
