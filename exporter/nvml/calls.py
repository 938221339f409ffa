"""Call() fields: one dedicated NVML call each, a table of small functions keyed by the call's name.

Values that several fields share (utilisation, memory, BAR1) are read once per device read
(`CallRead.shared`), errors included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pynvml
import structlog

from exporter.fields import FieldSpec, to_exported
from exporter.model import ReadResult
from exporter.nvml.compat import Symbols
from exporter.nvml.errors import UNSUPPORTED_CODES, InvalidValue, Unsupported, code, record_call_error

log = structlog.get_logger("exporter.nvml")

_GPU_TEMP_MAX = 200
_VGPU_FEATURE = getattr(pynvml, "NVML_GRID_LICENSE_FEATURE_CODE_VGPU", 1)
_VGPU_GUEST = getattr(pynvml, "NVML_GPU_VIRTUALIZATION_MODE_VGPU", 2)


@dataclass
class CallRead:
    """One device read's calls: the handle, the old-driver fallbacks, and the shared values read so far."""

    handle: Any
    symbols: Symbols
    memo: dict[str, Any] = field(default_factory=dict)

    def shared(self, key: str, fn: Callable[[], Any]) -> Any:
        """One driver call per read for values shared by several fields."""
        if key in self.memo:
            cached = self.memo[key]
            if isinstance(cached, BaseException):
                raise cached
            return cached
        try:
            value = fn()
        except (pynvml.NVMLError, Unsupported, InvalidValue) as err:
            self.memo[key] = err
            raise
        self.memo[key] = value
        return value

    def utilisation(self) -> Any:
        return self.shared("util", lambda: pynvml.nvmlDeviceGetUtilizationRates(self.handle))

    def memory(self) -> tuple[int, int | None, int, int]:
        memory: tuple[int, int | None, int, int] = self.shared("memory", lambda: self.symbols.memory(self.handle))
        return memory

    def bar1(self) -> Any:
        return self.shared("bar1", lambda: pynvml.nvmlDeviceGetBAR1MemoryInfo(self.handle))


def _fb_reserved(r: CallRead) -> float:
    _total, reserved, _free, _used = r.memory()
    if reserved is None:
        raise Unsupported("fb_reserved")
    return float(reserved)


class NoValue(Exception):
    """This read gives no value, and that is neither an error nor a lack of support (asked again next cycle)."""


def _gpu_temp(r: CallRead) -> float:
    temp = r.symbols.gpu_temp(r.handle)
    if temp > _GPU_TEMP_MAX:  # DCGM drops readings above 200 C as out of range: no value, no error
        raise NoValue("gpu_temp")
    return temp


def _power_limit(r: CallRead) -> float:
    # DCGM stores limit_mW / 1000 in integer arithmetic: whole watts (a 299.5 W limit reads 299).
    return float(int(pynvml.nvmlDeviceGetPowerManagementLimit(r.handle)) // 1000 * 1000)


def _vgpu_license(r: CallRead) -> float:
    try:
        mode = pynvml.nvmlDeviceGetVirtualizationMode(r.handle)
    except pynvml.NVMLError as err:
        # No virtualization support: not a vGPU guest, so no license to hold. Any other error
        # is an error, not a reading.
        if code(err) not in UNSUPPORTED_CODES:
            raise
        return 0.0
    if mode != _VGPU_GUEST:
        return 0.0
    features = pynvml.nvmlDeviceGetGridLicensableFeatures(r.handle)
    if not features.isGridLicenseSupported:
        return 0.0
    count = min(int(features.licensableFeaturesCount), len(features.gridLicensableFeatures))
    # Only the vGPU feature counts (DCGM, DCGM_FI_DEV_VGPU_LICENSE_STATUS): a licensed vWS feature is not it.
    licensed = any(
        int(features.gridLicensableFeatures[i].featureCode) == _VGPU_FEATURE
        and int(features.gridLicensableFeatures[i].featureState) > 0
        for i in range(count)
    )
    return 1.0 if licensed else 0.0


# Call(name) -> how to read it, in the value NVML reports (FieldSpec.scale turns it into the exported unit).
CALLS: dict[str, Callable[[CallRead], float]] = {
    "sm_clock": lambda r: float(pynvml.nvmlDeviceGetClockInfo(r.handle, pynvml.NVML_CLOCK_SM)),
    "mem_clock": lambda r: float(pynvml.nvmlDeviceGetClockInfo(r.handle, pynvml.NVML_CLOCK_MEM)),
    "gpu_temp": _gpu_temp,
    "power_usage": lambda r: float(pynvml.nvmlDeviceGetPowerUsage(r.handle)),
    "power_limit": _power_limit,
    "gpu_util": lambda r: float(r.utilisation().gpu),
    "mem_util": lambda r: float(r.utilisation().memory),
    "enc_util": lambda r: float(pynvml.nvmlDeviceGetEncoderUtilization(r.handle)[0]),
    "dec_util": lambda r: float(pynvml.nvmlDeviceGetDecoderUtilization(r.handle)[0]),
    "fb_total": lambda r: float(r.memory()[0]),
    "fb_reserved": _fb_reserved,
    "fb_free": lambda r: float(r.memory()[2]),
    "fb_used": lambda r: float(r.memory()[3]),
    "bar1_used": lambda r: float(r.bar1().bar1Used),
    "clocks_event_reasons": lambda r: r.symbols.clock_event_reasons(r.handle),
    # 32 (NVML_PSTATE_UNKNOWN) is passed through, as DCGM does.
    "pstate": lambda r: float(pynvml.nvmlDeviceGetPerformanceState(r.handle)),
    "fan_speed": lambda r: float(pynvml.nvmlDeviceGetFanSpeed(r.handle)),
    "vgpu_license": _vgpu_license,
}


class CallReader:
    def __init__(self, symbols: Symbols) -> None:
        self._symbols = symbols
        self._warned: set[str] = set()

    def read(self, uuid: str, handle: Any, specs: Sequence[tuple[FieldSpec, str]], result: ReadResult) -> None:
        """`specs`: (spec, name of its Call)."""
        r = CallRead(handle, self._symbols)
        for spec, name in specs:
            try:
                value = self._value(name, r)
            except Unsupported:
                result.unsupported.add(spec.name)
                continue
            except NoValue:
                continue
            except InvalidValue:
                result.errors[spec.name] = "InvalidValue"
                continue
            except pynvml.NVMLError as err:
                record_call_error(uuid, err, spec.name, result)
                continue
            result.values[spec.name] = to_exported(spec, float(value))

    def _value(self, name: str, r: CallRead) -> float:
        fn = CALLS.get(name)
        if fn is None:
            if name not in self._warned:
                self._warned.add(name)
                log.warning("unknown_call_reader", reader=f"call:{name}")
            raise Unsupported(name)
        return fn(r)
