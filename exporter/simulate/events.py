"""Simulated events: the schedule and queue the backend owns, and the event source that waits on them.

`EventQueue` holds injected events (delivered on the next wait) and scheduled ones (released into the
queue once the simulated clock reaches their time). `SimulatedEventSource` is the `EventSource` over
it; it knows nothing of the backend.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from exporter.backend import BackendError, DeviceLostError
from exporter.model import DeviceEvent

LOST = 0
"""Scheduled event type meaning "the GPU is lost": the next wait raises DeviceLostError for it."""


@dataclass(order=True)
class ScheduledEvent:
    at: float
    seq: int
    gpu_uuid: str = field(compare=False)
    event_type: int = field(compare=False)  # LOST: the GPU is lost (wait raises DeviceLostError)
    xid: int = field(compare=False, default=0)
    gi: int | None = field(compare=False, default=None)


class EventQueue:
    """Injected and scheduled events, woken by pushes, schedules, closes and shutdown (thread-safe).

    `elapsed` is the simulated clock (seconds); `stopped` is set on shutdown (waits then raise);
    `real_clock` says the simulated clock is `time.monotonic`, so waits may sleep until the next due event.
    """

    def __init__(self, elapsed: Callable[[], float], stopped: threading.Event, real_clock: bool) -> None:
        self._elapsed = elapsed
        self._stopped = stopped
        self._real_clock = real_clock
        self._cond = threading.Condition()
        self._queue: list[DeviceEvent] = []
        self._schedule: list[ScheduledEvent] = []
        self._seq = 0

    def push(self, event: DeviceEvent) -> None:
        """Deliver `event` on the next wait."""
        with self._cond:
            self._queue.append(event)
            self._cond.notify_all()

    def schedule(self, at: float, gpu_uuid: str, *events: tuple[int, int, int | None]) -> None:
        """Schedule `events` ((event_type, xid, gi) each; event_type may be LOST) at `at`, all at once."""
        with self._cond:
            for event_type, xid, gi in events:
                self._seq += 1
                bisect.insort(self._schedule, ScheduledEvent(at, self._seq, gpu_uuid, event_type, xid, gi))
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every waiting wait (shutdown, a changed fault)."""
        with self._cond:
            self._cond.notify_all()

    def close(self, source: SimulatedEventSource) -> None:
        with self._cond:
            source.closed = True
            self._cond.notify_all()

    def wait(self, source: SimulatedEventSource, uuids: frozenset[str], timeout_s: float) -> list[DeviceEvent]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        real_clock = self._real_clock
        with self._cond:
            while True:
                if self._stopped.is_set():
                    raise BackendError("simulated backend is shut down")
                if source.closed:
                    return []
                now = self._elapsed()
                self._release_due(now)
                out: list[DeviceEvent] = []
                queue, self._queue = self._queue, []
                for i, e in enumerate(queue):
                    if e.gpu_uuid not in uuids:
                        continue  # not registered in this event set: dropped, as NVML would
                    if e.event_type == LOST:
                        if out:  # deliver what came before first; raise on the next call
                            self._queue = queue[i:]
                            return out
                        self._queue = queue[i + 1 :]
                        raise DeviceLostError(e.gpu_uuid)
                    out.append(e)
                if out:
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                chunk = remaining
                if self._schedule:
                    until = self._schedule[0].at - now
                    chunk = min(chunk, max(0.001, until) if real_clock else min(0.05, max(0.001, until)))
                self._cond.wait(chunk)

    def _release_due(self, now: float) -> None:
        """Move scheduled events that are due into the queue (caller holds the condition)."""
        sched = self._schedule
        i = 0
        while i < len(sched) and sched[i].at <= now:
            s = sched[i]
            i += 1
            ci = 0 if s.gi is not None else None
            self._queue.append(DeviceEvent(s.gpu_uuid, s.event_type, s.xid, s.gi, ci, timestamp=time.time()))
        if i:
            del sched[:i]


class SimulatedEventSource:
    """EventSource over an `EventQueue`'s scheduled and injected events."""

    def __init__(self, events: EventQueue, gpu_uuids: Iterable[str]) -> None:
        self._events = events
        self.registered = tuple(gpu_uuids)
        self._uuids = frozenset(self.registered)
        self.closed = False

    def wait(self, timeout_s: float) -> list[DeviceEvent]:
        return self._events.wait(self, self._uuids, timeout_s)

    def close(self) -> None:
        self._events.close(self)
