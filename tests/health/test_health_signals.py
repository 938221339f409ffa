"""Each polled signal's verdict, through the engine's on_snapshot."""

from __future__ import annotations

import pytest

from exporter.health.policy import Policy
from exporter.health.verdict import HealthState
from exporter.labels import RenderContext

from .conftest import GPU0, GPU1, MIG_A, Clock, EngineFactory, inventory, snapshot

INV = inventory()
H, D, U = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.UNHEALTHY


def test_volatile_dbe_increase_fences(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(INV, clock(), {GPU0: {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 0}}))
    assert eng.verdict(GPU0).state is H  # first sight is only a baseline
    eng.on_snapshot(snapshot(INV, clock(), {GPU0: {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 2}}))
    v = eng.verdict(GPU0)
    assert v.state is U
    assert (v.reasons[0].signal, v.reasons[0].count, v.reasons[0].action) == ("dbe", 2, "reset_gpu")
    assert eng.verdict(GPU1).state is H


@pytest.mark.parametrize(
    ("field", "value", "state", "signal"),
    [
        ("DCGM_FI_DEV_ROW_REMAP_FAILURE", 1, U, "row_remap_failure"),
        ("DCGM_FI_DEV_ROW_REMAP_PENDING", 1, D, "row_remap_pending"),
        ("DCGM_FI_DEV_RETIRED_PENDING", 3, D, "retired_pages_pending"),
        ("DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", 1, U, "recovery_action"),
        ("DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", 2, U, "recovery_action"),
        ("DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", 3, D, "recovery_action"),
        ("DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", 4, U, "recovery_action"),
        ("DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", 5, D, "recovery_action"),
        ("DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", 6, U, "recovery_action"),
        ("DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", 7, U, "recovery_action"),
    ],
)
def test_level_signals(
    make_engine: EngineFactory, clock: Clock, field: str, value: int, state: HealthState, signal: str
) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(INV, clock(), {GPU0: {field: value}}))
    v = eng.verdict(GPU0)
    assert v.state is state
    assert v.reasons[0].signal == signal
    # The condition goes away: degraded clears by itself, a fence waits for an explicit clear.
    clock.t += 10
    eng.on_snapshot(snapshot(INV, clock(), {GPU0: {field: 0}}))
    assert eng.verdict(GPU0).state is (H if state is D else U)


def test_recovery_action_codes_map_to_actions(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine()
    eng.on_snapshot(
        snapshot(
            INV,
            clock(),
            {GPU0: {"DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION": 7}, GPU1: {"DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION": 6}},
        )
    )
    assert eng.verdict(GPU0).reasons[0].action == "reboot_node"
    assert eng.verdict(GPU1).reasons[0].action == "reset_gpu"


def test_sustained_hw_slowdown_degrades(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine(Policy.build(slowdown_s=60))
    reasons = "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"
    eng.on_snapshot(snapshot(INV, clock(), {GPU0: {reasons: 0x40}, GPU1: {reasons: 0x1 | 0x4}}))
    clock.t += 59
    eng.on_snapshot(snapshot(INV, clock(), {GPU0: {reasons: 0x80}, GPU1: {reasons: 0x1 | 0x4}}))
    assert eng.verdict(GPU0).state is H  # not yet sustained
    clock.t += 1
    eng.on_snapshot(snapshot(INV, clock(), {GPU0: {reasons: 0x8}, GPU1: {reasons: 0x1 | 0x4}}))
    assert eng.verdict(GPU0).state is D
    assert eng.verdict(GPU1).state is H  # idle / software power cap are not hardware slowdown
    clock.t += 5
    eng.on_snapshot(snapshot(INV, clock(), {GPU0: {reasons: 0}}))
    assert eng.verdict(GPU0).state is H


def test_gpu_lost_fences(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(INV, clock(), down={GPU0: "lost"}))
    v = eng.verdict(GPU0)
    assert v.state is U and v.reasons[0].signal == "gpu_lost" and v.reasons[0].action == "reboot_node"


def test_stale_device_fences_after_grace(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine(Policy.build(nvml_timeout_grace_s=30))
    eng.on_snapshot(snapshot(INV, clock(), stale={GPU0: 29.0}))
    assert eng.verdict(GPU0).state is H
    clock.t += 2
    eng.on_snapshot(snapshot(INV, clock(), stale={GPU0: 31.0}))
    v = eng.verdict(GPU0)
    assert v.state is U and v.reasons[0].signal == "nvml_timeout"
    clock.t += 5  # reads work again: still fenced until someone clears it
    eng.on_snapshot(snapshot(INV, clock()))
    assert eng.verdict(GPU0).state is U


def test_failing_device_fences_after_grace(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine(Policy.build(nvml_timeout_grace_s=30))
    eng.on_snapshot(snapshot(INV, clock(), down={GPU1: "UNKNOWN"}))
    assert eng.verdict(GPU1).state is H
    clock.t += 30
    eng.on_snapshot(snapshot(INV, clock(), down={GPU1: "UNKNOWN"}))
    v = eng.verdict(GPU1)
    assert v.state is U and (v.reasons[0].signal, v.reasons[0].code) == ("nvml_error", "UNKNOWN")


def test_vanished_gpu_fences_and_stays_visible(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(INV, clock()))
    only_gpu1 = type(INV)(INV.driver_version, INV.gpus[1:])
    clock.t += 5
    eng.on_snapshot(snapshot(only_gpu1, clock(), vanished=(GPU0,)))
    assert eng.verdict(GPU0).state is U
    ctx = RenderContext("Hostname", "node-1")
    ctx.rebuild(only_gpu1)
    text = eng.render_metrics(ctx)
    assert f'gpuhealth_health_state{{uuid="{GPU0}",hostname="node-1"}} 2' in text


def test_mig_samples_do_not_carry_gpu_fields(make_engine: EngineFactory, clock: Clock) -> None:
    inv = inventory(mig=True)
    eng = make_engine()
    eng.on_snapshot(snapshot(inv, clock(), {MIG_A: {"DCGM_FI_DEV_ROW_REMAP_FAILURE": 1}}))
    assert eng.verdict(MIG_A).state is H
