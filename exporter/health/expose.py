"""Health as metrics text and as /gpus JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.family import DEVICE_LABELS, Family
from exporter.health.policy import ACTION_RANK, NONE
from exporter.health.verdict import HealthState, Reason
from exporter.labels import RenderContext, escape_label_value, format_labels

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


def top_action(actions: list[str]) -> str:
    """The one thing to do for a device: the most drastic recommended action."""
    return max(actions, key=lambda a: ACTION_RANK.get(a, 0), default=NONE)


def reason_json(r: Reason) -> dict[str, Any]:
    return {
        "signal": r.signal, "code": r.code, "message": r.message, "state": r.state.name.lower(),
        "first_seen": r.first_seen, "last_seen": r.last_seen, "count": r.count, "action": r.action,
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
