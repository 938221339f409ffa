"""NVML error codes and names, and what a failed read means.

A per-field NOT_SUPPORTED (or FUNCTION_NOT_FOUND) is "unsupported"; GPU_IS_LOST is a lost device;
a read in which every field failed is a failure of the device as a whole (DeviceError), or of the
monitor (MonitorError) when the error is one of ours: NVML uninitialised, driver not loaded or of
another version, no permission.
"""

from __future__ import annotations

import pynvml

from exporter.backend import DeviceError, DeviceLostError, MonitorError
from exporter.model import ReadResult

SUCCESS = pynvml.NVML_SUCCESS
NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
TIMEOUT = pynvml.NVML_ERROR_TIMEOUT
FUNCTION_NOT_FOUND = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
LIB_RM_VERSION_MISMATCH = getattr(pynvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", 18)
ARGUMENT_VERSION_MISMATCH = getattr(pynvml, "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", 25)

# The device (or the driver) cannot give this value: not an error of the read.
UNSUPPORTED_CODES = (NOT_SUPPORTED, FUNCTION_NOT_FOUND)


class Unsupported(Exception):
    """The device cannot give this value (not an NVML error code)."""


class InvalidValue(Exception):
    """NVML answered, but with a value that means "no reading"."""


def code(err: BaseException) -> int | None:
    value = getattr(err, "value", None)
    return value if isinstance(value, int) else None


def error_name(error_code: int) -> str:
    return type(pynvml.NVMLError(error_code)).__name__


# Failures of ours, not the device's: they never fence a GPU (exporter/health/blindspots.py).
MONITOR_ERRORS = frozenset(
    error_name(c)
    for c in (
        pynvml.NVML_ERROR_UNINITIALIZED,
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        LIB_RM_VERSION_MISMATCH,
        pynvml.NVML_ERROR_NO_PERMISSION,
    )
)


def record_call_error(uuid: str, err: pynvml.NVMLError, name: str, result: ReadResult) -> None:
    """One field's NVML call failed: lost device, unsupported field, or an error of this read."""
    error_code = code(err)
    if error_code == GPU_IS_LOST:
        raise DeviceLostError(uuid) from err
    if error_code in UNSUPPORTED_CODES:
        result.unsupported.add(name)
    else:
        result.errors[name] = type(err).__name__


def handle_error(uuid: str, err: pynvml.NVMLError) -> Exception:
    """What a failed handle lookup means: the device is gone, we failed, or it failed."""
    if code(err) in (NOT_FOUND, GPU_IS_LOST):
        return DeviceLostError(uuid)
    return _failure(f"{uuid}: {err}", type(err).__name__)


def _failure(message: str, error: str) -> DeviceError:
    """A whole-device failure: ours (MonitorError) for our error codes, else the device's."""
    return (MonitorError if error in MONITOR_ERRORS else DeviceError)(message, error)


def raise_whole_device_failure(uuid: str, result: ReadResult) -> None:
    """Every field of the read failed: the device (or we) failed as a whole."""
    counts: dict[str, int] = {}
    for error in result.errors.values():
        counts[error] = counts.get(error, 0) + 1
    error = max(sorted(counts), key=lambda e: counts[e])
    raise _failure(f"{uuid}: every field failed ({error})", error)
