"""NvmlEventSource: one NVML event set over every GPU (XIDs, ECC, MIG config changes)."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from typing import Any

import pynvml
import structlog

from exporter.backend import BackendError, DeviceLostError
from exporter.model import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_MIG_CONFIG_CHANGE,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID,
    DeviceEvent,
)
from exporter.nvml.compat import Symbols
from exporter.nvml.errors import GPU_IS_LOST, NOT_SUPPORTED, SUCCESS, TIMEOUT, code

log = structlog.get_logger("exporter.nvml")

WANTED_EVENTS = EVENT_XID | EVENT_DOUBLE_BIT_ECC | EVENT_SINGLE_BIT_ECC | EVENT_MIG_CONFIG_CHANGE

_NO_ID = 0xFFFFFFFF


def _handle_key(handle: Any) -> int:
    """The pointer value of an nvmlDevice_t, usable as a dict key."""
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


class NvmlEventSource:
    """One NVML event set over every GPU; used from one thread only."""

    def __init__(self, symbols: Symbols, handles: Sequence[tuple[str, Any]]) -> None:
        self._set: Any = None
        self._uuid_by_handle: dict[int, str] = {}
        self._registered: list[tuple[str, Any]] = []
        try:
            self._wait_fn, self._v2 = symbols.wait_function()
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
            if code(err) in (GPU_IS_LOST, NOT_SUPPORTED):
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
            if ret == TIMEOUT:
                return events
            if ret == GPU_IS_LOST:
                raise DeviceLostError(self._lost_uuid(data))
            if ret != SUCCESS:
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
                if code(err) == GPU_IS_LOST:
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
