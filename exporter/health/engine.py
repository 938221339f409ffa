"""The health engine: signals in (events, snapshots), verdicts out (HealthView, metrics, /gpus).

Threading: on_events runs on the NVML event thread, on_snapshot on the collector thread, clear on
a control-socket thread; one lock guards all records. Count-only changes are persisted by a
coalescing writer (a few writes a second at most, whatever the XID rate). A change of any
device's state or reason set is written synchronously, before subscribers hear of it, so a fence
the device plugin acted on is always on disk.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from exporter.health import blindspots, expose
from exporter.health import policy as p
from exporter.health.records import MAX_REASONS_PER_DEVICE, DeviceRecord, ReasonRecord
from exporter.health.signals import Finding, evaluate
from exporter.health.state import SCHEMA_VERSION, CoalescingWriter, StateStore
from exporter.health.verdict import HealthState, Reason, Verdict, combine, is_worse
from exporter.labels import RenderContext
from exporter.model import EVENT_DOUBLE_BIT_ECC, EVENT_GPU_LOST, EVENT_XID, DeviceEvent, Inventory
from exporter.snapshot import Snapshot

log = structlog.get_logger()

_NOT_ATTRIBUTED = 0xFFFFFFFF  # NVML's "no GPU instance" value, in case an adapter passes it through

CONTROL_SOCKET = "control.sock"


@dataclass(frozen=True)
class Transition:
    """One device's state change, for listeners such as the node-status reporter."""

    uuid: str
    previous: HealthState
    state: HealthState
    reasons: tuple[Any, ...]  # tuple[Reason, ...] of the new verdict
    at: float


_Structure = dict[str, tuple[HealthState, frozenset[tuple[str, str]]]]


class HealthEngine:
    metrics_part = "health"  # the part label of gpuhealth_render_success

    def __init__(
        self,
        policy: p.Policy,
        state_dir: Path,
        clock: Callable[[], float] = time.time,
        *,
        control_socket: bool = True,
        max_writes_per_s: float = 4.0,
    ) -> None:
        self.policy = policy
        self.state_dir = Path(state_dir)
        self._clock = clock
        self._lock = threading.RLock()
        self._devs: dict[str, DeviceRecord] = {}
        self._xid_counts: dict[tuple[str, int, str], int] = {}
        self._inventory: Inventory | None = None
        self._gi_map: dict[tuple[str, int], tuple[str, ...]] = {}
        self._clears_total = 0
        self._gen = 0
        # Bumped on every count change so _mutate can tell "counts only" from "nothing".
        self._gen_counts = 0
        self._subscribers: list[Callable[[], None]] = []
        # What we cannot see (exporter/health/blindspots.py): recomputed every cycle, never persisted.
        self._coverage = blindspots.XidCoverage()
        self._overlay: dict[str, tuple[Reason, ...]] = {}
        self._monitor_faults: dict[str, str] = {}
        self._missing: dict[str, frozenset[str]] = {}
        # Health fields GPUs of each model (and MIG mode) have reported: persisted (schema 2).
        self.signals_seen: dict[str, set[str]] = {}
        self._listeners: list[Callable[[list[Transition]], None]] = []
        self._store = StateStore(self.state_dir, clock)
        self._writer = CoalescingWriter(self._store, self._render_doc, max_writes_per_s)
        self._want_control = control_socket
        self._control: Any = None
        self._started = False
        self._state_loaded = False  # set under the lock once the file's records are in memory

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the control socket (unless disabled), load persisted state, start the writer.

        Raises control.ControlError when the socket cannot be served (another daemon on this state
        dir, a non-socket in the way); a corrupt state file is not an error (moved aside, logged).
        A start that fails writes nothing: only a loaded state is ever written back.
        """
        self._store.prepare()
        if self._want_control:
            from exporter.health.control import ControlServer

            def handle(req: dict[str, Any]) -> dict[str, Any]:
                if not self._state_loaded:  # the socket is up a moment before the file is read
                    return {"ok": False, "error": "starting: the health state is not loaded yet; retry"}
                return self._handle_control(req)

            # First, as the lock on the state dir: a second daemon fails here, before it reads,
            # sweeps or writes anything in the first one's directory.
            control = ControlServer(self.state_dir / CONTROL_SOCKET, handle)
            control.start()
            self._control = control
        try:
            doc = self._store.load()
            with self._lock:
                if doc is not None:
                    self._load(doc)
                self._state_loaded = True
        except BaseException:
            self.stop()  # leave nothing running behind a failed start
            raise
        self._writer.start()
        self._started = True
        fenced = [u for u, v in self.verdicts().items() if v.state is HealthState.UNHEALTHY]
        log.info("health_engine_started", state_file=str(self._store.path), fenced_uuids=fenced)

    def stop(self) -> None:
        if self._control is not None:
            self._control.stop()
            self._control = None
        self._writer.stop()  # flushes only if started: a failed or absent start writes nothing
        self._started = False

    @property
    def state_file_errors(self) -> int:
        return self._store.file_errors

    def durability_problem(self) -> str | None:
        """Why the newest verdict is not on disk yet (writes failing, being retried), or None.

        A fence that is only in memory is forgotten by a restart, so /ready reports this.
        """
        return self._store.problem()

    def subscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def add_transition_listener(self, callback: Callable[[list[Transition]], None]) -> None:
        """`callback(transitions)` after each persisted batch of state changes; must not block."""
        with self._lock:
            self._listeners.append(callback)

    # ---- inputs ----------------------------------------------------------------------------------

    def on_events(self, events: list[DeviceEvent]) -> None:
        if events:
            self._mutate(lambda: self._apply_events(events))

    def on_snapshot(self, snapshot: Snapshot) -> None:
        self._mutate(lambda: self._apply_snapshot(snapshot))

    def clear(self, target: str, reason: str, *, source: str = "control") -> list[str]:
        """Clear every reason of the target ("all", a GPU index, a GPU or MIG UUID); a GPU's MIG
        devices are cleared with it. Returns the UUIDs cleared; raises ValueError on a bad request."""
        if not reason.strip():
            raise ValueError("a reason is required for every clear")
        out: list[str] = []
        self._mutate(lambda: out.extend(self._clear_locked(self._resolve(target), reason, source)))
        return out

    # ---- the mutation protocol -------------------------------------------------------------------

    def _mutate(self, change: Callable[[], None]) -> None:
        with self._lock:
            before = self._structure()
            counts_before = self._gen_counts
            change()
            after = self._structure()
            structural = before != after
            if structural:
                doc, gen = self._render_doc()
            elif self._gen_counts != counts_before:
                self._writer.mark_dirty()
        if not structural:
            return
        self._store.write(doc, gen)  # before anyone hears of it: a published fence is on disk
        now = self._clock()
        transitions = [
            Transition(u, before.get(u, (HealthState.HEALTHY, frozenset()))[0], st, self.verdict(u).reasons, now)
            for u, (st, _) in after.items()
            if st != before.get(u, (HealthState.HEALTHY, frozenset()))[0]
        ]
        transitions += [Transition(u, before[u][0], HealthState.HEALTHY, (), now)
                        for u in before if u not in after and before[u][0] is not HealthState.HEALTHY]
        for t in transitions:
            reasons = [f"{r.signal}:{r.code}" if r.code else r.signal for r in t.reasons]
            actions = [r.action for r in t.reasons]
            level = log.warning if is_worse(t.state, t.previous) else log.info
            level("health_transition", uuid=t.uuid, previous=t.previous.name.lower(), state=t.state.name.lower(),
                  reasons=reasons, action=expose.top_action(actions))
        self._publish(transitions)

    def _publish(self, transitions: list[Transition]) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
            listeners = list(self._listeners)
        for cb in subscribers:
            try:
                cb()
            except Exception:
                log.exception("health_subscriber_failed")
        if transitions:
            for lcb in listeners:
                try:
                    lcb(transitions)
                except Exception:
                    log.exception("health_listener_failed")

    def _structure(self) -> _Structure:
        out: _Structure = {}
        overlay = self._overlay
        for uuid, dev in self._devs.items():
            extra = overlay.get(uuid, ())
            if dev.parent is not None:
                extra += overlay.get(dev.parent, ())
            if dev.reasons or extra or self._parent_state(dev) is not HealthState.HEALTHY:
                state = combine([dev.own_state, self._parent_state(dev), *(r.state for r in extra)])
                out[uuid] = (state, frozenset(dev.reasons) | {(r.signal, r.code) for r in extra})
        return out

    def _parent_state(self, dev: DeviceRecord) -> HealthState:
        if dev.parent is None:
            return HealthState.HEALTHY
        parent = self._devs.get(dev.parent)
        return parent.own_state if parent is not None else HealthState.HEALTHY

    # ---- applying signals (lock held) ------------------------------------------------------------

    def _dev(self, uuid: str) -> DeviceRecord:
        dev = self._devs.get(uuid)
        if dev is None:
            dev = DeviceRecord(uuid, "mig" if uuid.startswith("MIG-") else "gpu")
            self._devs[uuid] = dev
        return dev

    def _upsert(self, uuid: str, f: Finding, now: float, cls: str | None = None) -> None:
        dev = self._dev(uuid)
        key = (f.signal, f.code)
        rec = dev.reasons.get(key)
        if rec is None and len(dev.reasons) >= MAX_REASONS_PER_DEVICE:
            key = (f.signal, "other")
            rec = dev.reasons.get(key)
        if rec is None:
            klass = cls or ("fence" if f.state is HealthState.UNHEALTHY else "warn")
            dev.reasons[key] = ReasonRecord(f.signal, key[1], f.message, now, now, f.count, f.action, f.state,
                                            f.level, klass)
        else:
            rec.last_seen = max(rec.last_seen, now)
            if not f.level:
                rec.count += f.count
            if f.state > rec.state:  # e.g. a code folded into "other" that is worse than its first
                rec.state, rec.action = f.state, f.action
        self._gen_counts += 1

    def _apply_events(self, events: Iterable[DeviceEvent]) -> None:
        fallback = self._clock()
        for ev in events:
            now = ev.timestamp or fallback
            if ev.event_type == EVENT_XID:
                rule = self.policy.xid_rule(ev.xid)
                key = (ev.gpu_uuid, rule.xid, rule.cls.value)
                self._xid_counts[key] = self._xid_counts.get(key, 0) + 1
                self._gen_counts += 1
                if rule.cls.state is HealthState.HEALTHY:
                    continue  # application / ignored: counted only
                f = Finding("xid", str(rule.xid), rule.cls.state, rule.action, rule.message, level=False)
                for uuid in self._xid_targets(ev, rule.whole_gpu):
                    self._upsert(uuid, f, now, rule.cls.value)
            elif ev.event_type == EVENT_GPU_LOST:
                self._upsert(ev.gpu_uuid, Finding("gpu_lost", "GPU_IS_LOST", HealthState.UNHEALTHY, p.REBOOT_NODE,
                                                  "NVML event wait reports the GPU is lost"), now)
            elif ev.event_type == EVENT_DOUBLE_BIT_ECC:
                self._upsert(ev.gpu_uuid, Finding("dbe", "", HealthState.UNHEALTHY, p.RESET_GPU,
                                                  "double-bit ECC error event", level=False), now)
            # Single-bit ECC and MIG config changes carry no verdict; the collector re-enumerates.

    def _xid_targets(self, ev: DeviceEvent, whole_gpu: bool) -> tuple[str, ...]:
        gi = ev.gpu_instance_id
        if whole_gpu or gi is None or gi == _NOT_ATTRIBUTED:
            return (ev.gpu_uuid,)
        # Every compute instance of the GPU instance: they share its memory and engines. An instance
        # we do not know (inventory not yet seen, reconfigured) falls back to the whole GPU: safer.
        return self._gi_map.get((ev.gpu_uuid, gi), (ev.gpu_uuid,))

    def _apply_snapshot(self, snap: Snapshot) -> None:
        now = snap.taken_at or self._clock()
        if self._inventory is None or self._inventory.layout_key() != snap.inventory.layout_key():
            self._set_inventory(snap.inventory)
        self._inventory = snap.inventory
        faults = blindspots.monitor_faults(snap)
        self._note_monitor_faults(faults)
        overlay: dict[str, tuple[Reason, ...]] = {
            u: (blindspots.monitor_fault_reason(e, now),) for u, e in faults.items()
        }
        for uuid, since in self._coverage.unmonitored(snap.inventory.gpus, now).items():
            overlay[uuid] = (*overlay.get(uuid, ()), blindspots.unmonitored_reason(since, now))
        self._overlay = overlay
        missing: dict[str, frozenset[str]] = {}
        for sample in snap.samples:
            dev = self._dev(sample.uuid)
            if sample.uuid in faults:
                # Not the device's fault: judge nothing, and let its grace periods start afresh.
                dev.tracker.failing_since = None
                dev.tracker.slowdown_since = None
                continue
            if sample.mig is None and sample.up and not sample.stale:
                new, lost = blindspots.signal_coverage(sample, self.signals_seen)
                if new:
                    self.signals_seen.setdefault(blindspots.model_key(sample.gpu), set()).update(new)
                    self._gen_counts += 1
                if lost:
                    missing[sample.uuid] = lost
            ev = evaluate(sample, dev.tracker, now, self.policy)
            if ev.reset_detected:
                self._on_reset(dev, ev.findings)
            for f in ev.findings:
                self._upsert(dev.uuid, f, now)
            if ev.observed:
                current = {(f.signal, f.code) for f in ev.findings}
                for key, rec in list(dev.reasons.items()):
                    if rec.level and rec.state is HealthState.DEGRADED and key not in current:
                        del dev.reasons[key]
        for uuid in snap.vanished:
            self._upsert(uuid, Finding("gpu_vanished", "", HealthState.UNHEALTHY, p.REBOOT_NODE,
                                       "GPU no longer enumerated by NVML"), now)
        self._note_missing(missing)

    def _note_monitor_faults(self, faults: dict[str, str]) -> None:
        gpus = sorted(u for u in faults if not u.startswith("MIG-"))
        before = sorted(u for u in self._monitor_faults if not u.startswith("MIG-"))
        if gpus != before:
            if gpus:
                log.warning("monitor_fault", uuids=gpus, errors=sorted({faults[u] for u in gpus}),
                            consequence="verdicts unknown until NVML reads again; nothing is fenced for it")
            else:
                log.info("monitor_recovered", uuids=before)
        self._monitor_faults = faults

    def _note_missing(self, missing: dict[str, frozenset[str]]) -> None:
        for uuid, fields in missing.items():
            new = fields - self._missing.get(uuid, frozenset())
            if new:
                log.warning("health_signal_missing", uuid=uuid, fields=sorted(new),
                            consequence="this GPU's health checks for these fields are blind")
        for uuid, fields in self._missing.items():
            back = fields - missing.get(uuid, frozenset())
            if back:
                log.info("health_signal_back", uuid=uuid, fields=sorted(back))
        self._missing = missing

    def set_xid_monitoring(self, monitored: frozenset[str]) -> None:
        """From the event thread: the GPUs whose XID events are registered now."""
        with self._lock:
            self._coverage.update(monitored)

    def monitor_problem(self) -> str | None:
        """Why verdicts cannot be trusted right now (for /ready), or None."""
        with self._lock:
            faults = {u: e for u, e in self._monitor_faults.items() if not u.startswith("MIG-")}
        if not faults:
            return None
        errors = ", ".join(sorted(set(faults.values())))
        return f"monitor fault: NVML fails for a reason of ours ({errors}) on {len(faults)} GPU(s); verdicts unknown"

    def _on_reset(self, dev: DeviceRecord, findings: list[Finding]) -> None:
        targets = [dev.uuid, *(u for u, d in self._devs.items() if d.parent == dev.uuid)]
        has_reasons = any(self._devs[u].reasons for u in targets)
        log.info("health_gpu_reset_detected", uuid=dev.uuid, auto_recover=self.policy.auto_recover,
                 has_reasons=has_reasons)
        # Only a reset seen on a device that reads fine this cycle counts (evaluate reports resets only
        # for fresh samples); conditions that persist after the reset come straight back below.
        if self.policy.auto_recover and has_reasons:
            self._clear_locked(targets, "automatic recovery: GPU reset detected", "auto")

    def _set_inventory(self, inv: Inventory) -> None:
        gi_map: dict[tuple[str, int], list[str]] = {}
        for gpu in inv.gpus:
            g = self._dev(gpu.uuid)
            g.kind, g.index, g.parent = "gpu", gpu.index, None
            for mig in gpu.migs:
                m = self._dev(mig.uuid)
                m.kind, m.parent, m.index, m.gpu_instance_id = "mig", gpu.uuid, gpu.index, mig.gpu_instance_id
                gi_map.setdefault((gpu.uuid, mig.gpu_instance_id), []).append(mig.uuid)
        self._gi_map = {k: tuple(v) for k, v in gi_map.items()}
        # Forget healthy devices that are gone (old MIG layouts) so records do not accumulate.
        present = {g.uuid for g in inv.gpus} | {m.uuid for g in inv.gpus for m in g.migs}
        for uuid in [u for u, d in self._devs.items() if u not in present and not d.reasons and d.kind == "mig"]:
            del self._devs[uuid]

    # ---- clear -----------------------------------------------------------------------------------

    def _resolve(self, target: str) -> list[str]:
        with self._lock:
            t = target.strip()
            if t == "all":
                return list(self._devs)
            if t.isdigit():
                gpus = [u for u, d in self._devs.items() if d.kind == "gpu" and d.index == int(t)]
            elif t in self._devs:
                gpus = [t]
            else:
                gpus = []
            if not gpus:
                raise ValueError(f"no GPU or MIG device matches {target!r} (use a UUID, a GPU index or 'all')")
            return [*gpus, *(u for u, d in self._devs.items() if d.parent in gpus)]

    def _clear_locked(self, uuids: list[str], reason: str, source: str) -> list[str]:
        removed = []
        for uuid in uuids:
            dev = self._devs[uuid]
            removed += [f"{r.signal}:{r.code}" if r.code else r.signal for r in dev.reasons.values()]
            dev.reasons.clear()
            # Hangs and failures must outlast a fresh grace period before fencing again.
            dev.tracker.failing_since = None
            dev.tracker.slowdown_since = None
        self._clears_total += 1
        self._gen_counts += 1
        log.warning("health_cleared", uuids=uuids, reason=reason, source=source, removed_reasons=removed)
        return uuids

    # ---- persistence -----------------------------------------------------------------------------

    def _render_doc(self) -> tuple[dict[str, Any], int]:
        with self._lock:
            self._gen += 1
            doc = {
                "schema": SCHEMA_VERSION,
                "written_at": self._clock(),
                "devices": {u: d.to_json() for u, d in self._devs.items()},
                "xid_counts": [{"gpu": g, "xid": x, "class": c, "count": n}
                               for (g, x, c), n in sorted(self._xid_counts.items())],
                "clears_total": self._clears_total,
                "signals_seen": {m: sorted(f) for m, f in sorted(self.signals_seen.items())},
            }
            return doc, self._gen

    def _load(self, doc: dict[str, Any]) -> None:
        for uuid, d in doc.get("devices", {}).items():
            self._devs[uuid] = DeviceRecord.from_json(uuid, d)
        for c in doc.get("xid_counts", []):
            self._xid_counts[(c["gpu"], c["xid"], c["class"])] = c["count"]
        clears = doc.get("clears_total", 0)
        self._clears_total = clears if isinstance(clears, int) else 0
        # validate() brought any older schema to the current one: signals_seen is always there.
        self.signals_seen = {m: set(f) for m, f in doc.get("signals_seen", {}).items()}

    def note_signals_seen(self, model: str, fields: Iterable[str]) -> None:
        """Record health fields that GPUs of `model` report; persisted (coalesced) when one is new."""
        with self._lock:
            new = set(fields) - self.signals_seen.get(model, set())
            if not new:
                return
            self.signals_seen.setdefault(model, set()).update(new)
        self._writer.mark_dirty()

    # ---- HealthView ------------------------------------------------------------------------------

    def verdict(self, uuid: str) -> Verdict:
        with self._lock:
            dev = self._devs.get(uuid)
            if dev is None:
                return Verdict(uuid, HealthState.HEALTHY)
            reasons = [r.freeze() for r in dev.reasons.values()]
            reasons += self._overlay.get(uuid, ())
            parent = self._devs.get(dev.parent) if dev.parent else None
            if parent is not None:  # GPU-wide faults reach every MIG device of the GPU
                reasons += [r.freeze() for r in parent.reasons.values()]
                reasons += self._overlay.get(parent.uuid, ())
            state = combine(r.state for r in reasons)
            return Verdict(uuid, state, tuple(sorted(reasons, key=lambda r: (-r.state, r.first_seen))))

    def verdicts(self) -> Mapping[str, Verdict]:
        with self._lock:
            return {u: self.verdict(u) for u in self._devs}

    # ---- exposure --------------------------------------------------------------------------------

    def devices(self) -> list[expose.DeviceView]:
        with self._lock:
            views = []
            for uuid, dev in self._devs.items():
                v = self.verdict(uuid)
                own = tuple(sorted((r for r in dev.reasons.values()), key=lambda r: (-r.state, r.first_seen)))
                # Blind spots are the monitor's, recorded on no device: shown with class "monitor".
                mine = (*((r.freeze(), r.cls) for r in own), *((r, "monitor") for r in self._overlay.get(uuid, ())))
                views.append(expose.DeviceView(uuid, dev.kind, dev.index, dev.parent, dev.gpu_instance_id,
                                               v.state, v.reasons, mine))
            return sorted(views, key=lambda d: (d.index if d.index is not None else 1 << 30, d.kind, d.uuid))

    def list(self) -> list[dict[str, Any]]:
        return [expose.device_json(d) for d in self.devices()]

    def gpus_json(self) -> bytes:
        return json.dumps({"devices": self.list()}, indent=1).encode() + b"\n"

    def render_metrics(self, ctx: RenderContext) -> str:
        with self._lock:
            inv = self._inventory
            present = set() if inv is None else (
                {g.uuid for g in inv.gpus} | {m.uuid for g in inv.gpus for m in g.migs})
            views = [d for d in self.devices() if d.uuid in present or d.own_reasons]
            counts = dict(self._xid_counts)
            clears = self._clears_total
            missing = {u: f for u, f in self._missing.items() if u in present}
        return (expose.render(ctx, views, counts, self._store.file_errors, clears, self._store.write_failures)
                + blindspots.render_signal_missing(ctx, missing))

    # ---- control socket --------------------------------------------------------------------------

    def _handle_control(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "list":
            return {"ok": True, "devices": self.list()}
        if op == "clear":
            target, reason = req.get("target"), req.get("reason")
            if not isinstance(target, str) or not isinstance(reason, str):
                return {"ok": False, "error": "clear needs string 'target' and 'reason'"}
            try:
                return {"ok": True, "cleared": self.clear(target, reason)}
            except ValueError as e:
                return {"ok": False, "error": str(e)}
        return {"ok": False, "error": f"unknown op {op!r}"}
