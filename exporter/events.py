"""The one thread that owns the NVML event set.

NVML event sets are not thread-safe, so create/register/wait/free all happen
here. Events fan out to listeners (XID tracker, health engine). When the set
breaks (GPU lost, driver error) it is rebuilt with backoff, 1 s doubling to
30 s, never in a busy loop; a layout change (MIG reconfiguration) rebuilds it
too, because handles become invalid.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from exporter.backend import Backend, DeviceLostError, EventSource
from exporter.model import EVENT_GPU_LOST, EVENT_MIG_CONFIG_CHANGE, DeviceEvent, Inventory

log = structlog.get_logger("exporter.events")

WAIT_S = 0.2  # short waits so a stop or a layout change is noticed quickly
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0


class EventPump:
    def __init__(
        self,
        backend: Backend,
        inventory: Callable[[], Inventory | None],
        on_layout_change: Callable[[], None],
    ) -> None:
        self._backend = backend
        self._inventory = inventory
        self._on_layout_change = on_layout_change
        self._listeners: list[Callable[[list[DeviceEvent]], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rebuilds = 0
        self.events_total = 0
        self.healthy = False  # event set open and waiting

    def add_listener(self, fn: Callable[[list[DeviceEvent]], None]) -> None:
        self._listeners.append(fn)

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
        while not self._stop.is_set():
            inventory = self._inventory()
            if inventory is None or not inventory.gpus:
                self._stop.wait(0.5)
                continue
            source: EventSource | None = None
            try:
                source = self._backend.open_events(inventory)
                self.healthy = True
                layout = inventory.layout_key()
                while not self._stop.is_set():
                    events = source.wait(WAIT_S)
                    if events:
                        self._dispatch(events)
                        backoff = BACKOFF_START_S
                        if any(e.event_type == EVENT_MIG_CONFIG_CHANGE for e in events):
                            self._on_layout_change()
                    current = self._inventory()
                    if current is not None and current.layout_key() != layout:
                        log.info("event_set_rebuild", reason="layout changed")
                        break
            except DeviceLostError as exc:
                self.healthy = False
                uuid = str(exc.args[0]) if exc.args else ""
                log.error("event_wait_gpu_lost", uuid=uuid)
                if uuid:
                    self._dispatch([DeviceEvent(uuid, EVENT_GPU_LOST, timestamp=time.time())])
                self._on_layout_change()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            except Exception as exc:
                self.healthy = False
                log.error("event_set_failed", error=repr(exc), retry_in_s=backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                if source is not None:
                    try:
                        source.close()
                    except Exception:
                        log.exception("event_set_close_failed")
            self.rebuilds += 1
