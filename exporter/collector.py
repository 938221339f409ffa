"""The background collection loop.

Each device is read by its own worker thread with a deadline: NVML calls
cannot be interrupted, so a wedged GPU only ties up its own thread while the
others (and the HTTP server, which never calls NVML) carry on. A device whose
read misses the deadline is served with its last good values, marked stale.
A read still outstanding from an earlier cycle is not waited for again: the
other devices keep their interval while one is hung.

Fields a device answers NOT_SUPPORTED for are not asked again for
UNSUPPORTED_RETRY_S (nor until the next layout change), then asked once more:
support can change (ECC or MIG mode toggled, a driver update), and a health
field must not stay unread for good because of one odd answer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from exporter.backend import Backend, DeviceError, DeviceLostError, MonitorError
from exporter.counters import CounterSet
from exporter.devices import DeviceSelector
from exporter.fields import FieldSpec, is_polled
from exporter.logs import Reminder
from exporter.model import Gpu, Inventory, MigDevice, ReadResult
from exporter.snapshot import DeviceSample, Snapshot

log = structlog.get_logger("exporter.collector")

T = TypeVar("T")

# Re-enumerate at least this often even without a MIG-change event, so a
# GPU that vanished or came back is noticed.
REDISCOVER_EVERY_S = 60.0

# How long a NOT_SUPPORTED answer is trusted before the field is asked for again.
UNSUPPORTED_RETRY_S = 300.0


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


@dataclass
class _DeviceState:
    last_values: dict[str, float] = field(default_factory=dict)
    last_good: float | None = None  # time.time() of the last successful read
    # field name -> when it was last answered NOT_SUPPORTED (collector clock)
    unsupported: dict[str, float] = field(default_factory=dict)
    unsupported_names: frozenset[str] = frozenset()  # the keys, shared by every sample until they change
    pending: Future[ReadResult] | None = None
    pending_since_cycle: int = 0  # the cycle that submitted `pending`


@dataclass(frozen=True)
class _Target:
    gpu: Gpu
    mig: MigDevice | None
    fields: tuple[FieldSpec, ...]

    @property
    def uuid(self) -> str:
        return self.mig.uuid if self.mig is not None else self.gpu.uuid


class Collector:
    def __init__(
        self,
        backend: Backend,
        counters: CounterSet,
        selector: DeviceSelector,
        interval_s: float,
        device_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.selector = selector
        self.interval_s = interval_s
        self.device_timeout_s = device_timeout_s
        self._clock = clock
        self.set_counters(counters)
        self._workers: dict[str, Worker] = {}
        self._devices: dict[str, _DeviceState] = {}
        self._listeners: list[Callable[[Snapshot], None]] = []
        self._layout_listeners: list[Callable[[Inventory], None]] = []
        self.inventory: Inventory | None = None
        self._discovery = Worker("discovery")
        self._discovery_pending: Future[Inventory] | None = None
        self._discovery_hung = False
        self._last_discovery = 0.0
        self._rediscover = threading.Event()
        self._ever_seen: dict[str, Gpu] = {}
        self.nvml_errors: dict[tuple[str, str], int] = {}
        self._said = Reminder()  # lasting per-device conditions, logged once then once a minute
        self.collections = 0
        self.last_snapshot: Snapshot | None = None
        self.heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- configuration ---
    def set_counters(self, counters: CounterSet) -> None:
        """Swap the field set (SIGHUP reload); takes effect next cycle."""
        self.counters = counters
        polled = tuple(f for f in counters.fields if is_polled(f))  # events, labels, DCP-only: never read
        self._gpu_fields = polled
        self._instance_fields = tuple(f for f in polled if f.scope == "instance")

    def add_listener(self, fn: Callable[[Snapshot], None]) -> None:
        self._listeners.append(fn)

    def add_layout_listener(self, fn: Callable[[Inventory], None]) -> None:
        """Called (from the collector thread) when GPUs or MIG devices change."""
        self._layout_listeners.append(fn)

    def request_rediscovery(self) -> None:
        """Ask for enumeration next cycle (MIG config change, GPU lost)."""
        self._rediscover.set()

    # --- discovery ---
    def _discover(self) -> Inventory | None:
        """Enumerate with a deadline; on a hang keep the previous inventory."""
        if self._discovery_pending is None:
            self._discovery_pending = self._discovery.submit(self.backend.discover)
        try:
            # A discovery already hung in an earlier cycle is not waited for again.
            timeout = self.device_timeout_s if not self._discovery_hung else 0.0
            inventory = self._discovery_pending.result(timeout=timeout)
        except FutureTimeout:
            self._discovery_hung = True
            if self._said.due("discovery_timeout"):
                log.warning("discovery_timeout", timeout_s=self.device_timeout_s)
            return None
        except Exception as exc:
            self._discovery_pending = None
            log.error("discovery_failed", error=repr(exc))
            return None
        self._discovery_pending = None
        self._discovery_hung = False
        if self._said.clear("discovery_timeout"):
            log.info("discovery_recovered")
        self._last_discovery = time.monotonic()
        return inventory

    def _maybe_discover(self) -> None:
        due = time.monotonic() - self._last_discovery >= REDISCOVER_EVERY_S
        if self.inventory is not None and not due and not self._rediscover.is_set():
            return
        self._rediscover.clear()
        inventory = self._discover()
        if inventory is None:
            return
        old = self.inventory
        self.inventory = inventory
        for gpu in inventory.gpus:
            self._ever_seen[gpu.uuid] = gpu
        if old is None or old.layout_key() != inventory.layout_key():
            # What a device supports depends on its MIG mode (utilisation, remapped rows):
            # forget what was learned and ask again once.
            for state in self._devices.values():
                state.unsupported.clear()
                state.unsupported_names = frozenset()
            log.info(
                "inventory",
                gpus=[g.uuid for g in inventory.gpus],
                mig_devices=sum(len(g.migs) for g in inventory.gpus),
                driver_version=inventory.driver_version,
            )
            for fn in self._layout_listeners:
                try:
                    fn(inventory)
                except Exception:
                    log.exception("layout_listener_failed")

    def _targets(self, inventory: Inventory) -> list[_Target]:
        targets: list[_Target] = []
        for gpu in inventory.gpus:
            if self.selector.gpu_selected(gpu):
                targets.append(_Target(gpu, None, self._gpu_fields))
            if gpu.mig_enabled:
                targets.extend(
                    _Target(gpu, mig, self._instance_fields) for mig in gpu.migs if self.selector.mig_selected(mig)
                )
        return targets

    # --- one cycle ---
    def run_once(self) -> Snapshot:
        started = time.monotonic()
        self._maybe_discover()
        inventory = self.inventory or Inventory(driver_version="", gpus=())
        targets = self._targets(inventory)
        deadline = started + self.device_timeout_s
        for t in targets:
            self._submit(t)
        samples = [self._collect(t, deadline) for t in targets]
        present = {g.uuid for g in inventory.gpus}
        vanished = tuple(sorted(u for u in self._ever_seen if u not in present))
        self.collections += 1
        snapshot = Snapshot(
            inventory=inventory,
            samples=tuple(samples),
            taken_at=self._clock(),
            duration_s=time.monotonic() - started,
            vanished=vanished,
        )
        self.last_snapshot = snapshot
        for fn in self._listeners:
            try:
                fn(snapshot)
            except Exception:  # one broken consumer must not stop collection
                log.exception("snapshot_listener_failed", listener=getattr(fn, "__qualname__", repr(fn)))
        return snapshot

    def _submit(self, t: _Target) -> None:
        state = self._devices.setdefault(t.uuid, _DeviceState())
        if state.pending is not None:
            return  # the previous read is still hung; don't queue another behind it
        worker = self._workers.get(t.uuid)
        if worker is None:
            worker = self._workers[t.uuid] = Worker(t.uuid)
        wanted = t.fields
        if state.unsupported:
            retry_before = self._clock() - UNSUPPORTED_RETRY_S
            skip = state.unsupported
            wanted = tuple(f for f in t.fields if skip.get(f.name, retry_before) <= retry_before)
        backend, uuid = self.backend, t.uuid
        state.pending = worker.submit(lambda: backend.read(uuid, wanted))
        state.pending_since_cycle = self.collections

    def _collect(self, t: _Target, deadline: float) -> DeviceSample:
        state = self._devices[t.uuid]
        fut = state.pending
        assert fut is not None
        now = self._clock()
        uuid = t.uuid
        # Only a read submitted this cycle is waited for; one hung since an earlier cycle is
        # merely looked at, so a wedged GPU cannot stretch every cycle to the deadline.
        fresh = state.pending_since_cycle == self.collections
        try:
            result = fut.result(timeout=max(0.0, deadline - time.monotonic()) if fresh else 0.0)
        except FutureTimeout:
            age = now - state.last_good if state.last_good is not None else 0.0
            if self._said.due((uuid, "late")):
                log.warning("device_read_late", uuid=uuid, timeout_s=self.device_timeout_s, stale_for_s=round(age, 1))
            return DeviceSample(t.gpu, t.mig, dict(state.last_values), up=True, stale=True, age_s=age, error="timeout",
                                unsupported=state.unsupported_names)
        except DeviceLostError as exc:
            state.pending = None
            state.last_values = {}
            self._count_error("*", "GpuIsLost")
            if self._said.due((uuid, "lost")):
                log.error("device_lost", uuid=uuid, error=str(exc))
            self.request_rediscovery()
            return DeviceSample(t.gpu, t.mig, {}, up=False, error="lost")
        except Exception as exc:
            state.pending = None
            name = exc.error if isinstance(exc, DeviceError) else type(exc).__name__
            monitor = isinstance(exc, MonitorError)
            self._count_error("*", name)
            if self._said.due((uuid, "failed")):
                log.warning("device_read_failed", uuid=uuid, error=name, detail=str(exc), ours=monitor)
            age = now - state.last_good if state.last_good is not None else 0.0
            return DeviceSample(t.gpu, t.mig, {}, up=False, age_s=age, error=name, monitor_fault=monitor)
        state.pending = None
        ended = [what for what in ("late", "lost", "failed") if self._said.clear((uuid, what))]
        if ended:
            log.info("device_readable_again", uuid=uuid, after=ended)
        self._learn_support(uuid, state, result, now)
        for field_name, error in result.errors.items():
            self._count_error(field_name, error)
        state.last_values = dict(result.values)
        state.last_good = now
        return DeviceSample(t.gpu, t.mig, state.last_values, up=True, unsupported=state.unsupported_names)

    def _learn_support(self, uuid: str, state: _DeviceState, result: ReadResult, now: float) -> None:
        unsupported = state.unsupported
        new = sorted(result.unsupported.difference(unsupported))
        if new:
            log.info("fields_unsupported", uuid=uuid, fields=new, retry_in_s=UNSUPPORTED_RETRY_S)
        for name in result.unsupported:
            unsupported[name] = now  # learned, or confirmed by a retry
        back = [name for name in unsupported if name in result.values or name in result.errors]
        if back:
            log.info("fields_supported_again", uuid=uuid, fields=sorted(back))
            for name in back:
                del unsupported[name]
        if new or back:
            state.unsupported_names = frozenset(unsupported)

    def _count_error(self, field_name: str, error: str) -> None:
        key = (field_name, error)
        self.nvml_errors[key] = self.nvml_errors.get(key, 0) + 1

    # --- loop ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="collector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.device_timeout_s + 5)
        for w in self._workers.values():
            w.stop()
        self._discovery.stop()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                self.run_once()
            except Exception:  # keep serving the last snapshot; try again next cycle
                log.exception("collection_failed")
            next_at += self.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (slow cycle): don't burst to catch up
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)
