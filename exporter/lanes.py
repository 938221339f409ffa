"""Reader threads for the collection loop.

A cycle's device reads form one `Batch`, taken in order by a reader thread (a `Lane`). NVML calls
cannot be interrupted, so a read that runs too long ties up its lane; the collector then hands the
rest of the batch to another lane (`Lanes.run`), so a wedged GPU only ties up its own thread. Fast
devices read one after another on one thread cost one wake-up per cycle, not one per device.
`Worker` runs single calls with a deadline (discovery).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# Idle lanes kept for later hand-offs; more exit once their hung read returns.
SPARE_LANES = 8


class Worker:
    """A thread that runs one call at a time; `busy` while a call is in flight."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self.busy_since: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"worker-{name}", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self.busy_since is not None

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self.busy_since = time.monotonic()
        self._jobs.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            try:
                fut.set_result(fn())
            except BaseException as exc:  # delivered to the waiting collector
                fut.set_exception(exc)
            finally:
                self.busy_since = None


class Read(Generic[T]):
    """One call of a cycle's batch (a device read, a process query); `done` once run (result or exception kept)."""

    __slots__ = ("batch", "done", "error", "fn", "value")

    def __init__(self, fn: Callable[[], T], batch: Batch) -> None:
        self.fn: Callable[[], T] = fn
        self.batch = batch
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # delivered to the collector
            self.error = exc
        self.fn = _spent  # drop the closure (its field tuple) once run
        self.batch.finished(self)

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def _spent() -> Any:
    raise RuntimeError("read already run")


class Batch:
    """The reads submitted in one cycle, taken in order by one or more lanes."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.queued: deque[Read[Any]] = deque()
        self.left = 0  # reads not finished yet
        self.taken_at = 0.0  # monotonic time the newest read was taken by a lane

    def add(self, fn: Callable[[], T]) -> Read[T]:
        read = Read(fn, self)
        self.queued.append(read)
        self.left += 1
        return read

    def take(self) -> Read[Any] | None:
        with self.cond:
            if not self.queued:
                return None
            self.taken_at = time.monotonic()
            return self.queued.popleft()

    def finished(self, read: Read[Any]) -> None:
        with self.cond:
            read.done = True
            self.left -= 1
            if self.left == 0:
                self.cond.notify_all()


class Lanes:
    """Reader threads: one runs a batch; another is added when every lane on it is stuck."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[Lane] = []
        self._all: set[Lane] = set()
        self._count = 0

    def run(self, batch: Batch) -> None:
        with self._lock:
            lane = self._idle.pop() if self._idle else None
            if lane is None:
                self._count += 1
                lane = Lane(self, self._count)
                self._all.add(lane)
        lane.jobs.put(batch)

    def idle(self, lane: Lane) -> bool:
        """A lane is done with its batch: keep it (True) or let it exit."""
        with self._lock:
            if len(self._idle) < SPARE_LANES:
                self._idle.append(lane)
                return True
            self._all.discard(lane)
            return False

    def stop(self) -> None:
        with self._lock:
            lanes, self._idle = list(self._all), []
            self._all.clear()
        for lane in lanes:
            lane.jobs.put(None)


class Lane:
    def __init__(self, pool: Lanes, number: int) -> None:
        self.pool = pool
        self.jobs: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"reader-{number}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = self.jobs.get()
            if batch is None:
                return
            while (read := batch.take()) is not None:
                read.run()
            del batch, read
            if not self.pool.idle(self):
                return
