"""The NVML adapter: the only module that imports pynvml.

`NvmlBackend` implements `exporter.backend.Backend` on top of the nvidia-ml-py
binding. Everything it returns is plain data from `exporter.model`, already in
the exported unit (FieldSpec.scale applied).

Design notes:
- Reads of different devices run concurrently in worker threads (ctypes drops
  the GIL during a driver call, so a hung call blocks only its own thread).
  `self._lock` only guards the Python caches and is never held across a
  driver call.
- Old drivers: where nvidia-ml-py calls a versioned symbol the driver lacks
  (FunctionNotFound), the older symbol is called directly through
  `pynvml._nvmlGetFunctionPointer` with pynvml's own structs, and the missing
  symbol is remembered so it is not looked up again.
- A per-field NOT_SUPPORTED is reported in ReadResult.unsupported; the collector
  owns the memory of it (and when to ask again). A whole nvmlDeviceGetFieldValues
  call that fails, NOT_SUPPORTED included, is an error of each field, never a
  verdict on their support.
- A read in which every field failed is a failure of the device as a whole
  (DeviceError), or of the monitor (MonitorError) when the error is one of ours:
  NVML uninitialised, driver not loaded or of another version, no permission.
- GPM (DCP fields, reader "gpm:<metric id>"): support is queried once per GPU
  (nvmlGpmQueryDeviceSupport; unsupported or FunctionNotFound -> the fields are
  unsupported). Each GPU / MIG device keeps two GPM samples, allocated on first
  use and freed at shutdown or when discovery drops the device (or its MIG mode
  changes); every read takes a new sample (nvmlGpmMigSampleGet on the parent with
  the GPU instance id for a MIG device) and computes all requested metrics
  between the previous sample and it with one nvmlGpmMetricsGet call. The first
  read (and the first after a sampling error) gives no value.
- A GPU that becomes unreadable during discovery (e.g. GPU_IS_LOST) is kept in
  the inventory with its last known identity, so its reads raise
  DeviceLostError and it shows as down instead of silently disappearing.
  A GPU that leaves the enumeration (count drops) is dropped.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pynvml
import structlog

from exporter.backend import BackendError, DeviceError, DeviceLostError, MonitorError
from exporter.fields import (
    ALL_LINKS,
    NOT_POLLED,
    Call,
    FieldSpec,
    FieldValue,
    Gpm,
    Rate,
    assert_never,
    to_exported,
)
from exporter.logs import Reminder
from exporter.model import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_MIG_CONFIG_CHANGE,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID,
    DeviceEvent,
    Gpu,
    Inventory,
    MigDevice,
    ReadResult,
)

log = structlog.get_logger("exporter.nvml")

WANTED_EVENTS = EVENT_XID | EVENT_DOUBLE_BIT_ECC | EVENT_SINGLE_BIT_ECC | EVENT_MIG_CONFIG_CHANGE

_NO_ID = 0xFFFFFFFF
_ECC_FIELD_IDS = frozenset({3, 4, 5, 6})
_NVLINK_FIELD_IDS = frozenset({138, 139, 140, 141})
_MEMORY_TEMP_FIELD_ID = 82
_MEMORY_TEMP_MAX = 200
_PSTATE_UNKNOWN = 32
_MIG_PROFILE = re.compile(r"MIG\s+(\S+)\s*$")

_SUCCESS = pynvml.NVML_SUCCESS
_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
_TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
_FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
_VGPU_GUEST = getattr(pynvml, "NVML_GPU_VIRTUALIZATION_MODE_VGPU", 2)
_MEMORY_V2 = getattr(pynvml, "nvmlMemory_v2", 0x02000028)
_P2P_NVLINK = getattr(pynvml, "NVML_P2P_CAPS_INDEX_NVLINK", 2)
_P2P_OK = getattr(pynvml, "NVML_P2P_STATUS_OK", 0)

# nvmlValueType_t -> union member
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


class _GpmState:
    """GPM samples of one GPU or MIG device. `busy`/`closed` are guarded by the backend's lock."""

    def __init__(self) -> None:
        self.samples: list[Any] = []  # [previous, current] once allocated
        self.has_previous = False
        self.busy = False
        self.closed = False
        self.request: Any = None  # c_nvmlGpmMetricsGet_t, reused (~19 KB)


class _Unsupported(Exception):
    """The device cannot give this value (not an NVML error code)."""


class _InvalidValue(Exception):
    """NVML answered, but with a value that means "no reading"."""


def _code(err: BaseException) -> int | None:
    value = getattr(err, "value", None)
    return value if isinstance(value, int) else None


def _error_name(code: int) -> str:
    return type(pynvml.NVMLError(code)).__name__


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _normalise_bus_id(bus_id: str) -> str:
    """NVML's 8-hex-digit-domain form ("00000000:8D:00.0"); legacy ids have 4 digits."""
    bus_id = bus_id.strip().rstrip("\x00")
    domain, sep, rest = bus_id.partition(":")
    if sep and rest.count(":") == 1 and len(domain) < 8:
        return domain.rjust(8, "0") + ":" + rest
    return bus_id


def _handle_key(handle: Any) -> int:
    """The pointer value of an nvmlDevice_t, usable as a dict key."""
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


def _rate_id(spec: FieldSpec) -> int:
    assert isinstance(spec.reader, Rate), spec
    return spec.reader.field_id


def _gpm_id(spec: FieldSpec) -> int:
    assert isinstance(spec.reader, Gpm), spec
    return spec.reader.metric_id


def _call_name(spec: FieldSpec) -> str:
    assert isinstance(spec.reader, Call), spec
    return spec.reader.name


def _memo(memo: dict[str, Any], key: str, fn: Callable[[], Any]) -> Any:
    """One driver call per read for values shared by several fields."""
    if key in memo:
        cached = memo[key]
        if isinstance(cached, BaseException):
            raise cached
        return cached
    try:
        value = fn()
    except (pynvml.NVMLError, _Unsupported, _InvalidValue) as err:
        memo[key] = err
        raise
    memo[key] = value
    return value


# Failures of ours, not the device's: they never fence a GPU (exporter/health/blindspots.py).
_MONITOR_ERRORS = frozenset(
    _error_name(code)
    for code in (
        pynvml.NVML_ERROR_UNINITIALIZED,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        getattr(pynvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", 18),
        pynvml.NVML_ERROR_NO_PERMISSION,
    )
)


def _raise_whole_device_failure(uuid: str, result: ReadResult) -> None:
    """Every field of the read failed: the device (or we) failed as a whole."""
    counts: dict[str, int] = {}
    for error in result.errors.values():
        counts[error] = counts.get(error, 0) + 1
    error = max(sorted(counts), key=lambda e: counts[e])
    message = f"{uuid}: every field failed ({error})"
    if error in _MONITOR_ERRORS:
        raise MonitorError(message, error)
    raise DeviceError(message, error)


class NvmlBackend:
    """`exporter.backend.Backend` over NVML."""

    name = "nvml"

    def __init__(self, library_path: str | None = None) -> None:
        self._library_path = library_path
        self._lock = threading.Lock()
        self._started = False
        self._driver_version = ""
        self._handles: dict[str, Any] = {}
        self._migs_of: dict[str, frozenset[str]] = {}
        self._identity: dict[str, tuple[str, str, int, int | None]] = {}
        self._mig_mode: dict[str, bool] = {}
        self._known: dict[int, Gpu] = {}
        self._previous: dict[tuple[str, int], tuple[float, float]] = {}
        self._nvlink_key: tuple[str, ...] | None = None
        self._nvlink_pairs: frozenset[tuple[str, str]] = frozenset()
        self._missing: set[str] = set()
        self._warned_readers: set[str] = set()
        self._gpm: dict[str, _GpmState] = {}
        self._gpm_support: dict[str, bool] = {}  # GPU uuid -> nvmlGpmQueryDeviceSupport answer
        self._mig_parent: dict[str, tuple[str, int]] = {}  # MIG uuid -> (parent uuid, GPU instance id)
        # Discovery runs every few seconds while a GPU stays unreadable: say it when it starts, then
        # once a minute (replaceable, e.g. with a test clock). index -> the Reminder key of its trouble.
        self.discovery_log = Reminder()
        self._discovery_trouble: dict[int, tuple[object, ...]] = {}

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._started:
            return
        if self._library_path is not None:
            try:
                lib = ctypes.CDLL(self._library_path)
            except OSError as err:
                raise BackendError(f"cannot load NVML library {self._library_path}: {err}") from err
            pynvml.nvmlLib = lib
            pynvml._nvmlGetFunctionPointer_cache.clear()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise BackendError(self._init_failure(err)) from err
        self._started = True
        try:
            self._driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as err:
            log.warning("nvml_driver_version_failed", error=str(err))
            self._driver_version = ""

    def _init_failure(self, err: BaseException) -> str:
        code = _code(err)
        where = self._library_path or "libnvidia-ml.so.1"
        if code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
            return (
                f"NVML library {where} not found: is the NVIDIA driver installed and its user-space "
                "libraries visible to this container (NVIDIA container toolkit, or --nvml-library)?"
            )
        if code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
            return "NVIDIA kernel driver not loaded (nvmlInit: Driver Not Loaded): no GPU driver on this node?"
        if code == pynvml.NVML_ERROR_NO_PERMISSION:
            return "no permission to open the NVIDIA device nodes (nvmlInit: Insufficient Permissions)"
        if code == getattr(pynvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", 18):
            return "NVML library and kernel driver versions differ (driver upgraded without a reboot?)"
        return f"nvmlInit failed: {err}"

    def shutdown(self) -> None:
        if not self._started:
            return
        self._started = False
        with self._lock:
            states = list(self._gpm.values())
            self._gpm.clear()
            self._gpm_support.clear()
        self._free_gpm(states)
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as err:
            log.warning("nvml_shutdown_failed", error=str(err))
        with self._lock:
            self._handles.clear()
            self._migs_of.clear()
            self._known.clear()
            self._previous.clear()
            self._nvlink_key = None

    def _require_started(self) -> None:
        if not self._started:
            raise BackendError("NVML backend not started")

    # ----------------------------------------------- old-driver fallbacks

    def _call_old(self, symbol: str, *args: Any) -> None:
        fn = pynvml._nvmlGetFunctionPointer(symbol)
        ret = fn(*args)
        pynvml._nvmlCheckReturn(ret)

    def _try_new(self, symbol: str, call: Callable[[], Any]) -> tuple[bool, Any]:
        """Call a binding function that uses `symbol`; (False, None) if the driver lacks it."""
        if symbol in self._missing:
            return False, None
        try:
            return True, call()
        except pynvml.NVMLError as err:
            if _code(err) != _FUNCTION_NOT_FOUND:
                raise
            log.info("nvml_symbol_fallback", missing=symbol, reason="older driver: using the older call")
            self._missing.add(symbol)
            return False, None

    def _device_count(self) -> int:
        ok, count = self._try_new("nvmlDeviceGetCount_v2", pynvml.nvmlDeviceGetCount)
        if ok:
            return int(count)
        c_count = ctypes.c_uint()
        self._call_old("nvmlDeviceGetCount", ctypes.byref(c_count))
        return int(c_count.value)

    def _handle_by_index(self, index: int) -> Any:
        ok, handle = self._try_new("nvmlDeviceGetHandleByIndex_v2", lambda: pynvml.nvmlDeviceGetHandleByIndex(index))
        if ok:
            return handle
        device = pynvml.c_nvmlDevice_t()
        self._call_old("nvmlDeviceGetHandleByIndex", ctypes.c_uint(index), ctypes.byref(device))
        return device

    def _pci_bus_id(self, handle: Any) -> str:
        ok, info = self._try_new("nvmlDeviceGetPciInfo_v3", lambda: pynvml.nvmlDeviceGetPciInfo_v3(handle))
        if ok:
            return _normalise_bus_id(_text(info.busId))
        info = pynvml.nvmlPciInfo_t()
        if "nvmlDeviceGetPciInfo_v2" not in self._missing:
            try:
                self._call_old("nvmlDeviceGetPciInfo_v2", handle, ctypes.byref(info))
                return _normalise_bus_id(_text(info.busId))
            except pynvml.NVMLError as err:
                if _code(err) != _FUNCTION_NOT_FOUND:
                    raise
                self._missing.add("nvmlDeviceGetPciInfo_v2")
        # v1 struct: its 16-byte busId sits where v2/v3 keep busIdLegacy (the v3 struct is larger).
        self._call_old("nvmlDeviceGetPciInfo", handle, ctypes.byref(info))
        return _normalise_bus_id(_text(info.busIdLegacy))

    # ------------------------------------------------------------ discovery

    def discover(self) -> Inventory:
        self._require_started()
        try:
            count = self._device_count()
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
                    if self._discovery_trouble_due(index, key):
                        log.warning("gpu_unreadable_in_discovery", index=index, uuid=previous.uuid, error=str(err))
                    gpus.append(previous)
                else:
                    key = ("gpu_discovery_failed", index)
                    if self._discovery_trouble_due(index, key):
                        log.warning("gpu_discovery_failed", index=index, error=str(err))
                continue
            trouble = self._discovery_trouble.pop(index, None)
            if trouble is not None:
                self.discovery_log.clear(trouble)
                log.info("gpu_readable_again", index=index, uuid=gpu.uuid)
            self._known[index] = gpu
            gpus.append(gpu)
        for index in [i for i in self._known if i >= count]:
            del self._known[index]
        for index in [i for i in self._discovery_trouble if i >= count]:
            self.discovery_log.clear(self._discovery_trouble.pop(index))  # gone from the count: not a condition
        present = {g.uuid for g in gpus} | {m.uuid for g in gpus for m in g.migs}
        with self._lock:
            dropped = [self._gpm.pop(u) for u in [u for u in self._gpm if u not in present]]
        self._free_gpm(dropped)
        pairs = self._nvlink(gpus)
        return Inventory(driver_version=self._driver_version, gpus=tuple(gpus), nvlink_pairs=pairs)

    def _discovery_trouble_due(self, index: int, key: tuple[object, ...]) -> bool:
        """Whether discovery's trouble `key` at `index` is to be logged now (it started, or a minute passed)."""
        previous = self._discovery_trouble.get(index)
        if previous is not None and previous != key:  # another kind of trouble: a new condition
            self.discovery_log.clear(previous)
        self._discovery_trouble[index] = key
        return self.discovery_log.due(key)

    def _discover_gpu(self, index: int) -> Gpu:
        handle = self._handle_by_index(index)
        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        identity = self._identity.get(uuid)
        if identity is None:
            name = _text(pynvml.nvmlDeviceGetName(handle))
            bus_id = self._pci_bus_id(handle)
            try:
                minor = int(pynvml.nvmlDeviceGetMinorNumber(handle))
            except pynvml.NVMLError as err:
                if _code(err) == _GPU_IS_LOST:
                    raise
                minor = index
            identity = (name, bus_id, minor, self._numa_node(handle))
            self._identity[uuid] = identity
        name, bus_id, minor, numa = identity
        mig_enabled = self._mig_enabled(handle)
        migs = self._discover_migs(handle, index, uuid) if mig_enabled else ()
        dropped: list[_GpmState] = []
        with self._lock:
            self._handles[uuid] = handle
            for stale in self._migs_of.get(uuid, frozenset()) - {m.uuid for m in migs}:
                self._handles.pop(stale, None)
                self._mig_parent.pop(stale, None)
                if stale in self._gpm:
                    dropped.append(self._gpm.pop(stale))
            self._migs_of[uuid] = frozenset(m.uuid for m in migs)
            for mig in migs:
                self._mig_parent[mig.uuid] = (uuid, mig.gpu_instance_id)
            previous_mode = self._mig_mode.get(uuid)
            # GPU-wide samples from before a MIG mode change are not comparable
            if previous_mode is not None and previous_mode != mig_enabled and uuid in self._gpm:
                dropped.append(self._gpm.pop(uuid))
            self._mig_mode[uuid] = mig_enabled
        self._free_gpm(dropped)
        return Gpu(
            index=index,
            uuid=uuid,
            pci_bus_id=bus_id,
            minor=minor,
            name=name,
            mig_enabled=mig_enabled,
            migs=migs,
            numa_node=numa,
        )

    def _numa_node(self, handle: Any) -> int | None:
        getter = getattr(pynvml, "nvmlDeviceGetNumaNodeId", None)
        if getter is None:
            return None
        try:
            ok, node = self._try_new("nvmlDeviceGetNumaNodeId", lambda: getter(handle))
        except pynvml.NVMLError as err:
            if _code(err) == _GPU_IS_LOST:
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
            if _code(err) == _GPU_IS_LOST:
                raise
            return False
        return bool(current == 1)

    def _discover_migs(self, handle: Any, index: int, parent_uuid: str) -> tuple[MigDevice, ...]:
        try:
            slots = int(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle))
        except pynvml.NVMLError as err:
            if _code(err) == _GPU_IS_LOST:
                raise
            return ()
        migs: list[MigDevice] = []
        handles: dict[str, Any] = {}
        for slot in range(slots):
            try:
                mig_handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except pynvml.NVMLError as err:
                if _code(err) == _GPU_IS_LOST:
                    raise
                continue  # NOT_FOUND: empty slot
            mig_uuid = _text(pynvml.nvmlDeviceGetUUID(mig_handle))
            match = _MIG_PROFILE.search(_text(pynvml.nvmlDeviceGetName(mig_handle)))
            migs.append(
                MigDevice(
                    uuid=mig_uuid,
                    parent_uuid=parent_uuid,
                    parent_index=index,
                    gpu_instance_id=int(pynvml.nvmlDeviceGetGpuInstanceId(mig_handle)),
                    compute_instance_id=int(pynvml.nvmlDeviceGetComputeInstanceId(mig_handle)),
                    profile=match.group(1) if match else "",
                    slot=slot,
                )
            )
            handles[mig_uuid] = mig_handle
        with self._lock:
            self._handles.update(handles)
        return tuple(migs)

    def _nvlink(self, gpus: Sequence[Gpu]) -> frozenset[tuple[str, str]]:
        key = tuple(g.uuid for g in gpus)
        if key == self._nvlink_key:
            return self._nvlink_pairs
        pairs: set[tuple[str, str]] = set()
        complete = True
        with self._lock:
            handles = [(g.uuid, self._handles.get(g.uuid)) for g in gpus]
        for i, (uuid_a, handle_a) in enumerate(handles):
            for uuid_b, handle_b in handles[i + 1 :]:
                if handle_a is None or handle_b is None:
                    complete = False
                    continue
                try:
                    status = pynvml.nvmlDeviceGetP2PStatus(handle_a, handle_b, _P2P_NVLINK)
                except pynvml.NVMLError as err:
                    if _code(err) == _FUNCTION_NOT_FOUND:
                        self._nvlink_key, self._nvlink_pairs = key, frozenset()
                        return self._nvlink_pairs
                    complete = False
                    continue
                if status == _P2P_OK:
                    a, b = sorted((uuid_a, uuid_b))
                    pairs.add((a, b))
        result = frozenset(pairs)
        if complete:
            self._nvlink_key, self._nvlink_pairs = key, result
        return result

    # -------------------------------------------------------------- reading

    def _handle_for(self, uuid: str) -> Any:
        with self._lock:
            handle = self._handles.get(uuid)
        if handle is not None:
            return handle
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except pynvml.NVMLError as err:
            code = _code(err)
            if code in (_NOT_FOUND, _GPU_IS_LOST):
                raise DeviceLostError(uuid) from err
            name = type(err).__name__
            if name in _MONITOR_ERRORS:
                raise MonitorError(f"{uuid}: {err}", name) from err
            raise DeviceError(f"{uuid}: {err}", name) from err
        with self._lock:
            self._handles[uuid] = handle
        return handle

    def read(self, uuid: str, fields: Sequence[FieldSpec]) -> ReadResult:
        self._require_started()
        handle = self._handle_for(uuid)
        is_mig = uuid.startswith("MIG-")
        result = ReadResult()
        fv_specs: list[FieldSpec] = []
        rate_specs: list[FieldSpec] = []
        call_specs: list[FieldSpec] = []
        gpm_specs: list[FieldSpec] = []
        for spec in fields:
            reader = spec.reader
            if isinstance(reader, NOT_POLLED):
                continue
            if is_mig and spec.scope != "instance":
                result.unsupported.add(spec.name)
            elif isinstance(reader, FieldValue):
                fv_specs.append(spec)
            elif isinstance(reader, Rate):
                rate_specs.append(spec)
            elif isinstance(reader, Call):
                call_specs.append(spec)
            elif isinstance(reader, Gpm):
                gpm_specs.append(spec)
            else:
                assert_never(reader)
        if fv_specs or rate_specs:
            self._read_field_values(uuid, handle, fv_specs, rate_specs, result)
        if call_specs:
            self._read_calls(uuid, handle, call_specs, result)
        if gpm_specs:
            self._read_gpm(uuid, handle, gpm_specs, result)
        if len(result.errors) >= 2 and not result.values:  # one field failing says nothing of the device
            _raise_whole_device_failure(uuid, result)
        return result

    def _read_field_values(
        self,
        uuid: str,
        handle: Any,
        fv_specs: Sequence[FieldSpec],
        rate_specs: Sequence[FieldSpec],
        result: ReadResult,
    ) -> None:
        wanted: list[tuple[int, int]] = []
        for spec in fv_specs:
            for fi in spec.fi:
                wanted.append((fi, ALL_LINKS if fi in _NVLINK_FIELD_IDS else 0))
        for spec in rate_specs:
            wanted.append((_rate_id(spec), 0))
        ids = list(dict.fromkeys(wanted))
        try:
            values = pynvml.nvmlDeviceGetFieldValues(handle, ids)
        except pynvml.NVMLError as err:
            code = _code(err)
            if code == _GPU_IS_LOST:
                raise DeviceLostError(uuid) from err
            for spec in (*fv_specs, *rate_specs):
                # Only a driver without the call says nothing can be read this way. A whole-call
                # NOT_SUPPORTED is one odd answer: an error of each field, asked again next cycle,
                # or one answer would blind every health field of the batch.
                if code == _FUNCTION_NOT_FOUND:
                    result.unsupported.add(spec.name)
                else:
                    result.errors[spec.name] = type(err).__name__
            return
        now = time.monotonic()
        decoded: dict[int, float | str | None] = {}
        for i in range(len(ids)):
            decoded[ids[i][0]] = self._decode_field_value(uuid, values[i])

        for spec in fv_specs:
            total = 0.0
            outcome: str | None = "ok"
            for fi in spec.fi:
                value = decoded[fi]
                if value is None:
                    outcome = None
                    break
                if isinstance(value, str):
                    outcome = value
                elif outcome == "ok":
                    total += value
            if outcome is None:
                result.unsupported.add(spec.name)
            elif outcome != "ok":
                result.errors[spec.name] = outcome
            else:
                result.values[spec.name] = to_exported(spec, total)

        rates: dict[int, float | None] = {}
        for spec in rate_specs:
            fi = _rate_id(spec)
            value = decoded[fi]
            if value is None:
                result.unsupported.add(spec.name)
                continue
            if isinstance(value, str):
                result.errors[spec.name] = value
                continue
            if fi not in rates:
                rates[fi] = self._rate(uuid, fi, value, now)
            rate = rates[fi]
            if rate is not None:
                result.values[spec.name] = rate * spec.scale

    def _decode_field_value(self, uuid: str, entry: Any) -> float | str | None:
        """A number, None (not supported), or an error name."""
        ret = int(entry.nvmlReturn)
        if ret == _SUCCESS:
            fi = int(entry.fieldId)
            value_type = int(entry.valueType)
            if fi in _ECC_FIELD_IDS and entry.timestamp == 0 and entry.latencyUsec == 0 and value_type == 0:
                return None  # ECC disabled: the driver leaves the entry uninitialised
            if fi == _MEMORY_TEMP_FIELD_ID:
                temp = int(entry.value.uiVal)  # the driver fills uiVal whatever valueType says
                return float(temp) if temp <= _MEMORY_TEMP_MAX else "InvalidValue"
            member = _VALUE_MEMBERS.get(value_type)
            if member is None:
                return "UnknownValueType"
            return float(getattr(entry.value, member))
        if ret in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
            return None
        if ret == _GPU_IS_LOST:
            raise DeviceLostError(uuid)
        return _error_name(ret)

    def _rate(self, uuid: str, fi: int, value: float, now: float) -> float | None:
        key = (uuid, fi)
        with self._lock:
            previous = self._previous.get(key)
            self._previous[key] = (value, now)
        if previous is None:
            return None
        last_value, last_time = previous
        if now <= last_time or value < last_value:  # first read after a wrap/reset: new baseline
            return None
        return (value - last_value) / (now - last_time)

    # ------------------------------------------------------------------ GPM

    def _gpm_target(self, uuid: str, handle: Any) -> tuple[str, Any, int | None]:
        """(GPU uuid, GPU handle, GPU instance id or None) to sample for a GPU or MIG device."""
        if not uuid.startswith("MIG-"):
            return uuid, handle, None
        with self._lock:
            known = self._mig_parent.get(uuid)
        if known is not None:
            parent_uuid, gi = known
            return parent_uuid, self._handle_for(parent_uuid), gi
        parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        parent_uuid = _text(pynvml.nvmlDeviceGetUUID(parent))
        gi = int(pynvml.nvmlDeviceGetGpuInstanceId(handle))
        with self._lock:
            self._mig_parent[uuid] = (parent_uuid, gi)
        return parent_uuid, parent, gi

    def _gpm_supported(self, gpu_uuid: str, gpu_handle: Any) -> bool:
        with self._lock:
            known = self._gpm_support.get(gpu_uuid)
        if known is not None:
            return known
        if "nvmlGpmQueryDeviceSupport" in self._missing:
            return False
        try:
            supported = bool(pynvml.nvmlGpmQueryDeviceSupport(gpu_handle).isSupportedDevice)
        except pynvml.NVMLError as err:
            code = _code(err)
            if code == _FUNCTION_NOT_FOUND:
                log.info("nvml_gpm_unavailable", reason="driver lacks the GPM API: DCP fields unsupported")
                self._missing.add("nvmlGpmQueryDeviceSupport")
                return False
            if code in (_NOT_SUPPORTED, getattr(pynvml, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", 25)):
                supported = False
            else:
                raise
        with self._lock:
            self._gpm_support[gpu_uuid] = supported
        return supported

    def _read_gpm(self, uuid: str, handle: Any, specs: Sequence[FieldSpec], result: ReadResult) -> None:
        try:
            gpu_uuid, gpu_handle, gi = self._gpm_target(uuid, handle)
            supported = self._gpm_supported(gpu_uuid, gpu_handle)
        except (pynvml.NVMLError, DeviceError) as err:
            self._gpm_failed(uuid, err, specs, result)
            return
        if not supported:
            result.unsupported.update(spec.name for spec in specs)
            return
        with self._lock:
            state = self._gpm.get(uuid)
            if state is None:
                state = self._gpm[uuid] = _GpmState()
            if state.busy or state.closed:  # a hung read of this device still owns the samples
                return
            state.busy = True
        try:
            self._sample_gpm(uuid, state, gpu_handle, gi, specs, result)
        finally:
            with self._lock:
                state.busy = False
                free_now = state.closed
            if free_now:
                self._free_gpm([state])

    def _sample_gpm(
        self, uuid: str, state: _GpmState, gpu_handle: Any, gi: int | None, specs: Sequence[FieldSpec],
        result: ReadResult,
    ) -> None:
        try:
            while len(state.samples) < 2:
                state.samples.append(pynvml.nvmlGpmSampleAlloc())
            current = state.samples[1]
            if gi is None:
                pynvml.nvmlGpmSampleGet(gpu_handle, current)
            else:
                pynvml.nvmlGpmMigSampleGet(gpu_handle, gi, current)
        except pynvml.NVMLError as err:
            state.has_previous = False
            self._gpm_failed(uuid, err, specs, result)
            return
        previous = state.samples[0]
        state.samples.reverse()  # this sample is the next read's previous one
        if not state.has_previous:
            state.has_previous = True
            return  # metrics need two samples
        ids = list(dict.fromkeys(_gpm_id(spec) for spec in specs))
        if state.request is None:
            state.request = pynvml.c_nvmlGpmMetricsGet_t()
        request = state.request
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(ids)
        request.sample1 = previous
        request.sample2 = current
        for i, metric_id in enumerate(ids):
            request.metrics[i].metricId = metric_id
            request.metrics[i].nvmlReturn = _SUCCESS
            request.metrics[i].value = 0.0
        try:
            pynvml.nvmlGpmMetricsGet(request)
        except pynvml.NVMLError as err:
            self._gpm_failed(uuid, err, specs, result)
            return
        by_id: dict[int, float | int] = {}
        for i, metric_id in enumerate(ids):
            entry = request.metrics[i]
            ret = int(entry.nvmlReturn)
            by_id[metric_id] = float(entry.value) if ret == _SUCCESS else ret
        for spec in specs:
            value = by_id[_gpm_id(spec)]
            if isinstance(value, float):
                result.values[spec.name] = to_exported(spec, value)
            elif value in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                result.unsupported.add(spec.name)
            elif value == _GPU_IS_LOST:
                raise DeviceLostError(uuid)
            else:
                result.errors[spec.name] = _error_name(value)

    def _gpm_failed(self, uuid: str, err: BaseException, specs: Sequence[FieldSpec], result: ReadResult) -> None:
        if isinstance(err, DeviceError):
            raise err
        code = _code(err)
        if code == _GPU_IS_LOST:
            raise DeviceLostError(uuid) from err
        for spec in specs:
            if code in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                result.unsupported.add(spec.name)
            else:
                result.errors[spec.name] = type(err).__name__

    def _free_gpm(self, states: Sequence[_GpmState]) -> None:
        """Free the samples of dropped devices (now, or when a read still using them ends)."""
        for state in states:
            with self._lock:
                state.closed = True
                if state.busy:
                    continue
                samples, state.samples = state.samples, []
            for sample in samples:
                try:
                    pynvml.nvmlGpmSampleFree(sample)
                except pynvml.NVMLError as err:
                    log.warning("nvml_gpm_sample_free_failed", error=str(err))

    def _read_calls(self, uuid: str, handle: Any, specs: Sequence[FieldSpec], result: ReadResult) -> None:
        memo: dict[str, Any] = {}
        for spec in specs:
            what = _call_name(spec)
            try:
                value = self._call_value(what, handle, memo)
            except _Unsupported:
                result.unsupported.add(spec.name)
                continue
            except _InvalidValue:
                result.errors[spec.name] = "InvalidValue"
                continue
            except pynvml.NVMLError as err:
                code = _code(err)
                if code == _GPU_IS_LOST:
                    raise DeviceLostError(uuid) from err
                if code in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                    result.unsupported.add(spec.name)
                else:
                    result.errors[spec.name] = type(err).__name__
                continue
            result.values[spec.name] = to_exported(spec, float(value))

    def _call_value(self, what: str, handle: Any, memo: dict[str, Any]) -> float:
        if what == "sm_clock":
            return float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        if what == "mem_clock":
            return float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))
        if what == "gpu_temp":
            return self._gpu_temp(handle)
        if what == "power_usage":
            return float(pynvml.nvmlDeviceGetPowerUsage(handle))
        if what == "power_limit":
            return float(pynvml.nvmlDeviceGetPowerManagementLimit(handle))
        if what in ("gpu_util", "mem_util"):
            util = _memo(memo, "util", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
            return float(util.gpu if what == "gpu_util" else util.memory)
        if what == "enc_util":
            return float(pynvml.nvmlDeviceGetEncoderUtilization(handle)[0])
        if what == "dec_util":
            return float(pynvml.nvmlDeviceGetDecoderUtilization(handle)[0])
        if what in ("fb_total", "fb_free", "fb_used", "fb_reserved"):
            total, reserved, free, used = _memo(memo, "memory", lambda: self._memory(handle))
            if what == "fb_reserved":
                if reserved is None:
                    raise _Unsupported(what)
                return float(reserved)
            return float({"fb_total": total, "fb_free": free, "fb_used": used}[what])
        if what == "bar1_used":
            bar1 = _memo(memo, "bar1", lambda: pynvml.nvmlDeviceGetBAR1MemoryInfo(handle))
            return float(bar1.bar1Used)
        if what == "clocks_event_reasons":
            return self._clock_event_reasons(handle)
        if what == "pstate":
            pstate = int(pynvml.nvmlDeviceGetPerformanceState(handle))
            if pstate == _PSTATE_UNKNOWN:
                raise _InvalidValue(what)
            return float(pstate)
        if what == "fan_speed":
            return float(pynvml.nvmlDeviceGetFanSpeed(handle))
        if what == "vgpu_license":
            return self._vgpu_license(handle)
        if what not in self._warned_readers:
            self._warned_readers.add(what)
            log.warning("unknown_call_reader", reader=f"call:{what}")
        raise _Unsupported(what)

    def _memory(self, handle: Any) -> tuple[int, int | None, int, int]:
        ok, info = self._try_new(
            "nvmlDeviceGetMemoryInfo_v2", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle, version=_MEMORY_V2)
        )
        if ok:
            return int(info.total), int(info.reserved), int(info.free), int(info.used)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), None, int(info.free), int(info.used)  # v1 folds reserved into used

    def _gpu_temp(self, handle: Any) -> float:
        getter = getattr(pynvml, "nvmlDeviceGetTemperatureV", None)
        if getter is not None:
            ok, temp = self._try_new("nvmlDeviceGetTemperatureV", lambda: getter(handle, pynvml.NVML_TEMPERATURE_GPU))
            if ok:
                return float(temp)
        return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))

    def _clock_event_reasons(self, handle: Any) -> float:
        getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if getter is not None:
            ok, reasons = self._try_new("nvmlDeviceGetCurrentClocksEventReasons", lambda: getter(handle))
            if ok:
                return float(reasons)
        return float(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    def _vgpu_license(self, handle: Any) -> float:
        try:
            mode = pynvml.nvmlDeviceGetVirtualizationMode(handle)
        except pynvml.NVMLError as err:
            # No virtualization support: not a vGPU guest, so no license to hold. Any other error
            # is an error, not a reading.
            if _code(err) not in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND):
                raise
            return 0.0
        if mode != _VGPU_GUEST:
            return 0.0
        features = pynvml.nvmlDeviceGetGridLicensableFeatures(handle)
        count = min(int(features.licensableFeaturesCount), len(features.gridLicensableFeatures))
        licensed = any(features.gridLicensableFeatures[i].featureState for i in range(count))
        return 1.0 if licensed else 0.0

    # --------------------------------------------------------------- events

    def open_events(self, inventory: Inventory) -> NvmlEventSource:
        self._require_started()
        handles: list[tuple[str, Any]] = []
        for gpu in inventory.gpus:
            try:
                handles.append((gpu.uuid, self._handle_for(gpu.uuid)))
            except (DeviceLostError, DeviceError) as err:
                log.warning("event_registration_failed", uuid=gpu.uuid, error=str(err))
        return NvmlEventSource(self, handles)

    def _wait_function(self) -> tuple[Any, bool]:
        """(C function, True if it fills the v2 event struct with instance ids)."""
        if "nvmlEventSetWait_v2" not in self._missing:
            try:
                return pynvml._nvmlGetFunctionPointer("nvmlEventSetWait_v2"), True
            except pynvml.NVMLError as err:
                if _code(err) != _FUNCTION_NOT_FOUND:
                    raise
                self._missing.add("nvmlEventSetWait_v2")
        return pynvml._nvmlGetFunctionPointer("nvmlEventSetWait"), False


class NvmlEventSource:
    """One NVML event set over every GPU; used from one thread only."""

    def __init__(self, backend: NvmlBackend, handles: Sequence[tuple[str, Any]]) -> None:
        self._set: Any = None
        self._uuid_by_handle: dict[int, str] = {}
        self._registered: list[tuple[str, Any]] = []
        try:
            self._wait_fn, self._v2 = backend._wait_function()
            self._set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as err:
            raise BackendError(f"cannot create an NVML event set: {err}") from err
        try:
            for uuid, handle in handles:
                self._uuid_by_handle[_handle_key(handle)] = uuid
                self._register(uuid, handle)
        except BaseException:
            self.close()
            raise

    def _register(self, uuid: str, handle: Any) -> None:
        try:
            supported = int(pynvml.nvmlDeviceGetSupportedEventTypes(handle))
        except pynvml.NVMLError as err:
            log.warning("event_types_unreadable", uuid=uuid, error=str(err))
            return
        mask = WANTED_EVENTS & supported
        if not mask:
            log.info("events_unsupported", uuid=uuid)
            return
        try:
            pynvml.nvmlDeviceRegisterEvents(handle, mask, self._set)
        except pynvml.NVMLError as err:
            code = _code(err)
            if code in (_GPU_IS_LOST, _NOT_SUPPORTED):
                log.warning("event_registration_failed", uuid=uuid, error=str(err))
                return
            # UNKNOWN and friends leave the set undefined: the caller rebuilds it.
            raise BackendError(f"nvmlDeviceRegisterEvents({uuid}) failed: {err}") from err
        self._registered.append((uuid, handle))

    @property
    def registered(self) -> tuple[str, ...]:
        return tuple(uuid for uuid, _ in self._registered)

    def wait(self, timeout_s: float) -> list[DeviceEvent]:
        if self._set is None:
            raise BackendError("event set closed")
        events: list[DeviceEvent] = []
        timeout_ms = max(0, min(int(timeout_s * 1000), 0xFFFFFFFF))
        while True:
            data = pynvml.c_nvmlEventData_t()
            data.gpuInstanceId = _NO_ID
            data.computeInstanceId = _NO_ID
            ret = self._wait_fn(self._set, ctypes.byref(data), ctypes.c_uint(timeout_ms))
            if ret == _TIMEOUT:
                return events
            if ret == _GPU_IS_LOST:
                raise DeviceLostError(self._lost_uuid(data))
            if ret != _SUCCESS:
                raise BackendError(f"nvmlEventSetWait failed: {pynvml.NVMLError(ret)}")
            events.append(self._event(data))
            timeout_ms = 0  # drain what is already queued, then return

    def _event(self, data: Any) -> DeviceEvent:
        event_type = int(data.eventType)
        gi = int(data.gpuInstanceId) if self._v2 else _NO_ID
        ci = int(data.computeInstanceId) if self._v2 else _NO_ID
        return DeviceEvent(
            gpu_uuid=self._uuid_by_handle.get(_handle_key(data.device), "unknown"),
            event_type=event_type,
            xid=int(data.eventData) if event_type == EVENT_XID else 0,
            gpu_instance_id=None if gi == _NO_ID else gi,
            compute_instance_id=None if ci == _NO_ID else ci,
            timestamp=time.time(),
        )

    def _lost_uuid(self, data: Any) -> str:
        uuid = self._uuid_by_handle.get(_handle_key(data.device))
        if uuid is not None:
            return uuid
        for candidate, handle in self._registered:  # the driver did not say which: probe
            try:
                pynvml.nvmlDeviceGetUUID(handle)
            except pynvml.NVMLError as err:
                if _code(err) == _GPU_IS_LOST:
                    return candidate
        return "unknown"

    def close(self) -> None:
        if self._set is None:
            return
        event_set, self._set = self._set, None
        try:
            pynvml.nvmlEventSetFree(event_set)
        except pynvml.NVMLError as err:
            log.warning("nvml_event_set_free_failed", error=str(err))
