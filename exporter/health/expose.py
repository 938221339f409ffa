"""Health as metrics text and as /gpus JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exporter.health.policy import ACTION_RANK, NONE
from exporter.health.verdict import HealthState, Reason
from exporter.labels import PREFIX, RenderContext, escape_label_value


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
    lines: list[str] = []
    name = PREFIX + "health_state"
    lines += [f"# HELP {name} Health verdict: 0 healthy, 1 degraded, 2 unhealthy (fenced), 3 unknown (the monitor "
              "cannot judge the device; allocation unchanged).", f"# TYPE {name} gauge"]
    lines += [f"{name}{{{_labels(ctx, d.uuid)}}} {int(d.state)}" for d in views]
    name = PREFIX + "health_reason"
    lines += [f"# HELP {name} 1 per active health reason recorded on the device.", f"# TYPE {name} gauge"]
    for d in views:
        base = _labels(ctx, d.uuid)
        for r, cls in d.own_reasons:
            extra = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in
                             (("signal", r.signal), ("code", r.code), ("class", cls), ("action", r.action)))
            lines.append(f"{name}{{{base},{extra}}} 1")
    name = PREFIX + "xid_errors_total"
    lines += [f"# HELP {name} XID errors by code and policy class (persisted across restarts).",
              f"# TYPE {name} counter"]
    for (gpu, xid, cls), n in sorted(xid_counts.items()):
        lines.append(f'{name}{{{_labels(ctx, gpu)},xid="{xid}",class="{escape_label_value(cls)}"}} {n}')
    name = PREFIX + "health_state_file_errors_total"
    lines += [f"# HELP {name} Corrupt or unreadable health state files moved aside.", f"# TYPE {name} counter",
              f"{name} {file_errors}"]
    name = PREFIX + "health_state_write_failures_total"
    lines += [
        f"# HELP {name} Failed writes of the health state file; the newest verdicts are retried until they are "
        "on disk.",
        f"# TYPE {name} counter",
        f"{name} {write_failures}",
    ]
    name = PREFIX + "health_clears_total"
    lines += [f"# HELP {name} Explicit and automatic health clears.", f"# TYPE {name} counter", f"{name} {clears}"]
    return "\n".join(lines) + "\n"
