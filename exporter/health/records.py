"""Mutable per-device health records and their (de)serialisation; the engine's lock guards them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exporter.health.signals import Tracker
from exporter.health.verdict import HealthState, Reason

# A device holds at most this many distinct reasons; beyond it new codes fold into "<signal>/other"
# so that a storm of odd codes cannot grow memory (XID codes are already folded into 1..1023).
MAX_REASONS_PER_DEVICE = 64


@dataclass
class ReasonRecord:
    signal: str
    code: str
    message: str
    first_seen: float
    last_seen: float
    count: int
    action: str
    state: HealthState
    level: bool
    cls: str  # metric `class` label: the XID class, or "fence"/"warn" for other signals

    def freeze(self) -> Reason:
        return Reason(self.signal, self.code, self.message, self.first_seen, self.last_seen, self.count,
                      self.action, self.state)

    def to_json(self) -> dict[str, Any]:
        return {
            "signal": self.signal, "code": self.code, "message": self.message,
            "first_seen": self.first_seen, "last_seen": self.last_seen, "count": self.count,
            "action": self.action, "state": int(self.state), "level": self.level, "class": self.cls,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReasonRecord:
        state = HealthState(d["state"])
        return cls(d["signal"], d["code"], d["message"], float(d["first_seen"]), float(d["last_seen"]),
                   d["count"], d["action"], state, bool(d.get("level", False)),
                   str(d.get("class", "fence" if state is HealthState.UNHEALTHY else "warn")))


@dataclass
class DeviceRecord:
    uuid: str
    kind: str  # "gpu" or "mig"
    parent: str | None = None
    index: int | None = None  # GPU index (the parent's for a MIG device)
    gpu_instance_id: int | None = None
    reasons: dict[tuple[str, str], ReasonRecord] = field(default_factory=dict)
    tracker: Tracker = field(default_factory=Tracker)

    @property
    def own_state(self) -> HealthState:
        return max((r.state for r in self.reasons.values()), default=HealthState.HEALTHY)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": {"kind": self.kind, "parent": self.parent, "index": self.index, "gi": self.gpu_instance_id},
            "reasons": [r.to_json() for r in self.reasons.values()],
            "baseline": dict(self.tracker.baseline),
        }

    @classmethod
    def from_json(cls, uuid: str, d: dict[str, Any]) -> DeviceRecord:
        meta = d.get("meta", {})
        kind = meta.get("kind") if meta.get("kind") in ("gpu", "mig") else ("mig" if uuid.startswith("MIG-") else "gpu")
        parent = meta.get("parent") if isinstance(meta.get("parent"), str) else None
        index = meta.get("index") if isinstance(meta.get("index"), int) else None
        gi = meta.get("gi") if isinstance(meta.get("gi"), int) else None
        rec = cls(uuid, kind, parent, index, gi)
        for r in d.get("reasons", []):
            rr = ReasonRecord.from_json(r)
            rec.reasons[(rr.signal, rr.code)] = rr
        rec.tracker.baseline = {k: float(v) for k, v in d.get("baseline", {}).items()}
        return rec
