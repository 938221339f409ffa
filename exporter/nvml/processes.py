"""The processes NVML lists on one GPU or MIG device, with their memory and utilisation (issue #14).

Listing: compute, graphics and MPS clients, each through the newest form the driver has
(`..._v3` (R510+) -> `..._v2` -> the unversioned call with the v1 struct), a missing symbol
remembered by `Symbols`. A PID listed by several queries is kept once, by the first that lists it
(compute, then graphics, then MPS): the process is the same, its memory is the same number.

Utilisation: `nvmlDeviceGetProcessesUtilizationInfo` (NVML 12.4+) or else
`nvmlDeviceGetProcessUtilization`, asked only for samples newer than the newest one this reader has
seen on the device (its `lastSeenTimeStamp`). The driver keeps samples only of processes with
non-zero utilisation, so a PID with no new sample gets None ("no sample since the last read"), never
the previous read's value: a stale 90 % would keep blaming a process that went idle. NVML answers
NOT_SUPPORTED for utilisation on MIG devices and MIG-enabled GPUs (nvml.h: "On MIG-enabled GPUs,
querying process utilization is not currently supported"), so it is not asked on a MIG handle.

A query answered NOT_SUPPORTED is remembered per device and not asked again for
UNSUPPORTED_RETRY_S (as the collector does for fields): support can change with the MIG mode.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pynvml
import structlog

from exporter.backend import DeviceError, DeviceLostError, MonitorError
from exporter.model import GpuProcess
from exporter.nvml.compat import Symbols
from exporter.nvml.errors import (
    ARGUMENT_VERSION_MISMATCH,
    FUNCTION_NOT_FOUND,
    GPU_IS_LOST,
    MONITOR_ERRORS,
    NOT_FOUND,
    UNSUPPORTED_CODES,
    code,
)

log = structlog.get_logger("exporter.nvml")

UNSUPPORTED_RETRY_S = 300.0
_NOT_AVAILABLE = 0xFFFFFFFFFFFFFFFF  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long
_NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId/computeInstanceId of a process not in a MIG instance

# (kind, unversioned symbol): the queries in the order that decides a PID listed twice.
_LISTINGS = (
    ("compute", "nvmlDeviceGetComputeRunningProcesses"),
    ("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
    ("mps", "nvmlDeviceGetMPSComputeRunningProcesses"),
)
_UTILISATION = "utilisation"


class _ProcessInfoV1(ctypes.Structure):
    """nvmlProcessInfo_v1_t, what the unversioned ...RunningProcesses fill (pynvml has no such struct)."""

    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


@dataclass
class _Listed:
    pid: int
    used_memory_bytes: int | None
    gpu_instance_id: int | None
    compute_instance_id: int | None


@dataclass
class _DeviceState:
    last_seen_us: int = 0  # the newest utilisation sample's timestamp read so far
    unsupported: dict[str, float] = field(default_factory=dict)  # query -> when answered NOT_SUPPORTED


def _instance_id(value: Any) -> int | None:
    return None if value is None or int(value) == _NO_INSTANCE else int(value)


def _memory(value: Any) -> int | None:
    return None if value is None or int(value) == _NOT_AVAILABLE else int(value)


def _failure(uuid: str, what: str, err: pynvml.NVMLError) -> Exception:
    if code(err) == GPU_IS_LOST:
        return DeviceLostError(uuid)
    name = type(err).__name__
    return (MonitorError if name in MONITOR_ERRORS else DeviceError)(f"{uuid}: {what}: {err}", name)


class ProcessReader:
    """Process lists per device; safe for concurrent reads of different devices."""

    def __init__(self, symbols: Symbols, clock: Callable[[], float] = time.monotonic) -> None:
        self._symbols = symbols
        self._clock = clock
        self._lock = threading.Lock()  # guards `_devices` only, never held across a driver call
        self._devices: dict[str, _DeviceState] = {}

    def reset(self) -> None:
        with self._lock:
            self._devices.clear()

    def read(self, uuid: str, handle: Any) -> tuple[GpuProcess, ...]:
        """The device's processes. Raises DeviceLostError, or DeviceError/MonitorError when a listing fails."""
        with self._lock:
            state = self._devices.setdefault(uuid, _DeviceState())
        listed: dict[tuple[int, int | None, int | None], tuple[str, _Listed]] = {}
        for kind, symbol in _LISTINGS:
            if not self._due(uuid, state, kind):
                continue
            try:
                entries = self._list(symbol, handle)
            except pynvml.NVMLError as err:
                if code(err) in UNSUPPORTED_CODES:
                    self._unsupported(uuid, state, kind)
                    continue
                raise _failure(uuid, f"{symbol}", err) from err
            state.unsupported.pop(kind, None)
            for entry in entries:
                listed.setdefault((entry.pid, entry.gpu_instance_id, entry.compute_instance_id), (kind, entry))
        samples = {} if uuid.startswith("MIG-") else self._utilisation(uuid, handle, state)
        processes = []
        for kind, entry in listed.values():
            util = samples.get(entry.pid)
            processes.append(
                GpuProcess(
                    pid=entry.pid,
                    kind=kind,
                    used_memory_bytes=entry.used_memory_bytes,
                    gpu_instance_id=entry.gpu_instance_id,
                    compute_instance_id=entry.compute_instance_id,
                    sm_util=util[0] if util else None,
                    mem_util=util[1] if util else None,
                    enc_util=util[2] if util else None,
                    dec_util=util[3] if util else None,
                )
            )
        return tuple(sorted(processes, key=lambda p: (p.pid, p.gpu_instance_id or 0, p.compute_instance_id or 0)))

    # ------------------------------------------------------------ support

    def _due(self, uuid: str, state: _DeviceState, query: str) -> bool:
        since = state.unsupported.get(query)
        return since is None or self._clock() - since >= UNSUPPORTED_RETRY_S

    def _unsupported(self, uuid: str, state: _DeviceState, query: str) -> None:
        if query not in state.unsupported:
            log.info("process_query_unsupported", uuid=uuid, query=query, retry_in_s=UNSUPPORTED_RETRY_S)
        state.unsupported[query] = self._clock()

    # ------------------------------------------------------------ listing

    def _list(self, symbol: str, handle: Any) -> list[_Listed]:
        """One kind's processes through the newest form the driver has."""
        for version in ("_v3", "_v2"):
            binding = getattr(pynvml, symbol + version, None)
            if binding is None:
                continue
            ok, infos = self._symbols.try_new(symbol + version, partial(binding, handle))
            if ok:
                return [
                    _Listed(
                        int(p.pid),
                        _memory(p.usedGpuMemory),
                        _instance_id(getattr(p, "gpuInstanceId", None)),
                        _instance_id(getattr(p, "computeInstanceId", None)),
                    )
                    for p in infos
                ]
        if symbol in self._symbols.missing:
            raise pynvml.NVMLError(FUNCTION_NOT_FOUND)
        try:
            return self._list_v1(symbol, handle)
        except pynvml.NVMLError as err:
            if code(err) == FUNCTION_NOT_FOUND:
                self._symbols.missing.add(symbol)
            raise

    @staticmethod
    def _list_v1(symbol: str, handle: Any) -> list[_Listed]:
        fn = pynvml._nvmlGetFunctionPointer(symbol)
        count = ctypes.c_uint(0)
        ret = fn(handle, ctypes.byref(count), None)
        if ret == pynvml.NVML_SUCCESS:
            return []
        if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
            raise pynvml.NVMLError(ret)
        count.value = count.value * 2 + 5  # room for processes started since the sizing call
        infos = (_ProcessInfoV1 * count.value)()
        pynvml._nvmlCheckReturn(fn(handle, ctypes.byref(count), infos))
        return [_Listed(int(p.pid), _memory(p.usedGpuMemory), None, None) for p in infos[: count.value]]

    # ------------------------------------------------------------ utilisation

    def _utilisation(self, uuid: str, handle: Any, state: _DeviceState) -> dict[int, tuple[float, float, float, float]]:
        """PID -> (sm, mem, enc, dec) percent from the samples newer than the last read's; {} when none."""
        if not self._due(uuid, state, _UTILISATION):
            return {}
        try:
            samples = self._samples(handle, state.last_seen_us)
        except pynvml.NVMLError as err:
            error_code = code(err)
            if error_code in (NOT_FOUND, pynvml.NVML_SUCCESS):
                return {}  # no sample since lastSeenTimeStamp: every process idle since the last read
            if error_code == GPU_IS_LOST:
                raise DeviceLostError(uuid) from err
            if error_code in UNSUPPORTED_CODES:
                self._unsupported(uuid, state, _UTILISATION)
                return {}
            # The listing succeeded: utilisation unknown this time, the processes still reported.
            log.debug("process_utilisation_failed", uuid=uuid, error=type(err).__name__)
            return {}
        state.unsupported.pop(_UTILISATION, None)
        newest: dict[int, tuple[int, tuple[float, float, float, float]]] = {}
        for s in samples:
            at = int(s.timeStamp)
            pid = int(s.pid)
            if at <= state.last_seen_us:
                continue  # a driver that ignores lastSeenTimeStamp: never report an old sample as new
            kept = newest.get(pid)
            if kept is None or at > kept[0]:
                newest[pid] = (at, (float(s.smUtil), float(s.memUtil), float(s.encUtil), float(s.decUtil)))
        if newest:
            state.last_seen_us = max(at for at, _ in newest.values())
        return {pid: util for pid, (_, util) in newest.items()}

    def _samples(self, handle: Any, last_seen_us: int) -> list[Any]:
        info = getattr(pynvml, "nvmlDeviceGetProcessesUtilizationInfo", None)
        symbol = "nvmlDeviceGetProcessesUtilizationInfo"
        if info is not None:
            try:
                ok, samples = self._symbols.try_new(symbol, lambda: info(handle, last_seen_us))
            except pynvml.NVMLError as err:
                if code(err) != ARGUMENT_VERSION_MISMATCH:
                    raise
                # A driver that wants another struct version than the binding's: the older call serves.
                log.info("nvml_symbol_fallback", missing=symbol, reason="struct version mismatch")
                self._symbols.missing.add(symbol)
                ok, samples = False, None
            if ok:
                return list(samples)
        return list(pynvml.nvmlDeviceGetProcessUtilization(handle, last_seen_us))
