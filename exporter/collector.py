"""The background collection loop.

Each cycle's device reads form one batch, run in order by a reader thread (a
"lane"), with a deadline per device. NVML calls cannot be interrupted, so a
read that takes longer than HANDOFF_S ties up its lane: the rest of the batch
is handed to another lane (an idle one, or a new thread), and so on, so a
wedged GPU only ties up its own thread while the others (and the HTTP server,
which never calls NVML) carry on. Reading the fast devices one after another
on one thread costs one thread wake-up per cycle instead of one per device
(and no GIL contention between readers). A device whose read misses the
deadline is served with its last good values, marked stale. A read still
outstanding from an earlier cycle is not waited for again: the other devices
keep their interval while one is hung.

Fields a device answers NOT_SUPPORTED for are not asked again for
UNSUPPORTED_RETRY_S (nor until the next layout change), then asked once more:
support can change (ECC or MIG mode toggled, a driver update), and a health
field must not stay unread for good because of one odd answer.

With `--process-metrics` on, every `process_interval`-th cycle also asks each device for its
processes (`Backend.processes`): one query per GPU, or per selected MIG instance on a MIG-enabled
GPU (NVML's per-instance lists; the GPU handle's aggregate list needs privileges and would count each
process twice). The queries join the cycle's batch after every field read, as calls of their own
under the same deadline: a hung process query ties up only a lane, never the device's sample.
Between queries the last lists are carried; a device whose query failed, or is still running, is
absent from `Snapshot.processes` (its last list could charge pods that have finished).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace

import structlog

from exporter.backend import Backend, DeviceError, DeviceLostError, MonitorError
from exporter.counters import CounterSet
from exporter.devices import DeviceSelector
from exporter.fields import FieldSpec, is_polled, lookup
from exporter.lanes import Batch, Lanes, Read, Worker
from exporter.logs import Reminder
from exporter.model import Gpu, GpuProcess, Inventory, MigDevice, ReadResult
from exporter.snapshot import DeviceSample, Snapshot

log = structlog.get_logger("exporter.collector")

# Re-enumerate at least this often even without a MIG-change event, so a
# GPU that vanished or came back is noticed.
REDISCOVER_EVERY_S = 60.0

# How long a NOT_SUPPORTED answer is trusted before the field is asked for again.
UNSUPPORTED_RETRY_S = 300.0

# The polled fields each DCGM_EXP_* family is computed from (dcgm-exporter's pkg/cmd/app.go adds
# them to its watch list when the family is listed). The XID count comes from events, not a poll.
EXPORTER_FIELD_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "DCGM_EXP_CLOCK_EVENTS_COUNT": ("DCGM_FI_DEV_CLOCKS_EVENT_REASONS",),
}


def exporter_dependencies(counters: CounterSet) -> tuple[str, ...]:
    """The field names the listed DCGM_EXP_* families need read every cycle."""
    return tuple(name for c in counters.exporter_counters for name in EXPORTER_FIELD_DEPENDENCIES.get(c.name, ()))


# A read running longer than this (or a tenth of the device deadline, if shorter) hands the rest of
# its cycle's batch to another lane.
HANDOFF_S = 0.05


@dataclass
class _DeviceState:
    last_values: dict[str, float] = field(default_factory=dict)
    last_good: float | None = None  # time.time() of the last successful read
    # field name -> when it was last answered NOT_SUPPORTED (collector clock)
    unsupported: dict[str, float] = field(default_factory=dict)
    unsupported_names: frozenset[str] = frozenset()  # the keys, shared by every sample until they change
    # The fields last asked for, reused while `unsupported` is unchanged, the field set is the same
    # and no skipped field is due for its retry (before `wanted_until`, collector clock).
    wanted: tuple[FieldSpec, ...] | None = None
    wanted_from: tuple[FieldSpec, ...] = ()
    wanted_until: float = 0.0
    pending: Read[ReadResult] | None = None
    pending_since_cycle: int = 0  # the cycle that submitted `pending`
    # --process-metrics: the query in flight, and the last list (None: the last query failed or is late)
    process_query: Read[tuple[GpuProcess, ...]] | None = None
    processes: tuple[GpuProcess, ...] | None = None


@dataclass(frozen=True)
class _Target:
    gpu: Gpu
    mig: MigDevice | None
    fields: tuple[FieldSpec, ...]
    exported: bool = True  # False: a GPU read only for its selected instances' GPU-wide values

    @property
    def uuid(self) -> str:
        return self.mig.uuid if self.mig is not None else self.gpu.uuid


def _reader(backend: Backend, uuid: str, wanted: Sequence[FieldSpec]) -> Callable[[], ReadResult]:
    return lambda: backend.read(uuid, wanted)


class Collector:
    def __init__(
        self,
        backend: Backend,
        counters: CounterSet,
        selector: DeviceSelector,
        interval_s: float,
        device_timeout_s: float,
        clock: Callable[[], float] = time.time,
        process_interval: int = 0,
    ) -> None:
        """`process_interval`: query the process lists every that many cycles; 0: never (--process-metrics off)."""
        self.backend = backend
        self.process_interval = process_interval
        self._processes_read_at = 0.0
        self.selector = selector
        self.interval_s = interval_s
        self.device_timeout_s = device_timeout_s
        self._handoff_s = min(HANDOFF_S, device_timeout_s / 10)
        self._clock = clock
        self.set_counters(counters)
        self._lanes = Lanes()
        self._stuck_batches: list[Batch] = []  # earlier cycles' batches with reads not started yet
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
        """Swap the field set (SIGHUP reload); takes effect next cycle.

        Fields a listed DCGM_EXP_* family is computed from are read too, unlisted or not (as
        dcgm-exporter watches them): they reach the sample's values, never the exposition, which
        renders `snapshot.fields` (the counters file's fields) only."""
        self.counters = counters
        polled = tuple(f for f in counters.fields if is_polled(f))  # events, labels, DCP-only: never read
        names = {f.name for f in polled}
        for name in exporter_dependencies(counters):
            spec = lookup(name)
            if spec is not None and spec.name not in names and is_polled(spec):
                polled += (spec,)
                names.add(spec.name)
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
                state.wanted = None
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
            instances = [m for m in gpu.migs if self.selector.mig_selected(m)] if gpu.mig_enabled else []
            if self.selector.gpu_selected(gpu):
                targets.append(_Target(gpu, None, self._gpu_fields))
            elif instances:
                # `-d i`: dcgm-exporter fills the instances' GPU-wide fields from their GPU, so it is
                # read too, without series of its own.
                targets.append(_Target(gpu, None, self._gpu_fields, exported=False))
            targets.extend(_Target(gpu, mig, self._instance_fields) for mig in instances)
        return targets

    # --- one cycle ---
    def run_once(self) -> Snapshot:
        started = time.monotonic()
        self._maybe_discover()
        inventory = self.inventory or Inventory(driver_version="", gpus=())
        targets = self._targets(inventory)
        deadline = started + self.device_timeout_s
        if self._stuck_batches:
            self._unstick()
        batch = Batch()
        for t in targets:
            self._submit(t, batch)
        process_targets = self._process_targets(targets)
        for t in process_targets:
            self._submit_process_query(t, batch)
        if batch.left:
            self._wait(batch, deadline)
        samples = [self._collect(t) if t.exported else replace(self._collect(t), exported=False) for t in targets]
        processes = self._collect_processes(process_targets) if self.process_interval else {}
        present = {g.uuid for g in inventory.gpus}
        vanished = tuple(sorted(u for u in self._ever_seen if u not in present))
        self.collections += 1
        snapshot = Snapshot(
            inventory=inventory,
            samples=tuple(samples),
            taken_at=self._clock(),
            duration_s=time.monotonic() - started,
            vanished=vanished,
            fields=self.counters.fields,
            nvml_errors=dict(self.nvml_errors),
            collections=self.collections,
            processes=processes,
            processes_read_at=self._processes_read_at,
        )
        self.last_snapshot = snapshot
        for fn in self._listeners:
            try:
                fn(snapshot)
            except Exception:  # one broken consumer must not stop collection
                log.exception("snapshot_listener_failed", listener=getattr(fn, "__qualname__", repr(fn)))
        return snapshot

    def _submit(self, t: _Target, batch: Batch) -> None:
        state = self._devices.get(t.uuid)
        if state is None:
            state = self._devices[t.uuid] = _DeviceState()
        if state.pending is not None:
            return  # the previous read is still hung; don't queue another behind it
        wanted = state.wanted
        if state.unsupported:
            if wanted is None or state.wanted_from is not t.fields or self._clock() >= state.wanted_until:
                wanted = self._wanted(state, t.fields)
        else:
            wanted = t.fields
        state.pending = batch.add(_reader(self.backend, t.uuid, wanted))
        state.pending_since_cycle = self.collections

    # --- process lists (--process-metrics) ---
    def _process_targets(self, targets: Sequence[_Target]) -> list[_Target]:
        """The devices whose processes are listed: each GPU, but the selected instances of a MIG-enabled GPU."""
        if not self.process_interval:
            return []
        with_instances = {t.gpu.uuid for t in targets if t.mig is not None}
        return [t for t in targets if t.mig is not None or t.gpu.uuid not in with_instances]

    def _submit_process_query(self, t: _Target, batch: Batch) -> None:
        if self.collections % self.process_interval:
            return  # not due: the last lists are carried
        state = self._devices[t.uuid]
        if state.process_query is not None:
            return  # the previous query still runs (hung): don't queue another behind it
        backend, uuid = self.backend, t.uuid
        state.process_query = batch.add(lambda: backend.processes(uuid))
        self._processes_read_at = self._clock()

    def _collect_processes(self, targets: Sequence[_Target]) -> dict[str, tuple[GpuProcess, ...]]:
        lists: dict[str, tuple[GpuProcess, ...]] = {}
        for t in targets:
            state = self._devices[t.uuid]
            query = state.process_query
            if query is not None:
                if not query.done:
                    state.processes = None
                    if self._said.due((t.uuid, "processes_late")):
                        log.warning("process_query_late", uuid=t.uuid, timeout_s=self.device_timeout_s)
                    continue
                state.process_query = None
                try:
                    state.processes = query.result()
                except Exception as exc:
                    state.processes = None
                    name = exc.error if isinstance(exc, DeviceError) else type(exc).__name__
                    if self._said.due((t.uuid, "processes_failed")):
                        log.warning("process_query_failed", uuid=t.uuid, error=name, detail=str(exc))
                else:
                    ended = [w for w in ("processes_late", "processes_failed") if self._said.clear((t.uuid, w))]
                    if ended:
                        log.info("process_query_answered_again", uuid=t.uuid, after=ended)
            if state.processes is not None:
                lists.update(self._by_device(t, state.processes))
        return lists

    @staticmethod
    def _by_device(t: _Target, processes: tuple[GpuProcess, ...]) -> dict[str, tuple[GpuProcess, ...]]:
        """A MIG-enabled GPU's own list holds its instances' processes: each goes to its instance's MIG UUID."""
        if t.mig is not None or not t.gpu.mig_enabled:
            return {t.uuid: processes}
        by_gi = {m.gpu_instance_id: m.uuid for m in t.gpu.migs}
        split: dict[str, list[GpuProcess]] = {t.uuid: []}
        for p in processes:
            uuid = by_gi.get(p.gpu_instance_id, t.uuid) if p.gpu_instance_id is not None else t.uuid
            split.setdefault(uuid, []).append(p)
        return {uuid: tuple(ps) for uuid, ps in split.items()}

    def _wanted(self, state: _DeviceState, fields: tuple[FieldSpec, ...]) -> tuple[FieldSpec, ...]:
        """The fields to ask for: all but those answered NOT_SUPPORTED less than UNSUPPORTED_RETRY_S ago."""
        retry_before = self._clock() - UNSUPPORTED_RETRY_S
        skip = state.unsupported
        wanted = tuple(f for f in fields if skip.get(f.name, retry_before) <= retry_before)
        state.wanted, state.wanted_from = wanted, fields
        # Valid until the first skipped field is due again.
        state.wanted_until = min(skip.values()) + UNSUPPORTED_RETRY_S
        return wanted

    def _wait(self, batch: Batch, deadline: float) -> None:
        """Run the batch; wait until every read is done or the deadline passes.

        Reads still queued behind a read running for longer than the hand-off time go to
        another lane, so one hung device holds up the others by at most that long."""
        handoff = self._handoff_s
        batch.taken_at = time.monotonic()
        self._lanes.run(batch)
        with batch.cond:
            while batch.left:
                now = time.monotonic()
                if now >= deadline:
                    break
                if batch.queued and now - batch.taken_at >= handoff:
                    batch.taken_at = now  # give the new lane its hand-off time too
                    self._lanes.run(batch)
                batch.cond.wait(min(deadline - now, handoff))
            if batch.queued:  # past the deadline with reads not started: never leave them stuck
                batch.taken_at = time.monotonic()
                self._lanes.run(batch)
                self._stuck_batches.append(batch)

    def _unstick(self) -> None:
        """Hand on earlier cycles' batches whose queued reads still wait behind stuck lanes.

        Only when more reads hang at once than hand-offs fit in the deadline: one more lane per
        such batch and cycle, so no read waits for good behind hung ones."""
        handoff = self._handoff_s
        now = time.monotonic()
        still: list[Batch] = []
        for batch in self._stuck_batches:
            with batch.cond:
                if not batch.queued:
                    continue
                if now - batch.taken_at >= handoff:
                    batch.taken_at = now
                    self._lanes.run(batch)
            still.append(batch)
        self._stuck_batches = still

    def _collect(self, t: _Target) -> DeviceSample:
        state = self._devices[t.uuid]
        read = state.pending
        assert read is not None
        now = self._clock()
        uuid = t.uuid
        # Only a read submitted this cycle was waited for (up to the deadline); one hung since an
        # earlier cycle is merely looked at, so a wedged GPU cannot stretch every cycle to the deadline.
        try:
            if not read.done:
                raise FutureTimeout
            result = read.result()
        except FutureTimeout:
            age = now - state.last_good if state.last_good is not None else 0.0
            if self._said.due((uuid, "late")):
                log.warning("device_read_late", uuid=uuid, timeout_s=self.device_timeout_s, stale_for_s=round(age, 1))
            return DeviceSample(
                t.gpu,
                t.mig,
                dict(state.last_values),
                up=True,
                stale=True,
                age_s=age,
                error="timeout",
                unsupported=state.unsupported_names,
            )
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
        if result.unsupported:
            state.wanted = None  # what to skip (or until when) changed
        for name in result.unsupported:
            unsupported[name] = now  # learned, or confirmed by a retry
        back = [name for name in unsupported if name in result.values or name in result.errors]
        if back:
            log.info("fields_supported_again", uuid=uuid, fields=sorted(back))
            for name in back:
                del unsupported[name]
            state.wanted = None
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
        self._lanes.stop()
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
