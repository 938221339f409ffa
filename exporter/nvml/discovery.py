"""GPUs, MIG devices and NVLink pairs, and the handles and identities found on the way.

A GPU that becomes unreadable during discovery (e.g. GPU_IS_LOST) is kept in the inventory with
its last known identity, so its reads raise DeviceLostError and it shows as down instead of
silently disappearing; that is logged when it starts, then once a minute. A GPU that leaves the
enumeration (count drops) is dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pynvml
import structlog

from exporter.backend import BackendError
from exporter.logs import Reminder
from exporter.model import Gpu, MigDevice
from exporter.nvml.attributes import mig_profile, read_attributes
from exporter.nvml.compat import Symbols, text
from exporter.nvml.errors import FUNCTION_NOT_FOUND, GPU_IS_LOST, code, handle_error

log = structlog.get_logger("exporter.nvml")

_P2P_NVLINK = getattr(pynvml, "NVML_P2P_CAPS_INDEX_NVLINK", 2)
_P2P_OK = getattr(pynvml, "NVML_P2P_STATUS_OK", 0)


class Discovery:
    """Enumerates devices; owns the handle and identity caches (`_lock` never held across a driver call).

    `forget(uuids)` is told of devices whose per-device state (GPM samples) must go: dropped MIG
    devices, GPUs whose MIG mode changed, devices gone from the inventory.
    """

    def __init__(self, symbols: Symbols, forget: Callable[[Iterable[str]], None]) -> None:
        self._symbols = symbols
        self._forget = forget
        self._lock = threading.Lock()
        self._handles: dict[str, Any] = {}
        self._migs_of: dict[str, frozenset[str]] = {}
        self._identity: dict[str, tuple[str, str, int, int | None, tuple[tuple[str, str], ...]]] = {}
        self._mig_mode: dict[str, bool] = {}
        self._known: dict[int, Gpu] = {}
        self._nvlink_key: tuple[str, ...] | None = None
        self._nvlink_pairs: frozenset[tuple[str, str]] = frozenset()
        self._p2p_status: tuple[tuple[str, str, int], ...] = ()
        self._mig_parent: dict[str, tuple[str, int]] = {}  # MIG uuid -> (parent uuid, GPU instance id)
        # Discovery runs every few seconds while a GPU stays unreadable: say it when it starts, then
        # once a minute (replaceable, e.g. with a test clock). index -> the Reminder key of its trouble.
        self.log = Reminder()
        self._trouble: dict[int, tuple[object, ...]] = {}

    def reset(self) -> None:
        """At shutdown: handles are invalid once NVML is shut down."""
        with self._lock:
            self._handles.clear()
            self._migs_of.clear()
            self._known.clear()
            self._nvlink_key = None

    # ------------------------------------------------------------ handles

    def handle_for(self, uuid: str) -> Any:
        with self._lock:
            handle = self._handles.get(uuid)
        if handle is not None:
            return handle
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except pynvml.NVMLError as err:
            raise handle_error(uuid, err) from err
        with self._lock:
            self._handles[uuid] = handle
        return handle

    def mig_parent(self, uuid: str) -> tuple[str, int] | None:
        """(parent GPU uuid, GPU instance id) of a MIG device, if known."""
        with self._lock:
            return self._mig_parent.get(uuid)

    def remember_mig_parent(self, uuid: str, parent_uuid: str, gpu_instance_id: int) -> None:
        with self._lock:
            self._mig_parent[uuid] = (parent_uuid, gpu_instance_id)

    # ------------------------------------------------------------ discovery

    def gpus(self) -> list[Gpu]:
        """The GPUs in index order (unreadable ones with their last known identity)."""
        try:
            count = self._symbols.device_count()
        except pynvml.NVMLError as err:
            raise BackendError(f"nvmlDeviceGetCount failed: {err}") from err
        gpus: list[Gpu] = []
        for index in range(count):
            try:
                gpu = self._discover_gpu(index)
            except pynvml.NVMLError as err:
                previous = self._known.get(index)
                key: tuple[object, ...]
                if previous is not None:
                    key = ("gpu_unreadable_in_discovery", index, previous.uuid)
                    if self._trouble_due(index, key):
                        log.warning("gpu_unreadable_in_discovery", index=index, uuid=previous.uuid, error=str(err))
                    gpus.append(previous)
                else:
                    key = ("gpu_discovery_failed", index)
                    if self._trouble_due(index, key):
                        log.warning("gpu_discovery_failed", index=index, error=str(err))
                continue
            trouble = self._trouble.pop(index, None)
            if trouble is not None:
                self.log.clear(trouble)
                log.info("gpu_readable_again", index=index, uuid=gpu.uuid)
            self._known[index] = gpu
            gpus.append(gpu)
        for index in [i for i in self._known if i >= count]:
            del self._known[index]
        for index in [i for i in self._trouble if i >= count]:
            self.log.clear(self._trouble.pop(index))  # gone from the count: not a condition
        return gpus

    def _trouble_due(self, index: int, key: tuple[object, ...]) -> bool:
        """Whether discovery's trouble `key` at `index` is to be logged now (it started, or a minute passed)."""
        previous = self._trouble.get(index)
        if previous is not None and previous != key:  # another kind of trouble: a new condition
            self.log.clear(previous)
        self._trouble[index] = key
        return self.log.due(key)

    def _discover_gpu(self, index: int) -> Gpu:
        handle = self._symbols.handle_by_index(index)
        uuid = text(pynvml.nvmlDeviceGetUUID(handle))
        identity = self._identity.get(uuid)
        if identity is None:
            name = text(pynvml.nvmlDeviceGetName(handle))
            bus_id = self._symbols.pci_bus_id(handle)
            try:
                minor = int(pynvml.nvmlDeviceGetMinorNumber(handle))
            except pynvml.NVMLError as err:
                if code(err) == GPU_IS_LOST:
                    raise
                minor = index
            identity = (name, bus_id, minor, self._numa_node(handle), read_attributes(handle))
            self._identity[uuid] = identity
        name, bus_id, minor, numa, attributes = identity
        mig_enabled = self._mig_enabled(handle)
        migs = self._discover_migs(handle, index, uuid) if mig_enabled else ()
        dropped: list[str] = []
        with self._lock:
            self._handles[uuid] = handle
            for stale in self._migs_of.get(uuid, frozenset()) - {m.uuid for m in migs}:
                self._handles.pop(stale, None)
                self._mig_parent.pop(stale, None)
                dropped.append(stale)
            self._migs_of[uuid] = frozenset(m.uuid for m in migs)
            for mig in migs:
                self._mig_parent[mig.uuid] = (uuid, mig.gpu_instance_id)
            previous_mode = self._mig_mode.get(uuid)
            # GPU-wide samples from before a MIG mode change are not comparable
            if previous_mode is not None and previous_mode != mig_enabled:
                dropped.append(uuid)
            self._mig_mode[uuid] = mig_enabled
        self._forget(dropped)
        return Gpu(
            index=index,
            uuid=uuid,
            pci_bus_id=bus_id,
            minor=minor,
            name=name,
            mig_enabled=mig_enabled,
            migs=migs,
            numa_node=numa,
            attributes=attributes,
        )

    def _numa_node(self, handle: Any) -> int | None:
        try:
            ok, node = self._symbols.numa_node(handle)
        except pynvml.NVMLError as err:
            if code(err) == GPU_IS_LOST:
                raise
            return None
        if not ok or node is None:
            return None
        node = int(node)
        return node if 0 <= node < 0xFFFF else None

    def _mig_enabled(self, handle: Any) -> bool:
        try:
            current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
        except pynvml.NVMLError as err:
            if code(err) == GPU_IS_LOST:
                raise
            return False
        return bool(current == 1)

    def _discover_migs(self, handle: Any, index: int, parent_uuid: str) -> tuple[MigDevice, ...]:
        try:
            slots = int(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle))
        except pynvml.NVMLError as err:
            if code(err) == GPU_IS_LOST:
                raise
            return ()
        migs: list[MigDevice] = []
        handles: dict[str, Any] = {}
        for slot in range(slots):
            try:
                mig_handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except pynvml.NVMLError as err:
                if code(err) == GPU_IS_LOST:
                    raise
                continue  # NOT_FOUND: empty slot
            mig_uuid = text(pynvml.nvmlDeviceGetUUID(mig_handle))
            migs.append(
                MigDevice(
                    uuid=mig_uuid,
                    parent_uuid=parent_uuid,
                    parent_index=index,
                    gpu_instance_id=int(pynvml.nvmlDeviceGetGpuInstanceId(mig_handle)),
                    compute_instance_id=int(pynvml.nvmlDeviceGetComputeInstanceId(mig_handle)),
                    profile=mig_profile(mig_handle),
                    slot=slot,
                )
            )
            handles[mig_uuid] = mig_handle
        with self._lock:
            self._handles.update(handles)
        return tuple(migs)

    def nvlink(self, gpus: Sequence[Gpu]) -> tuple[frozenset[tuple[str, str]], tuple[tuple[str, str, int], ...]]:
        """Pairs of GPU UUIDs linked by NVLink (sorted within the pair), and the NVLink P2P status of
        every ordered pair (`Inventory.p2p_status`); cached while the GPUs stay. NVML's answer is the
        same both ways, so each pair is asked once."""
        key = tuple(g.uuid for g in gpus)
        if key == self._nvlink_key:
            return self._nvlink_pairs, self._p2p_status
        pairs: set[tuple[str, str]] = set()
        statuses: list[tuple[str, str, int]] = []
        complete = True
        with self._lock:
            handles = [(g.uuid, self._handles.get(g.uuid)) for g in gpus]
        for i, (uuid_a, handle_a) in enumerate(handles):
            for uuid_b, handle_b in handles[i + 1 :]:
                if handle_a is None or handle_b is None:
                    complete = False
                    continue
                try:
                    status = int(pynvml.nvmlDeviceGetP2PStatus(handle_a, handle_b, _P2P_NVLINK))
                except pynvml.NVMLError as err:
                    if code(err) == FUNCTION_NOT_FOUND:
                        self._nvlink_key, self._nvlink_pairs, self._p2p_status = key, frozenset(), ()
                        return self._nvlink_pairs, self._p2p_status
                    complete = False
                    continue
                statuses += [(uuid_a, uuid_b, status), (uuid_b, uuid_a, status)]
                if status == _P2P_OK:
                    a, b = sorted((uuid_a, uuid_b))
                    pairs.add((a, b))
        result = frozenset(pairs), tuple(sorted(statuses))
        if complete:
            self._nvlink_key, (self._nvlink_pairs, self._p2p_status) = key, result
        return result
