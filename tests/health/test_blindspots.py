"""What the engine cannot see: monitor faults, unmonitored GPUs, missing health fields."""

from __future__ import annotations

import json
from pathlib import Path

from exporter.health import blindspots
from exporter.health.verdict import HealthState, combine
from exporter.model import EVENT_XID, DeviceEvent, Gpu, Inventory, MigDevice
from exporter.snapshot import DeviceSample, Snapshot
from tests.health.conftest import GPU0, GPU1, Clock, EngineFactory, inventory, snapshot

GPUS = tuple(Gpu(i, f"GPU-{i}", f"00000000:{i:02X}:00.0", i, "NVIDIA H100 80GB HBM3") for i in range(3))


def snap(*samples: DeviceSample) -> Snapshot:
    return Snapshot(Inventory("570.1", GPUS), samples, taken_at=1.0, duration_s=0.0)


def ok(i: int) -> DeviceSample:
    return DeviceSample(GPUS[i], None, {"DCGM_FI_DEV_GPU_TEMP": 40.0}, up=True)


def failing(i: int, error: str = "NVMLError_Unknown", *, monitor: bool = False) -> DeviceSample:
    return DeviceSample(GPUS[i], None, {}, up=False, error=error, monitor_fault=monitor)


def test_same_error_on_every_gpu_is_the_monitors() -> None:
    assert blindspots.monitor_faults(snap(failing(0), failing(1), failing(2))) == {
        "GPU-0": "NVMLError_Unknown",
        "GPU-1": "NVMLError_Unknown",
        "GPU-2": "NVMLError_Unknown",
    }


def test_one_gpu_failing_while_others_read_is_its_own() -> None:
    assert blindspots.monitor_faults(snap(failing(0), ok(1), ok(2))) == {}


def test_different_errors_on_every_gpu_are_each_gpus_own() -> None:
    assert blindspots.monitor_faults(snap(failing(0), failing(1, "NVMLError_Timeout"), failing(2))) == {}


def test_a_single_gpu_node_cannot_tell_unless_the_error_is_ours() -> None:
    one = Snapshot(Inventory("570.1", GPUS[:1]), (failing(0),), taken_at=1.0, duration_s=0.0)
    assert blindspots.monitor_faults(one) == {}
    ours = Snapshot(Inventory("570.1", GPUS[:1]), (failing(0, "NVMLError_NoPermission", monitor=True),), 1.0, 0.0)
    assert blindspots.monitor_faults(ours) == {"GPU-0": "NVMLError_NoPermission"}


def test_mig_devices_follow_their_gpu() -> None:
    mig = MigDevice("MIG-0a", "GPU-0", 0, 1, 0, "3g.40gb", 0)
    gpu = Gpu(0, "GPU-0", "00000000:00:00.0", 0, "NVIDIA H100 80GB HBM3", mig_enabled=True, migs=(mig,))
    s = Snapshot(
        Inventory("570.1", (gpu, GPUS[1])),
        (
            DeviceSample(gpu, None, {}, up=False, error="E"),
            DeviceSample(gpu, mig, {}, up=False, error="E"),
            DeviceSample(GPUS[1], None, {}, up=False, error="E"),
        ),
        taken_at=1.0,
        duration_s=0.0,
    )
    assert set(blindspots.monitor_faults(s)) == {"GPU-0", "MIG-0a", "GPU-1"}


def test_unknown_gives_way_to_a_fence_only() -> None:
    assert combine([HealthState.UNKNOWN, HealthState.DEGRADED]) is HealthState.UNKNOWN
    assert combine([HealthState.UNKNOWN, HealthState.UNHEALTHY]) is HealthState.UNHEALTHY
    assert combine([HealthState.DEGRADED, HealthState.HEALTHY]) is HealthState.DEGRADED
    assert combine([]) is HealthState.HEALTHY


def test_unmonitored_only_after_a_registration_attempt_and_the_grace() -> None:
    cov = blindspots.XidCoverage(grace_s=5.0)
    assert cov.unmonitored(GPUS, 0.0) == {}  # no attempt finished yet: nothing to say
    cov.update(frozenset({"GPU-0", "GPU-1"}))
    assert cov.unmonitored(GPUS, 10.0) == {}
    assert cov.unmonitored(GPUS, 14.9) == {}
    assert cov.unmonitored(GPUS, 15.0) == {"GPU-2": 10.0}
    cov.update(frozenset(g.uuid for g in GPUS))
    assert cov.unmonitored(GPUS, 16.0) == {}


def test_missing_signal_only_for_fields_the_model_reported() -> None:
    field = "DCGM_FI_DEV_ROW_REMAP_FAILURE"
    sample = DeviceSample(GPUS[0], None, {}, up=True, unsupported=frozenset({field}))
    assert blindspots.signal_coverage(sample, {}) == ([], frozenset())
    seen = {"NVIDIA H100 80GB HBM3": {field}}
    assert blindspots.signal_coverage(sample, seen) == ([], frozenset({field}))
    mig_mode = Gpu(0, "GPU-0", "00000000:00:00.0", 0, "NVIDIA H100 80GB HBM3", mig_enabled=True)
    in_mig = DeviceSample(mig_mode, None, {}, up=True, unsupported=frozenset({field}))
    assert blindspots.signal_coverage(in_mig, seen) == ([], frozenset())  # MIG mode is another model


def test_a_monitor_fault_keeps_fences_judges_nothing_and_is_never_saved(
    tmp_path: Path, clock: Clock, make_engine: EngineFactory
) -> None:
    eng = make_engine()
    inv = inventory()
    eng.on_snapshot(snapshot(inv, clock.t))
    eng.on_events([DeviceEvent(GPU0, EVENT_XID, xid=79, timestamp=clock.t)])
    assert eng.verdict(GPU0).state is HealthState.UNHEALTHY
    # every GPU fails the same way, far past the NVML grace period
    for _ in range(5):
        clock.t += 60
        eng.on_snapshot(snapshot(inv, clock.t, down={GPU0: "NVMLError_Unknown", GPU1: "NVMLError_Unknown"}))
    assert eng.verdict(GPU0).state is HealthState.UNHEALTHY  # a fence stays a fence
    assert eng.verdict(GPU1).state is HealthState.UNKNOWN
    assert eng.verdict(GPU1).healthy_for_scheduling
    assert eng.monitor_problem() is not None
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert {r["signal"] for d in saved["devices"].values() for r in d.get("reasons", [])} == {"xid"}
    # NVML reads again: back to the previous verdicts, and the grace period starts afresh
    clock.t += 1
    eng.on_snapshot(snapshot(inv, clock.t))
    assert eng.verdict(GPU1).state is HealthState.HEALTHY
    assert eng.verdict(GPU0).state is HealthState.UNHEALTHY
    assert eng.monitor_problem() is None
    clock.t += 1
    eng.on_snapshot(snapshot(inv, clock.t, down={GPU1: "NVMLError_Unknown"}))
    assert eng.verdict(GPU1).state is HealthState.HEALTHY  # its own failure, but within the grace
