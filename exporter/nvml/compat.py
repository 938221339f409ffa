"""Old drivers: where nvidia-ml-py calls a versioned symbol the driver lacks (FunctionNotFound),
the older symbol is called directly through `pynvml._nvmlGetFunctionPointer` with pynvml's own
structs, and the missing symbol is remembered so it is not looked up again."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pynvml
import structlog

from exporter.nvml.errors import FUNCTION_NOT_FOUND, code

log = structlog.get_logger("exporter.nvml")

_MEMORY_V2 = getattr(pynvml, "nvmlMemory_v2", 0x02000028)


def text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def normalise_bus_id(bus_id: str) -> str:
    """NVML's 8-hex-digit-domain form ("00000000:8D:00.0"); legacy ids have 4 digits."""
    bus_id = bus_id.strip().rstrip("\x00")
    domain, sep, rest = bus_id.partition(":")
    if sep and rest.count(":") == 1 and len(domain) < 8:
        return domain.rjust(8, "0") + ":" + rest
    return bus_id


class Symbols:
    """The driver's missing symbols, found out once each."""

    def __init__(self) -> None:
        self.missing: set[str] = set()

    def call_old(self, symbol: str, *args: Any) -> None:
        fn = pynvml._nvmlGetFunctionPointer(symbol)
        ret = fn(*args)
        pynvml._nvmlCheckReturn(ret)

    def try_new(self, symbol: str, call: Callable[[], Any]) -> tuple[bool, Any]:
        """Call a binding function that uses `symbol`; (False, None) if the driver lacks it."""
        if symbol in self.missing:
            return False, None
        try:
            return True, call()
        except pynvml.NVMLError as err:
            if code(err) != FUNCTION_NOT_FOUND:
                raise
            log.info("nvml_symbol_fallback", missing=symbol, reason="older driver: using the older call")
            self.missing.add(symbol)
            return False, None

    # ---------------------------------------------------- discovery

    def device_count(self) -> int:
        ok, count = self.try_new("nvmlDeviceGetCount_v2", pynvml.nvmlDeviceGetCount)
        if ok:
            return int(count)
        c_count = ctypes.c_uint()
        self.call_old("nvmlDeviceGetCount", ctypes.byref(c_count))
        return int(c_count.value)

    def handle_by_index(self, index: int) -> Any:
        ok, handle = self.try_new("nvmlDeviceGetHandleByIndex_v2", lambda: pynvml.nvmlDeviceGetHandleByIndex(index))
        if ok:
            return handle
        device = pynvml.c_nvmlDevice_t()
        self.call_old("nvmlDeviceGetHandleByIndex", ctypes.c_uint(index), ctypes.byref(device))
        return device

    def pci_bus_id(self, handle: Any) -> str:
        ok, info = self.try_new("nvmlDeviceGetPciInfo_v3", lambda: pynvml.nvmlDeviceGetPciInfo_v3(handle))
        if ok:
            return normalise_bus_id(text(info.busId))
        info = pynvml.nvmlPciInfo_t()
        if "nvmlDeviceGetPciInfo_v2" not in self.missing:
            try:
                self.call_old("nvmlDeviceGetPciInfo_v2", handle, ctypes.byref(info))
                return normalise_bus_id(text(info.busId))
            except pynvml.NVMLError as err:
                if code(err) != FUNCTION_NOT_FOUND:
                    raise
                self.missing.add("nvmlDeviceGetPciInfo_v2")
        # v1 struct: its 16-byte busId sits where v2/v3 keep busIdLegacy (the v3 struct is larger).
        self.call_old("nvmlDeviceGetPciInfo", handle, ctypes.byref(info))
        return normalise_bus_id(text(info.busIdLegacy))

    def numa_node(self, handle: Any) -> tuple[bool, Any]:
        """(False, None) where the binding or the driver lacks nvmlDeviceGetNumaNodeId."""
        getter = getattr(pynvml, "nvmlDeviceGetNumaNodeId", None)
        if getter is None:
            return False, None
        return self.try_new("nvmlDeviceGetNumaNodeId", lambda: getter(handle))

    # ------------------------------------------------------- reads

    def memory(self, handle: Any) -> tuple[int, int | None, int, int]:
        """(total, reserved or None where v1 folds it into used, free, used) in bytes."""
        ok, info = self.try_new(
            "nvmlDeviceGetMemoryInfo_v2", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle, version=_MEMORY_V2)
        )
        if ok:
            return int(info.total), int(info.reserved), int(info.free), int(info.used)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), None, int(info.free), int(info.used)  # v1 folds reserved into used

    def gpu_temp(self, handle: Any) -> float:
        getter = getattr(pynvml, "nvmlDeviceGetTemperatureV", None)
        if getter is not None:
            ok, temp = self.try_new("nvmlDeviceGetTemperatureV", lambda: getter(handle, pynvml.NVML_TEMPERATURE_GPU))
            if ok:
                return float(temp)
        return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))

    def clock_event_reasons(self, handle: Any) -> float:
        getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if getter is not None:
            ok, reasons = self.try_new("nvmlDeviceGetCurrentClocksEventReasons", lambda: getter(handle))
            if ok:
                return float(reasons)
        return float(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    # ------------------------------------------------------ events

    def wait_function(self) -> tuple[Any, bool]:
        """(C function, True if it fills the v2 event struct with instance ids)."""
        if "nvmlEventSetWait_v2" not in self.missing:
            try:
                return pynvml._nvmlGetFunctionPointer("nvmlEventSetWait_v2"), True
            except pynvml.NVMLError as err:
                if code(err) != FUNCTION_NOT_FOUND:
                    raise
                self.missing.add("nvmlEventSetWait_v2")
        return pynvml._nvmlGetFunctionPointer("nvmlEventSetWait"), False
