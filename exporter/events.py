"""The one thread that owns the NVML event set.

NVML event sets are not thread-safe, so create/register/wait/free all happen
here. Events fan out to listeners (XID tracker, health engine). When the set
breaks (GPU lost, driver error) it is rebuilt with backoff, 1 s doubling to
30 s, never in a busy loop; a layout change (MIG reconfiguration) rebuilds it
too, because handles become invalid.

Whether XIDs are watched at all is visible: `monitored` holds the GPUs whose events are
registered while the wait loop runs, `gpuhealth_xid_monitoring_up` exports it per GPU, and
status listeners (the health engine) hear every change, so a dead pipeline is never silent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from exporter.backend import Backend, DeviceLostError, EventSource
from exporter.family import DEVICE_LABELS, Family
from exporter.labels import RenderContext
from exporter.logs import Reminder
from exporter.model import EVENT_GPU_LOST, EVENT_MIG_CONFIG_CHANGE, DeviceEvent, Inventory

log = structlog.get_logger("exporter.events")

WAIT_S = 0.2  # short waits so a stop or a layout change is noticed quickly
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
INCOMPLETE_RETRY_S = 30.0  # re-register when some GPUs could not be registered

XID_MONITORING_UP = Family(
    "gpuhealth_xid_monitoring_up",
    "gauge",
    "1 when the GPU's XID events are registered and the event wait loop runs; 0 when XIDs on it would be missed.",
    DEVICE_LABELS,
    "events",
)
FAMILIES = (XID_MONITORING_UP,)


class EventPump:
    metrics_part = "events"

    def __init__(
        self,
        backend: Backend,
        inventory: Callable[[], Inventory | None],
        on_layout_change: Callable[[], None],
        *,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self._backend = backend
        self._inventory = inventory
        self._on_layout_change = on_layout_change
        self._stop = threading.Event()
        # The backoff pause; a stop cuts it short. Tests pass their own to see the delays asked for.
        self._sleep = sleep or self._stop.wait
        self._listeners: list[Callable[[list[DeviceEvent]], None]] = []
        self._thread: threading.Thread | None = None
        self._status_listeners: list[Callable[[frozenset[str]], None]] = []
        self._said = Reminder()
        self.rebuilds = 0
        self.events_total = 0
        # GPUs whose events are registered in the set the loop waits on; empty while it is down.
        self.monitored: frozenset[str] = frozenset()
        self.attempted = False  # the first registration attempt has finished (either way)
        self.last_error = ""

    def add_listener(self, fn: Callable[[list[DeviceEvent]], None]) -> None:
        self._listeners.append(fn)

    def add_status_listener(self, fn: Callable[[frozenset[str]], None]) -> None:
        """`fn(monitored)` after each registration attempt and whenever the set goes down."""
        self._status_listeners.append(fn)

    def problem(self) -> str | None:
        """Why XIDs may be missed on every GPU right now (for /ready), or None."""
        if not self.attempted:
            return "XID event registration not done yet"
        if not self.monitored:
            why = f": {self.last_error}" if self.last_error else ""
            return f"no GPU is monitored for XID events{why}"
        return None

    def _set_monitored(self, uuids: frozenset[str]) -> None:
        """After a registration attempt or a failure: the first call always reaches the listeners."""
        changed = uuids != self.monitored or not self.attempted
        self.monitored = uuids
        self.attempted = True
        if not changed:
            return
        for fn in self._status_listeners:
            try:
                fn(uuids)
            except Exception:
                log.exception("event_status_listener_failed")

    def render_metrics(self, ctx: RenderContext) -> str:
        inventory = self._inventory()
        if inventory is None or not inventory.gpus:
            return ""
        monitored = self.monitored
        fam = XID_MONITORING_UP
        lines = [fam.header]
        lines += [fam.sample(ctx.device_labels(g.uuid), int(g.uuid in monitored)) for g in inventory.gpus]
        return "".join(lines)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nvml-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _dispatch(self, events: list[DeviceEvent]) -> None:
        self.events_total += len(events)
        for fn in self._listeners:
            try:
                fn(events)
            except Exception:  # one consumer's bug must not kill event delivery
                log.exception("event_listener_failed")

    def _run(self) -> None:
        backoff = BACKOFF_START_S
        quick_rebuild = True
        rebuilt_for_layout = False
        while not self._stop.is_set():
            inventory = self._inventory()
            if inventory is None or not inventory.gpus:
                self._stop.wait(0.5)
                continue
            source: EventSource | None = None
            try:
                source = self._backend.open_events(inventory)
                registered = frozenset(source.registered)
                if self._said.clear("set_failed"):
                    log.info("event_set_recovered", registered=len(registered))
                self.last_error = "" if registered else "registration failed on every GPU"
                self._set_monitored(registered)
                if rebuilt_for_layout and registered:
                    # A MIG reconfiguration between the layout change and this registration had no set
                    # to be delivered to: enumerate once more now that one is listening.
                    rebuilt_for_layout = False
                    self._on_layout_change()
                missing = sorted(g.uuid for g in inventory.gpus if g.uuid not in registered)
                if missing and self._said.due(("incomplete", tuple(missing))):
                    log.warning("event_registration_incomplete", unmonitored=missing, retry_in_s=INCOMPLETE_RETRY_S)
                # A GPU left out (lost at registration, a transient error) is tried again later.
                retry_at = time.monotonic() + INCOMPLETE_RETRY_S if missing else None
                layout = inventory.layout_key()
                quick_rebuild = True
                while not self._stop.is_set():
                    if retry_at is not None and time.monotonic() >= retry_at:
                        break
                    events = source.wait(WAIT_S)
                    if events:
                        self._dispatch(events)
                        backoff = BACKOFF_START_S
                        if any(e.event_type == EVENT_MIG_CONFIG_CHANGE for e in events):
                            self._on_layout_change()
                    current = self._inventory()
                    if current is not None and current.layout_key() != layout:
                        log.info("event_set_rebuild", reason="layout changed")
                        rebuilt_for_layout = True
                        break
            except DeviceLostError as exc:
                self.last_error = "event wait reported a lost GPU"
                uuid = str(exc.args[0]) if exc.args else ""
                # The others stay watched but for the moment of the rebuild, which skips the lost GPU.
                self._set_monitored(self.monitored - {uuid} if uuid in self.monitored else frozenset())
                log.error("event_wait_gpu_lost", uuid=uuid)
                if uuid:
                    self._dispatch([DeviceEvent(uuid, EVENT_GPU_LOST, timestamp=time.time())])
                self._on_layout_change()
                if quick_rebuild:  # the first loss since the set last worked: rebuild at once
                    quick_rebuild = False
                else:
                    self._sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
            except Exception as exc:
                self.last_error = str(exc) or type(exc).__name__
                self._set_monitored(frozenset())
                if self._said.due("set_failed"):  # once, then once a minute while it lasts
                    log.error("event_set_failed", error=repr(exc), retry_in_s=backoff)
                self._sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                if source is not None:
                    try:
                        source.close()
                    except Exception:
                        log.exception("event_set_close_failed")
            self.rebuilds += 1
