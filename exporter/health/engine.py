"""The health engine: signals in (events, snapshots, clears), verdicts out (HealthView, transitions).

Threading: on_events runs on the NVML event thread, on_snapshot on the collector thread, clear on
a control-socket thread; one lock guards all records. Count-only changes are persisted by a
coalescing writer (a few writes a second at most, whatever the XID rate). A change of any
device's state or reason set is written synchronously, before subscribers hear of it, so a fence
the device plugin acted on is always on disk.

Around it: the records and their operations (records), the saved document (state), the control
protocol (control), views, /gpus and metrics (expose), what the engine cannot see (blindspots).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from exporter.health import blindspots, control, expose, state
from exporter.health import policy as p
from exporter.health.control import CONTROL_SOCKET
from exporter.health.expose import top_action
from exporter.health.records import DeviceRecord, Records, reason_names
from exporter.health.signals import Finding, evaluate
from exporter.health.store import CoalescingWriter, StateStore
from exporter.health.verdict import HealthState, Reason, Verdict, is_worse
from exporter.labels import RenderContext
from exporter.model import EVENT_DOUBLE_BIT_ECC, EVENT_GPU_LOST, EVENT_XID, DeviceEvent, Inventory
from exporter.snapshot import Snapshot

__all__ = ["CONTROL_SOCKET", "HealthEngine", "Transition"]

log = structlog.get_logger()


@dataclass(frozen=True)
class Transition:
    """One device's state change, for listeners such as the node-status reporter."""

    uuid: str
    previous: HealthState
    state: HealthState
    reasons: tuple[Any, ...]  # tuple[Reason, ...] of the new verdict
    at: float
    # For a clear: who asked and why ("by uid 0 pid 4242 over the control socket: reseated"), so an
    # Event about it names them too. Empty for every other change.
    cleared: str = ""


_HEALTHY: tuple[HealthState, frozenset[tuple[str, str]]] = (HealthState.HEALTHY, frozenset())


def clear_note(reason: str, source: str, peer: control.Peer | None) -> str:
    """Who cleared and why, in words, for Events and logs."""
    who = f"uid {peer.uid} pid {peer.pid} over the control socket" if peer is not None else source
    return f"cleared by {who}: {reason}"


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
        self._records = Records()
        self._devs = self._records.devs  # the same dict, for reading
        self._inventory: Inventory | None = None
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
        self._control: control.ControlServer | None = None
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
            # First, as the lock on the state dir: a second daemon fails here, before it reads,
            # sweeps or writes anything in the first one's directory.
            loaded = lambda: self._state_loaded  # noqa: E731
            server = control.ControlServer(
                self.state_dir / CONTROL_SOCKET, control.handler(self, loaded), control.Watcher(self, loaded)
            )
            server.start()
            self._control = server
        try:
            doc = self._store.load()
            with self._lock:
                if doc is not None:
                    self._load(state.read_document(doc))
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

    def clear(
        self, target: str, reason: str, *, source: str = "control", peer: control.Peer | None = None
    ) -> list[str]:
        """Clear every reason of the target ("all", a GPU index, a GPU or MIG UUID); a GPU's MIG
        devices are cleared with it. Returns the UUIDs cleared; raises ValueError on a bad request.
        `peer`: who asked, over the control socket (logged for the audit trail)."""
        if not reason.strip():
            raise ValueError("a reason is required for every clear")
        out: list[str] = []
        self._mutate(
            lambda: out.extend(self._clear_locked(self._records.resolve(target), reason, source, peer)),
            cleared=clear_note(reason, source, peer),
        )
        return out

    # ---- the mutation protocol -------------------------------------------------------------------

    def _mutate(self, change: Callable[[], None], cleared: str = "") -> None:
        with self._lock:
            before = self._records.structure(self._overlay)
            counts_before = self._gen_counts
            change()
            after = self._records.structure(self._overlay)
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
            Transition(u, before.get(u, _HEALTHY)[0], st, self.verdict(u).reasons, now, cleared)
            for u, (st, _) in after.items()
            if st != before.get(u, _HEALTHY)[0]
        ]
        gone = [u for u in before if u not in after and before[u][0] is not HealthState.HEALTHY]
        transitions += [Transition(u, before[u][0], HealthState.HEALTHY, (), now, cleared) for u in gone]
        for t in transitions:
            level = log.warning if is_worse(t.state, t.previous) else log.info
            previous, st, action = t.previous.name.lower(), t.state.name.lower(), [r.action for r in t.reasons]
            names = reason_names(t.reasons)
            level(
                "health_transition", uuid=t.uuid, previous=previous, state=st, reasons=names, action=top_action(action)
            )
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

    # ---- applying signals (lock held) ------------------------------------------------------------

    def _upsert(self, uuid: str, f: Finding, now: float, cls: str | None = None) -> None:
        self._records.upsert(uuid, f, now, cls)
        self._gen_counts += 1

    def _apply_events(self, events: Iterable[DeviceEvent]) -> None:
        fallback = self._clock()
        for ev in events:
            now = ev.timestamp or fallback
            if ev.event_type == EVENT_XID:
                rule = self.policy.xid_rule(ev.xid)
                self._records.count_xid(ev.gpu_uuid, rule.xid, rule.cls.value)
                self._gen_counts += 1
                if rule.cls.state is HealthState.HEALTHY:
                    continue  # application / ignored: counted only
                f = Finding("xid", str(rule.xid), rule.cls.state, rule.action, rule.message, level=False)
                for uuid in self._records.xid_targets(ev, rule.whole_gpu):
                    self._upsert(uuid, f, now, rule.cls.value)
            elif ev.event_type == EVENT_GPU_LOST:
                why = "NVML event wait reports the GPU is lost"
                self._upsert(
                    ev.gpu_uuid, Finding("gpu_lost", "GPU_IS_LOST", HealthState.UNHEALTHY, p.REBOOT_NODE, why), now
                )
            elif ev.event_type == EVENT_DOUBLE_BIT_ECC:
                f = Finding("dbe", "", HealthState.UNHEALTHY, p.RESET_GPU, "double-bit ECC error event", level=False)
                self._upsert(ev.gpu_uuid, f, now)
            # Single-bit ECC and MIG config changes carry no verdict; the collector re-enumerates.

    def _apply_snapshot(self, snap: Snapshot) -> None:
        now = snap.taken_at or self._clock()
        if self._inventory is None or self._inventory.layout_key() != snap.inventory.layout_key():
            self._records.set_inventory(snap.inventory)
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
            dev = self._records.dev(sample.uuid)
            if sample.uuid in faults:
                # Not the device's fault: judge nothing, and let its grace periods start afresh.
                dev.restart_grace()
                continue
            if sample.mig is None and sample.up and not sample.stale:
                new, lost = blindspots.signal_coverage(sample, self.signals_seen)
                if new:
                    self.note_signals_seen(blindspots.model_key(sample.gpu), new)
                if lost:
                    missing[sample.uuid] = lost
            ev = evaluate(sample, dev.tracker, now, self.policy)
            if ev.reset_detected:
                self._on_reset(dev)
            for f in ev.findings:
                self._upsert(dev.uuid, f, now)
            if ev.observed:
                current = {(f.signal, f.code) for f in ev.findings}
                for key, rec in list(dev.reasons.items()):
                    if rec.level and rec.state is HealthState.DEGRADED and key not in current:
                        del dev.reasons[key]
        for uuid in snap.vanished:
            why = "GPU no longer enumerated by NVML"
            self._upsert(uuid, Finding("gpu_vanished", "", HealthState.UNHEALTHY, p.REBOOT_NODE, why), now)
        self._note_missing(missing)

    def _note_monitor_faults(self, faults: dict[str, str]) -> None:
        gpus = sorted(u for u in faults if not u.startswith("MIG-"))
        before = sorted(u for u in self._monitor_faults if not u.startswith("MIG-"))
        if gpus != before:
            if gpus:
                errors, why = sorted({faults[u] for u in gpus}), "verdicts unknown until NVML reads again"
                log.warning("monitor_fault", uuids=gpus, errors=errors, consequence=f"{why}; nothing is fenced for it")
            else:
                log.info("monitor_recovered", uuids=before)
        self._monitor_faults = faults

    def _note_missing(self, missing: dict[str, frozenset[str]]) -> None:
        for uuid, fields in missing.items():
            new = fields - self._missing.get(uuid, frozenset())
            if new:
                why = "this GPU's health checks for these fields are blind"
                log.warning("health_signal_missing", uuid=uuid, fields=sorted(new), consequence=why)
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

    def _on_reset(self, dev: DeviceRecord) -> None:
        targets = [dev.uuid, *(u for u, d in self._devs.items() if d.parent == dev.uuid)]
        has_reasons = any(self._devs[u].reasons for u in targets)
        auto = self.policy.auto_recover
        log.info("health_gpu_reset_detected", uuid=dev.uuid, auto_recover=auto, has_reasons=has_reasons)
        # Only a reset seen on a device that reads fine this cycle counts (evaluate reports resets only
        # for fresh samples); conditions that persist after the reset come straight back below.
        if auto and has_reasons:
            self._clear_locked(targets, "automatic recovery: GPU reset detected", "auto")

    def _clear_locked(self, uuids: list[str], reason: str, source: str, peer: control.Peer | None = None) -> list[str]:
        removed = self._records.clear(uuids)
        self._gen_counts += 1
        who = {} if peer is None else {"peer_uid": peer.uid, "peer_pid": peer.pid, "peer_gid": peer.gid}
        log.warning("health_cleared", uuids=uuids, reason=reason, source=source, removed_reasons=removed, **who)
        return uuids

    # ---- persistence -----------------------------------------------------------------------------

    def _render_doc(self) -> tuple[dict[str, Any], int]:
        with self._lock:
            self._gen += 1
            r = self._records
            doc = state.Document(r.devs, r.xid_counts, r.clears_total, self.signals_seen)
            return state.document(doc, self._clock()), self._gen

    def _load(self, doc: state.Document) -> None:
        self._devs.update(doc.devices)
        self._records.xid_counts.update(doc.xid_counts)
        self._records.clears_total = doc.clears_total
        self.signals_seen = doc.signals_seen

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
            return self._records.verdict(uuid, self._overlay)

    def verdicts(self) -> Mapping[str, Verdict]:
        with self._lock:
            return {u: self.verdict(u) for u in self._devs}

    # ---- views and output (exporter/health/expose.py); list() and clear() serve the control socket --

    def devices(self) -> list[expose.DeviceView]:
        with self._lock:
            return expose.device_views(self._devs, self._overlay, self.verdict)

    def gpus_json(self) -> bytes:
        return expose.gpus_json(self.list())

    def render_metrics(self, ctx: RenderContext) -> str:
        with self._lock:
            r = self._records
            e = expose.Exposed(self.devices(), self._inventory, dict(r.xid_counts), r.clears_total, dict(self._missing))
        return expose.render_metrics(ctx, e, self._store.file_errors, self._store.write_failures)

    def list(self) -> list[dict[str, Any]]:
        return expose.devices_json(self.devices())
