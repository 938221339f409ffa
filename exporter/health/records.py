"""Per-device health records and the operations on them; the engine's lock guards them.

No locking, no I/O and no logging here: the engine (exporter/health/engine.py) decides when a change
happens, persists it and tells the world; the saved form of these records is exporter/health/state.py's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from exporter.health.signals import Finding, Tracker
from exporter.health.verdict import HealthState, Reason, Verdict, combine
from exporter.model import DeviceEvent, Inventory

# A device holds at most this many distinct reasons; beyond it new codes fold into "<signal>/other"
# so that a storm of odd codes cannot grow memory (XID codes are already folded into 1..1023).
MAX_REASONS_PER_DEVICE = 64

NOT_ATTRIBUTED = 0xFFFFFFFF  # NVML's "no GPU instance" value, in case an adapter passes it through


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
        return Reason(
            self.signal, self.code, self.message, self.first_seen, self.last_seen, self.count, self.action, self.state
        )


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

    def restart_grace(self) -> None:
        """Hangs and failures must outlast a fresh grace period before they fence (again)."""
        self.tracker.failing_since = None
        self.tracker.slowdown_since = None


class _Named(Protocol):
    @property
    def signal(self) -> str: ...
    @property
    def code(self) -> str: ...


def reason_names(reasons: Iterable[_Named]) -> list[str]:
    """`signal:code` (or `signal`) of each reason, for the logs."""
    return [f"{r.signal}:{r.code}" if r.code else r.signal for r in reasons]


# Each device not plainly healthy: its state and the (signal, code) of its reasons.
Structure = dict[str, tuple[HealthState, frozenset[tuple[str, str]]]]
Overlay = dict[str, tuple[Reason, ...]]  # reasons of the monitor's (blind spots), recorded on no device


class Records:
    """Every device's record, the XID counts by (GPU, XID, class), and the clears made."""

    def __init__(self) -> None:
        self.devs: dict[str, DeviceRecord] = {}
        self.xid_counts: dict[tuple[str, int, str], int] = {}
        self.clears_total = 0
        self._gi_map: dict[tuple[str, int], tuple[str, ...]] = {}

    def dev(self, uuid: str) -> DeviceRecord:
        dev = self.devs.get(uuid)
        if dev is None:
            dev = DeviceRecord(uuid, "mig" if uuid.startswith("MIG-") else "gpu")
            self.devs[uuid] = dev
        return dev

    def parent_state(self, dev: DeviceRecord) -> HealthState:
        if dev.parent is None:
            return HealthState.HEALTHY
        parent = self.devs.get(dev.parent)
        return parent.own_state if parent is not None else HealthState.HEALTHY

    def structure(self, overlay: Overlay) -> Structure:
        """What a change must be persisted and published for (the parent's and the overlay's included)."""
        out: Structure = {}
        for uuid, dev in self.devs.items():
            extra = overlay.get(uuid, ())
            if dev.parent is not None:
                extra += overlay.get(dev.parent, ())
            if dev.reasons or extra or self.parent_state(dev) is not HealthState.HEALTHY:
                state = combine([dev.own_state, self.parent_state(dev), *(r.state for r in extra)])
                out[uuid] = (state, frozenset(dev.reasons) | {(r.signal, r.code) for r in extra})
        return out

    def verdict(self, uuid: str, overlay: Overlay) -> Verdict:
        dev = self.devs.get(uuid)
        if dev is None:
            return Verdict(uuid, HealthState.HEALTHY)
        reasons = [r.freeze() for r in dev.reasons.values()]
        reasons += overlay.get(uuid, ())
        parent = self.devs.get(dev.parent) if dev.parent else None
        if parent is not None:  # GPU-wide faults reach every MIG device of the GPU
            reasons += [r.freeze() for r in parent.reasons.values()]
            reasons += overlay.get(parent.uuid, ())
        state = combine(r.state for r in reasons)
        return Verdict(uuid, state, tuple(sorted(reasons, key=lambda r: (-r.state, r.first_seen))))

    def upsert(self, uuid: str, f: Finding, now: float, cls: str | None = None) -> None:
        dev = self.dev(uuid)
        key = (f.signal, f.code)
        rec = dev.reasons.get(key)
        if rec is None and len(dev.reasons) >= MAX_REASONS_PER_DEVICE:
            key = (f.signal, "other")
            rec = dev.reasons.get(key)
        if rec is None:
            klass = cls or ("fence" if f.state is HealthState.UNHEALTHY else "warn")
            dev.reasons[key] = ReasonRecord(
                f.signal, key[1], f.message, now, now, f.count, f.action, f.state, f.level, klass
            )
        else:
            rec.last_seen = max(rec.last_seen, now)
            if not f.level:
                rec.count += f.count
            if f.state > rec.state:  # e.g. a code folded into "other" that is worse than its first
                rec.state, rec.action = f.state, f.action

    def count_xid(self, gpu: str, xid: int, cls: str) -> None:
        key = (gpu, xid, cls)
        self.xid_counts[key] = self.xid_counts.get(key, 0) + 1

    def xid_targets(self, ev: DeviceEvent, whole_gpu: bool) -> tuple[str, ...]:
        gi = ev.gpu_instance_id
        if whole_gpu or gi is None or gi == NOT_ATTRIBUTED:
            return (ev.gpu_uuid,)
        # Every compute instance of the GPU instance: they share its memory and engines. An instance
        # we do not know (inventory not yet seen, reconfigured) falls back to the whole GPU: safer.
        return self._gi_map.get((ev.gpu_uuid, gi), (ev.gpu_uuid,))

    def set_inventory(self, inv: Inventory) -> None:
        gi_map: dict[tuple[str, int], list[str]] = {}
        for gpu in inv.gpus:
            g = self.dev(gpu.uuid)
            g.kind, g.index, g.parent = "gpu", gpu.index, None
            for mig in gpu.migs:
                m = self.dev(mig.uuid)
                m.kind, m.parent, m.index, m.gpu_instance_id = "mig", gpu.uuid, gpu.index, mig.gpu_instance_id
                gi_map.setdefault((gpu.uuid, mig.gpu_instance_id), []).append(mig.uuid)
        self._gi_map = {k: tuple(v) for k, v in gi_map.items()}
        # Forget healthy devices that are gone (old MIG layouts) so records do not accumulate.
        present = {g.uuid for g in inv.gpus} | {m.uuid for g in inv.gpus for m in g.migs}
        for uuid in [u for u, d in self.devs.items() if u not in present and not d.reasons and d.kind == "mig"]:
            del self.devs[uuid]

    def resolve(self, target: str) -> list[str]:
        """The UUIDs a clear of `target` ("all", a GPU index, a GPU or MIG UUID) covers; a GPU's MIG
        devices come with it. Raises ValueError when nothing matches."""
        t = target.strip()
        if t == "all":
            return list(self.devs)
        if t.isdigit():
            gpus = [u for u, d in self.devs.items() if d.kind == "gpu" and d.index == int(t)]
        elif t in self.devs:
            gpus = [t]
        else:
            gpus = []
        if not gpus:
            raise ValueError(f"no GPU or MIG device matches {target!r} (use a UUID, a GPU index or 'all')")
        return [*gpus, *(u for u, d in self.devs.items() if d.parent in gpus)]

    def clear(self, uuids: list[str]) -> list[str]:
        """Drop every reason of `uuids` (one clear); returns the names of the reasons removed."""
        removed = []
        for uuid in uuids:
            dev = self.devs[uuid]
            removed += reason_names(dev.reasons.values())
            dev.reasons.clear()
            dev.restart_grace()
        self.clears_total += 1
        return removed
