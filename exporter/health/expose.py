"""Health as views of the devices, as metrics text, as /gpus and `health list` JSON.

The engine hands over its records (under its lock) and what it copied of them; nothing here changes
them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from exporter.family import DEVICE_LABELS, Family
from exporter.health import blindspots
from exporter.health.policy import ACTION_RANK, NONE
from exporter.health.records import DeviceRecord
from exporter.health.verdict import HealthState, Reason, Verdict
from exporter.labels import RenderContext, escape_label_value, format_labels
from exporter.model import Inventory

# The health part's families (HealthEngine.render_metrics); gpuhealth_health_signal_missing is in blindspots.
HEALTH_STATE = Family(
    "gpuhealth_health_state",
    "gauge",
    "Health verdict: 0 healthy, 1 degraded, 2 unhealthy (fenced), 3 unknown (the monitor cannot judge the device; "
    "allocation unchanged).",
    DEVICE_LABELS,
    "health",
)
HEALTH_REASON = Family(
    "gpuhealth_health_reason",
    "gauge",
    "1 per active health reason recorded on the device.",
    f"{DEVICE_LABELS}, signal, code, class, action",
    "health",
)
XID_ERRORS = Family(
    "gpuhealth_xid_errors_total",
    "counter",
    "XID errors by code and policy class (persisted across restarts).",
    f"{DEVICE_LABELS}, xid, class",
    "health",
)
STATE_FILE_ERRORS = Family(
    "gpuhealth_health_state_file_errors_total",
    "counter",
    "Corrupt or unreadable health state files moved aside.",
    "",
    "health",
)
STATE_WRITE_FAILURES = Family(
    "gpuhealth_health_state_write_failures_total",
    "counter",
    "Failed writes of the health state file; the newest verdicts are retried until they are on disk.",
    "",
    "health",
)
CLEARS = Family("gpuhealth_health_clears_total", "counter", "Explicit and automatic health clears.", "", "health")
FAMILIES = (HEALTH_STATE, HEALTH_REASON, XID_ERRORS, STATE_FILE_ERRORS, STATE_WRITE_FAILURES, CLEARS)


@dataclass(frozen=True)
class DeviceView:
    uuid: str
    kind: str
    index: int | None
    parent: str | None
    gpu_instance_id: int | None
    state: HealthState  # the verdict (a MIG device inherits its parent)
    reasons: tuple[Reason, ...]  # the verdict's reasons (parent's included)
    own_reasons: tuple[tuple[Reason, str], ...]  # (reason, class) recorded on this device itself


def device_views(
    devs: Mapping[str, DeviceRecord], overlay: Mapping[str, tuple[Reason, ...]], verdict: Callable[[str], Verdict]
) -> list[DeviceView]:
    """Every recorded device, by GPU index; `overlay` holds the monitor's blind spots (never recorded)."""
    views = []
    for uuid, dev in devs.items():
        v = verdict(uuid)
        own = tuple(sorted((r for r in dev.reasons.values()), key=lambda r: (-r.state, r.first_seen)))
        # Blind spots are the monitor's, recorded on no device: shown with class "monitor".
        mine = (*((r.freeze(), r.cls) for r in own), *((r, "monitor") for r in overlay.get(uuid, ())))
        views.append(DeviceView(uuid, dev.kind, dev.index, dev.parent, dev.gpu_instance_id, v.state, v.reasons, mine))
    return sorted(views, key=lambda d: (d.index if d.index is not None else 1 << 30, d.kind, d.uuid))


def devices_json(views: list[DeviceView]) -> list[dict[str, Any]]:
    """What `health list` and /gpus show."""
    return [device_json(d) for d in views]


def gpus_json(devices: list[dict[str, Any]]) -> bytes:
    """The /gpus body."""
    return json.dumps({"devices": devices}, indent=1).encode() + b"\n"


@dataclass(frozen=True)
class Exposed:
    """What the health part renders, copied under the engine's lock (so consistent)."""

    views: list[DeviceView]
    inventory: Inventory | None
    xid_counts: dict[tuple[str, int, str], int]
    clears: int
    missing: dict[str, frozenset[str]]  # health fields each device no longer reports


def render_metrics(ctx: RenderContext, e: Exposed, file_errors: int, write_failures: int) -> str:
    """The health part: devices present (or holding reasons of their own), then the blind spots."""
    inv = e.inventory
    present = set() if inv is None else ({g.uuid for g in inv.gpus} | {m.uuid for g in inv.gpus for m in g.migs})
    views = [d for d in e.views if d.uuid in present or d.own_reasons]
    missing = {u: f for u, f in e.missing.items() if u in present}
    text = render(ctx, views, e.xid_counts, file_errors, e.clears, write_failures)
    return text + blindspots.render_signal_missing(ctx, missing)


def top_action(actions: list[str]) -> str:
    """The one thing to do for a device: the most drastic recommended action."""
    return max(actions, key=lambda a: ACTION_RANK.get(a, 0), default=NONE)


def reason_json(r: Reason) -> dict[str, Any]:
    return {
        "signal": r.signal,
        "code": r.code,
        "message": r.message,
        "state": r.state.name.lower(),
        "first_seen": r.first_seen,
        "last_seen": r.last_seen,
        "count": r.count,
        "action": r.action,
    }


def device_json(d: DeviceView) -> dict[str, Any]:
    out: dict[str, Any] = {"uuid": d.uuid, "kind": d.kind, "index": d.index}
    if d.kind == "mig":
        out["parent"] = d.parent
        out["gpu_instance_id"] = d.gpu_instance_id
    out["state"] = d.state.name.lower()
    out["reasons"] = [reason_json(r) for r in d.reasons]
    out["action"] = top_action([r.action for r in d.reasons])
    return out


def _labels(ctx: RenderContext, uuid: str) -> str:
    labels = ctx.device_labels(uuid)
    if labels:
        return labels
    # A device that left the inventory (fell off the bus) keeps its series so the fence stays visible.
    return ctx.orphan_labels(uuid)


def render(
    ctx: RenderContext,
    views: list[DeviceView],
    xid_counts: dict[tuple[str, int, str], int],
    file_errors: int,
    clears: int,
    write_failures: int = 0,
) -> str:
    lines = [HEALTH_STATE.header]
    lines += [HEALTH_STATE.sample(_labels(ctx, d.uuid), int(d.state)) for d in views]
    lines.append(HEALTH_REASON.header)
    for d in views:
        base = _labels(ctx, d.uuid)
        for r, cls in d.own_reasons:
            extra = format_labels((("signal", r.signal), ("code", r.code), ("class", cls), ("action", r.action)))
            lines.append(HEALTH_REASON.sample(f"{base},{extra}", 1))
    lines.append(XID_ERRORS.header)
    for (gpu, xid, cls), n in sorted(xid_counts.items()):
        lines.append(XID_ERRORS.sample(f'{_labels(ctx, gpu)},xid="{xid}",class="{escape_label_value(cls)}"', n))
    lines += [
        STATE_FILE_ERRORS.header,
        STATE_FILE_ERRORS.scalar(file_errors),
        STATE_WRITE_FAILURES.header,
        STATE_WRITE_FAILURES.scalar(write_failures),
        CLEARS.header,
        CLEARS.scalar(clears),
    ]
    return "".join(lines)
