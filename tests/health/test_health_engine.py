"""XID events, MIG attribution, persistence, exposure, storms, recovery."""

from __future__ import annotations

import json
import random
import threading
import tracemalloc
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from exporter.health import state as state_mod
from exporter.health import store as store_mod
from exporter.health.policy import Policy
from exporter.health.records import MAX_REASONS_PER_DEVICE
from exporter.health.state import STATE_FILE, validate
from exporter.health.verdict import HealthState
from exporter.labels import RenderContext
from exporter.model import EVENT_DOUBLE_BIT_ECC, EVENT_GPU_LOST, EVENT_SINGLE_BIT_ECC, DeviceEvent

from .conftest import GPU0, GPU1, MIG_A, MIG_B, Clock, EngineFactory, inventory, snapshot, xid

H, D, U = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.UNHEALTHY


def test_xid_79_fences_and_xid_13_only_counts(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(inventory(), clock()))
    eng.on_events([xid(13), xid(13, GPU1), xid(79, GPU1)])
    assert eng.verdict(GPU0).state is H
    v = eng.verdict(GPU1)
    assert v.state is U
    assert (v.reasons[0].signal, v.reasons[0].code, v.reasons[0].action) == ("xid", "79", "reboot_node")
    ctx = RenderContext("Hostname", "n1")
    ctx.rebuild(inventory())
    text = eng.render_metrics(ctx)
    assert f'gpuhealth_xid_errors_total{{{ctx.device_labels(GPU0)},xid="13",class="application"}} 1' in text
    assert f"gpuhealth_health_state{{{ctx.device_labels(GPU1)}}} 2" in text
    assert (
        f'gpuhealth_health_reason{{{ctx.device_labels(GPU1)},signal="xid",code="79",class="fence",'
        'action="reboot_node"} 1'
    ) in text


def test_override_makes_xid_13_fence(make_engine: EngineFactory) -> None:
    eng = make_engine(Policy.build(fence_xids=[13], ignore_xids=[79]))
    eng.on_events([xid(13), xid(79, GPU1)])
    assert eng.verdict(GPU0).state is U
    assert eng.verdict(GPU1).state is H


def test_warn_xid_degrades(make_engine: EngineFactory) -> None:
    eng = make_engine()
    eng.on_events([xid(94)])
    assert eng.verdict(GPU0).state is D and eng.verdict(GPU0).healthy_for_scheduling


def test_other_events(make_engine: EngineFactory) -> None:
    eng = make_engine()
    eng.on_events([DeviceEvent(GPU0, EVENT_GPU_LOST), DeviceEvent(GPU1, EVENT_SINGLE_BIT_ECC)])
    assert eng.verdict(GPU0).state is U and eng.verdict(GPU1).state is H
    eng.on_events([DeviceEvent(GPU1, EVENT_DOUBLE_BIT_ECC)])
    assert eng.verdict(GPU1).reasons[0].signal == "dbe"


def test_mig_attribution(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(inventory(mig=True), clock()))
    eng.on_events([xid(109, gi=1)])  # context switch timeout inside GI 1: that instance only
    assert eng.verdict(MIG_A).state is U
    assert eng.verdict(MIG_B).state is H
    assert eng.verdict(GPU0).state is H
    eng.on_events([xid(119, gi=2)])  # GSP: whole GPU even though attributed to GI 2
    assert eng.verdict(GPU0).state is U
    assert eng.verdict(MIG_B).state is U
    assert {r.code for r in eng.verdict(MIG_A).reasons} == {"109", "119"}
    eng.on_events([xid(109, GPU1, gi=7)])  # unknown instance: the whole GPU, to be safe
    assert eng.verdict(GPU1).state is U


def test_subscribers_hear_after_persistence(make_engine: EngineFactory, tmp_path: Path) -> None:
    eng = make_engine()
    seen: list[tuple[HealthState, bool]] = []

    def cb() -> None:
        on_disk = json.loads((tmp_path / "state" / STATE_FILE).read_text())
        seen.append((eng.verdict(GPU0).state, bool(on_disk["devices"].get(GPU0, {}).get("reasons"))))

    eng.subscribe(cb)
    eng.on_events([xid(79)])
    assert seen == [(U, True)]  # called synchronously, with the fence already on disk
    eng.on_events([xid(79)] * 10)  # counts only: no new notification
    assert len(seen) == 1


def test_state_survives_a_new_engine(make_engine: EngineFactory, tmp_path: Path, clock: Clock) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(inventory(), clock()))
    eng.on_events([xid(79), xid(13), xid(13), xid(94, GPU1)])
    eng.stop()
    again = make_engine()
    assert again.verdict(GPU0).state is U
    assert again.verdict(GPU1).state is D
    ctx = RenderContext(None, "")
    ctx.rebuild(inventory())
    again.on_snapshot(snapshot(inventory(), clock()))
    again.on_events([xid(13)])
    text = again.render_metrics(ctx)
    assert f'gpuhealth_xid_errors_total{{{ctx.device_labels(GPU0)},xid="13",class="application"}} 3' in text
    doc = validate(json.loads((tmp_path / "state" / STATE_FILE).read_text()))
    assert doc["schema"] == state_mod.SCHEMA_VERSION


@pytest.mark.parametrize("content", [b"{not json", b'{"schema": "1"}', b"[]", b'{"schema":1,"devices":{"x":[]}}'])
def test_corrupt_state_file_is_moved_aside(make_engine: EngineFactory, tmp_path: Path, content: bytes) -> None:
    sd = tmp_path / "state"
    sd.mkdir()
    (sd / STATE_FILE).write_bytes(content)
    with capture_logs() as logs:
        eng = make_engine()
    assert [e for e in logs if e["event"] == "health_state_file_corrupt" and e["log_level"] == "error"]
    aside = list(sd.glob(f"{STATE_FILE}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert "gpuhealth_health_state_file_errors_total 1\n" in eng.render_metrics(RenderContext(None, ""))
    eng.on_events([xid(79)])  # and it keeps working, writing a fresh valid file
    validate(json.loads((sd / STATE_FILE).read_text()))


def test_clear_targets(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(inventory(mig=True), clock()))
    eng.on_events([xid(79), xid(109, gi=2), xid(79, GPU1)])
    with pytest.raises(ValueError, match="no GPU or MIG device matches"):
        eng.clear("GPU-nope", "x")
    with pytest.raises(ValueError, match="reason is required"):
        eng.clear("0", "  ")
    with capture_logs() as logs:
        assert set(eng.clear("0", "replaced GPU")) == {GPU0, MIG_A, MIG_B}
    assert eng.verdict(GPU0).state is H and eng.verdict(MIG_B).state is H
    assert eng.verdict(GPU1).state is U
    cleared = [e for e in logs if e["event"] == "health_cleared"]
    assert cleared[0]["reason"] == "replaced GPU" and GPU0 in cleared[0]["uuids"]
    eng.clear("all", "maintenance done")
    assert all(v.state is H for v in eng.verdicts().values())
    assert "gpuhealth_health_clears_total 2\n" in eng.render_metrics(RenderContext(None, ""))


def test_transitions_are_logged_once(make_engine: EngineFactory) -> None:
    eng = make_engine()
    with capture_logs() as logs:
        eng.on_events([xid(79)] * 5)
        eng.on_events([xid(79)])
    transitions = [e for e in logs if e["event"] == "health_transition"]
    assert len(transitions) == 1
    assert transitions[0]["uuid"] == GPU0 and transitions[0]["state"] == "unhealthy"


def test_gpus_json(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(inventory(mig=True), clock()))
    eng.on_events([xid(48)])
    doc = json.loads(eng.gpus_json())
    by_uuid = {d["uuid"]: d for d in doc["devices"]}
    assert set(by_uuid) == {GPU0, GPU1, MIG_A, MIG_B}
    assert by_uuid[GPU0]["state"] == "unhealthy" and by_uuid[GPU0]["action"] == "reset_gpu"
    assert by_uuid[MIG_A]["parent"] == GPU0 and by_uuid[MIG_A]["gpu_instance_id"] == 1
    assert by_uuid[MIG_A]["state"] == "unhealthy"  # inherited
    assert by_uuid[GPU1] == {
        "uuid": GPU1,
        "kind": "gpu",
        "index": 1,
        "state": "healthy",
        "reasons": [],
        "action": "none",
    }


def test_auto_recover_is_off_by_default(make_engine: EngineFactory, clock: Clock) -> None:
    energy = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
    eng = make_engine()
    inv = inventory()
    eng.on_snapshot(snapshot(inv, clock(), {GPU0: {energy: 5e9}}))
    eng.on_events([xid(79)])
    clock.t += 5
    eng.on_snapshot(snapshot(inv, clock(), {GPU0: {energy: 1e3}}))  # counter went back: GPU was reset
    assert eng.verdict(GPU0).state is U


def test_auto_recover_clears_after_a_detected_reset(make_engine: EngineFactory, clock: Clock) -> None:
    dbe, remap = "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_ROW_REMAP_FAILURE"
    eng = make_engine(Policy.build(auto_recover=True))
    inv = inventory()
    eng.on_snapshot(snapshot(inv, clock(), {GPU0: {dbe: 0}, GPU1: {dbe: 0}}))
    eng.on_snapshot(snapshot(inv, clock(), {GPU0: {dbe: 1}, GPU1: {dbe: 0, remap: 1}}))
    assert eng.verdict(GPU0).state is U and eng.verdict(GPU1).state is U
    clock.t += 60
    # GPU1's reset did not bring it back: remap failure is still reported, so it is fenced again.
    eng.on_snapshot(snapshot(inv, clock(), {GPU0: {dbe: 0}, GPU1: {dbe: 0, remap: 1}}))
    assert eng.verdict(GPU0).state is H
    assert eng.verdict(GPU1).state is U
    # A hung device never counts as recovered.
    eng.on_events([xid(79)])
    eng.on_snapshot(snapshot(inv, clock(), stale={GPU0: 1.0}))
    assert eng.verdict(GPU0).state is U


def test_storm_is_bounded_and_exact(make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    writes = 0
    real_write = store_mod.StateStore.write

    def counting(self: store_mod.StateStore, doc: dict[str, object], gen: int) -> bool:
        nonlocal writes
        writes += 1
        return real_write(self, doc, gen)

    monkeypatch.setattr(store_mod.StateStore, "write", counting)
    eng = make_engine()
    rng = random.Random(7)
    codes = [79, 13, 31, 94, 109]
    expected: dict[int, int] = {}
    tracemalloc.start()
    for _ in range(500):
        batch = [xid(rng.choice(codes), rng.choice([GPU0, GPU1])) for _ in range(100)]
        for e in batch:
            expected[e.xid] = expected.get(e.xid, 0) + 1
        eng.on_events(batch)
    # Garbage codes from a misbehaving driver must not grow the tables either.
    eng.on_events([xid(rng.randrange(2**32), GPU0) for _ in range(5000)])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 << 20
    assert len(eng.verdict(GPU0).reasons) <= MAX_REASONS_PER_DEVICE
    rec = {r.code: r for r in eng.verdict(GPU1).reasons}
    assert set(rec) == {"79", "94", "109"}
    text = eng.render_metrics(RenderContext(None, ""))
    for code, n in expected.items():
        got = sum(
            int(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gpuhealth_xid_errors_total{") and f'xid="{code}"' in line
        )
        assert got == n, code
    # Persistence coalesced: a handful of synchronous transition writes plus rate-limited count writes.
    assert writes < 100, writes


def test_concurrent_inputs(make_engine: EngineFactory, clock: Clock) -> None:
    eng = make_engine()
    inv = inventory(mig=True)
    stop = threading.Event()

    def snapshots() -> None:
        while not stop.is_set():
            eng.on_snapshot(snapshot(inv, clock()))

    t = threading.Thread(target=snapshots)
    t.start()
    try:
        for _ in range(200):
            eng.on_events([xid(13), xid(109, gi=1)])
    finally:
        stop.set()
        t.join()
    assert eng.verdict(MIG_A).state is U
    assert eng.verdict(MIG_A).reasons[0].count == 200
