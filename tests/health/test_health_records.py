"""The records' operations (exporter/health/records.py) and the views of them (expose), without an engine."""

from __future__ import annotations

import pytest

from exporter.health import expose
from exporter.health.records import MAX_REASONS_PER_DEVICE, NOT_ATTRIBUTED, Records, reason_names
from exporter.health.signals import Finding
from exporter.health.verdict import HealthState, Reason
from exporter.labels import RenderContext
from exporter.model import EVENT_XID, DeviceEvent

from .conftest import GPU0, GPU1, MIG_A, MIG_B, inventory

H, D, U, UNKNOWN = HealthState.HEALTHY, HealthState.DEGRADED, HealthState.UNHEALTHY, HealthState.UNKNOWN
FENCE = Finding("xid", "79", U, "reboot_node", "off the bus", level=False)
WARN = Finding("row_remap_pending", "", D, "reset_gpu", "pending")


def records(mig: bool = True) -> Records:
    r = Records()
    r.set_inventory(inventory(mig))
    return r


def test_upsert_counts_and_keeps_first_seen() -> None:
    r = records()
    r.upsert(GPU0, FENCE, 1.0, "fatal")
    r.upsert(GPU0, FENCE, 3.0, "fatal")
    r.upsert(GPU0, FENCE, 2.0, "fatal")
    (rec,) = r.devs[GPU0].reasons.values()
    assert (rec.first_seen, rec.last_seen, rec.count, rec.cls) == (1.0, 3.0, 3, "fatal")
    r.upsert(GPU1, WARN, 1.0)
    r.upsert(GPU1, WARN, 2.0)  # a level: seen again, not counted again
    assert next(iter(r.devs[GPU1].reasons.values())).count == 1


def test_codes_beyond_the_cap_fold_into_other_which_takes_the_worst_state() -> None:
    r = records()
    for i in range(MAX_REASONS_PER_DEVICE):
        r.upsert(GPU0, Finding("s", str(i), D, "none", "m"), 1.0)
    r.upsert(GPU0, Finding("s", "x", D, "none", "m"), 2.0)
    r.upsert(GPU0, Finding("s", "y", U, "reset_gpu", "m"), 3.0)
    other = r.devs[GPU0].reasons[("s", "other")]
    assert (other.state, other.action, other.cls) == (U, "reset_gpu", "warn")
    assert len(r.devs[GPU0].reasons) == MAX_REASONS_PER_DEVICE + 1


@pytest.mark.parametrize(
    ("gi", "whole", "targets"),
    [
        (1, False, (MIG_A,)),
        (2, False, (MIG_B,)),
        (1, True, (GPU0,)),
        (None, False, (GPU0,)),
        (NOT_ATTRIBUTED, False, (GPU0,)),
        (9, False, (GPU0,)),
    ],
)
def test_xid_targets(gi: int | None, whole: bool, targets: tuple[str, ...]) -> None:
    ev = DeviceEvent(GPU0, EVENT_XID, 43, gi, 0, 0.0)
    assert records().xid_targets(ev, whole) == targets


def test_a_new_layout_forgets_healthy_migs_only() -> None:
    r = records()
    r.upsert(MIG_A, FENCE, 1.0)
    r.set_inventory(inventory(mig=False))
    assert set(r.devs) == {GPU0, GPU1, MIG_A}


def test_resolve_and_clear() -> None:
    r = records()
    assert r.resolve(" 0 ") == [GPU0, MIG_A, MIG_B]
    assert r.resolve(MIG_A) == [MIG_A]
    assert r.resolve("all") == [GPU0, MIG_A, MIG_B, GPU1]  # as recorded
    with pytest.raises(ValueError, match="no GPU or MIG device matches '7'"):
        r.resolve("7")
    r.upsert(GPU0, FENCE, 1.0)
    r.upsert(GPU0, WARN, 1.0)
    r.devs[GPU0].tracker.failing_since = 5.0
    assert r.clear([GPU0, MIG_A]) == ["xid:79", "row_remap_pending"]
    assert not r.devs[GPU0].reasons and r.devs[GPU0].tracker.failing_since is None
    assert r.clears_total == 1


def test_a_gpu_fence_reaches_its_migs_and_the_overlay_counts_without_being_recorded() -> None:
    r = records()
    r.upsert(GPU0, FENCE, 1.0)
    blind = Reason("monitor", "Uninitialized", "m", 2.0, 2.0, 1, "none", UNKNOWN)
    overlay: dict[str, tuple[Reason, ...]] = {GPU1: (blind,)}
    assert r.verdict(MIG_A, overlay).state is U
    assert [x.signal for x in r.verdict(MIG_A, overlay).reasons] == ["xid"]
    assert r.verdict(GPU1, overlay).state is UNKNOWN and not r.devs[GPU1].reasons
    assert r.verdict("GPU-unknown", overlay).state is H
    assert r.structure(overlay) == {
        GPU0: (U, frozenset({("xid", "79")})),
        MIG_A: (U, frozenset()),
        MIG_B: (U, frozenset()),
        GPU1: (UNKNOWN, frozenset({("monitor", "Uninitialized")})),
    }


def test_reason_names() -> None:
    r = records()
    r.upsert(GPU0, FENCE, 1.0)
    r.upsert(GPU0, WARN, 1.0)
    assert reason_names(r.devs[GPU0].reasons.values()) == ["xid:79", "row_remap_pending"]


def test_views_and_metrics_show_present_devices_and_absent_ones_with_reasons() -> None:
    r = records(mig=False)
    r.upsert(GPU1, FENCE, 1.0, "fatal")
    r.upsert("GPU-gone", FENCE, 1.0)
    r.devs["GPU-healthy-gone"] = r.dev("GPU-healthy-gone")
    views = expose.device_views(r.devs, {}, lambda u: r.verdict(u, {}))
    assert [v.uuid for v in views] == [GPU0, GPU1, "GPU-gone", "GPU-healthy-gone"]  # by index, unknown last
    assert [d["state"] for d in expose.devices_json(views)] == ["healthy", "unhealthy", "unhealthy", "healthy"]
    ctx = RenderContext("Hostname", "n1")
    ctx.rebuild(inventory())
    e = expose.Exposed(
        views, inventory(), {(GPU1, 79, "fatal"): 1}, 2, {GPU0: frozenset({"F"}), "GPU-gone": frozenset({"G"})}
    )
    text = expose.render_metrics(ctx, e, 3, 4)
    assert "GPU-gone" in text and "GPU-healthy-gone" not in text
    assert "gpuhealth_health_clears_total 2\n" in text
    assert "gpuhealth_health_state_file_errors_total 3\n" in text
    assert "gpuhealth_health_state_write_failures_total 4\n" in text
    assert 'field="F"' in text and 'field="G"' not in text
    assert expose.gpus_json(expose.devices_json(views)).endswith(b"\n}\n")
