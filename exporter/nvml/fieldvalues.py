"""Batched nvmlDeviceGetFieldValues: FieldValue() fields (ids summed), Rate() and LinkRate() fields.

A per-field NOT_SUPPORTED is reported in ReadResult.unsupported; the collector owns the memory of
it (and when to ask again). A whole call that fails, NOT_SUPPORTED included, is an error of each
field, never a verdict on their support: only a driver without the call makes them unsupported.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeAlias

import pynvml

from exporter.backend import DeviceLostError
from exporter.fields import ALL_LINKS, FieldSpec, to_exported
from exporter.model import ReadResult
from exporter.nvml.errors import FUNCTION_NOT_FOUND, GPU_IS_LOST, SUCCESS, UNSUPPORTED_CODES, code, error_name

# NVML_FI_DEV_ECC_SBE_VOL_TOTAL (3) .. NVML_FI_DEV_RETIRED_PENDING (31): with ECC disabled the driver
# leaves these entries uninitialised (no timestamp, no latency, valueType 0): DCGM treats them as
# unsupported (NVML bug 2009232). The ECC counters among them (3-28) are read as unsigned 64-bit
# whatever valueType says, as DCGM does (NVML bug 2032468: the type is left at double).
_UNINITIALISED_WHEN_ECC_OFF = range(3, 32)
_ECC_COUNTER_IDS = range(3, 29)
_NVLINK_FIELD_IDS = frozenset({138, 139, 140, 141})
_MEMORY_TEMP_FIELD_ID = 82
_MEMORY_TEMP_MAX = 200

# nvmlValueType_t -> union member
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


class _FieldValueView(ctypes.Structure):
    """pynvml's nvmlFieldValue_t layout without its Python-level attribute hooks: a read-only view
    over the array the call filled, so decoding reads the members at C speed."""

    _fields_ = list(pynvml.c_nvmlFieldValue_t._fields_)


def _fast_view(values: Any, n: int) -> Any:
    """`values` seen through _FieldValueView (same bytes), or `values` itself if it is no such array."""
    if isinstance(values, ctypes.Array) and ctypes.sizeof(values) == n * ctypes.sizeof(_FieldValueView):
        return (_FieldValueView * n).from_buffer(values)
    return values


Decoded: TypeAlias = float | str | None  # a number, None (not supported), or an error name


def decode(uuid: str, entry: Any) -> Decoded:
    """One nvmlFieldValue_t, with the driver's quirks."""
    ret = int(entry.nvmlReturn)
    if ret == SUCCESS:
        fi = int(entry.fieldId)
        value_type = int(entry.valueType)
        if fi in _UNINITIALISED_WHEN_ECC_OFF:
            if entry.timestamp == 0 and entry.latencyUsec == 0 and value_type == 0:
                return None  # ECC disabled: the driver leaves the entry uninitialised
            if fi in _ECC_COUNTER_IDS:
                return float(entry.value.ullVal)
        if fi == _MEMORY_TEMP_FIELD_ID:
            temp = int(entry.value.uiVal)  # the driver fills uiVal whatever valueType says
            return float(temp) if temp <= _MEMORY_TEMP_MAX else "InvalidValue"
        member = _VALUE_MEMBERS.get(value_type)
        if member is None:
            return "UnknownValueType"
        return float(getattr(entry.value, member))
    if ret in UNSUPPORTED_CODES:
        return None
    if ret == GPU_IS_LOST:
        raise DeviceLostError(uuid)
    return error_name(ret)


class FieldValueReader:
    """Reads FieldValue, Rate and LinkRate fields with one call; keeps the previous counter of each rate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._previous: dict[tuple[str, int], tuple[float, float]] = {}
        self._previous_link: dict[tuple[str, str], tuple[float, float]] = {}

    def reset(self) -> None:
        with self._lock:
            self._previous.clear()
            self._previous_link.clear()

    def read(
        self,
        uuid: str,
        handle: Any,
        fv_specs: Sequence[FieldSpec],
        rate_specs: Sequence[tuple[FieldSpec, int]],
        result: ReadResult,
        link_specs: Sequence[FieldSpec] = (),
    ) -> None:
        """`rate_specs`: (spec, NVML_FI id of its byte counter); `link_specs`: LinkRate fields."""
        wanted: list[tuple[int, int]] = []
        for spec in (*fv_specs, *link_specs):
            for fi in spec.fi:
                wanted.append((fi, ALL_LINKS if fi in _NVLINK_FIELD_IDS else 0))
        for _spec, fi in rate_specs:
            wanted.append((fi, 0))
        ids = list(dict.fromkeys(wanted))
        try:
            values = pynvml.nvmlDeviceGetFieldValues(handle, ids)
        except pynvml.NVMLError as err:
            error_code = code(err)
            if error_code == GPU_IS_LOST:
                raise DeviceLostError(uuid) from err
            for spec in (*fv_specs, *link_specs, *(spec for spec, _fi in rate_specs)):
                # Only a driver without the call says nothing can be read this way. A whole-call
                # NOT_SUPPORTED is one odd answer: an error of each field, asked again next cycle,
                # or one answer would blind every health field of the batch.
                if error_code == FUNCTION_NOT_FOUND:
                    result.unsupported.add(spec.name)
                else:
                    result.errors[spec.name] = type(err).__name__
            return
        now = time.monotonic()
        decoded: dict[int, Decoded] = {}
        entries = _fast_view(values, len(ids))
        for i in range(len(ids)):
            decoded[ids[i][0]] = decode(uuid, entries[i])
        for spec in fv_specs:
            self._sum(spec, decoded, result)
        for spec in link_specs:
            self._link_rate(uuid, spec, decoded, now, result)
        rates: dict[int, float | None] = {}
        for spec, fi in rate_specs:
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

    @staticmethod
    def _sum(spec: FieldSpec, decoded: dict[int, Decoded], result: ReadResult) -> None:
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

    def _link_rate(
        self, uuid: str, spec: FieldSpec, decoded: dict[int, Decoded], now: float, result: ReadResult
    ) -> None:
        """DCGM's NVLink throughput (DcgmCacheManager::ReadAndCacheNvLinkBandwidth): the KiB counters'
        change per second / 1000, truncated; 0 on the first read, while they read 0, and after a reset."""
        probe = ReadResult()
        self._sum(replace(spec, scale=1.0), decoded, probe)
        if spec.name not in probe.values:
            result.unsupported.update(probe.unsupported)
            result.errors.update(probe.errors)
            return
        total = probe.values[spec.name]
        key = (uuid, spec.name)
        with self._lock:
            previous = self._previous_link.get(key)
            self._previous_link[key] = (total, now)
        rate = 0.0
        if previous is not None and total != 0 and now > previous[1] and total >= previous[0]:
            rate = float(int((total - previous[0]) / (now - previous[1]) / 1000.0))
        result.values[spec.name] = rate

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
