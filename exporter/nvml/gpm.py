"""Gpm() fields (DCGM profiling) from NVML's GPM API.

Support is queried once per GPU (nvmlGpmQueryDeviceSupport; unsupported or FunctionNotFound ->
the fields are unsupported). Each GPU / MIG device keeps two GPM samples, allocated on first use
and freed at shutdown or when discovery drops the device (or its MIG mode changes); every read
takes a new sample (nvmlGpmMigSampleGet on the parent with the GPU instance id for a MIG device)
and computes all requested metrics between the previous sample and it with one nvmlGpmMetricsGet
call. The first read (and the first after a sampling error) gives no value.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import pynvml
import structlog

from exporter.backend import DeviceError, DeviceLostError
from exporter.fields import FieldSpec, to_exported
from exporter.model import ReadResult
from exporter.nvml.compat import Symbols, text
from exporter.nvml.discovery import Discovery
from exporter.nvml.errors import (
    ARGUMENT_VERSION_MISMATCH,
    FUNCTION_NOT_FOUND,
    GPU_IS_LOST,
    NOT_SUPPORTED,
    SUCCESS,
    UNSUPPORTED_CODES,
    code,
    error_name,
)

log = structlog.get_logger("exporter.nvml")

GpmSpecs: TypeAlias = Sequence[tuple[FieldSpec, int]]  # (spec, NVML_GPM_METRIC id)


class GpmState:
    """GPM samples of one GPU or MIG device. `busy`/`closed` are guarded by the sampler's lock."""

    def __init__(self) -> None:
        self.samples: list[Any] = []  # [previous, current] once allocated
        self.has_previous = False
        self.busy = False
        self.closed = False
        self.request: Any = None  # c_nvmlGpmMetricsGet_t, reused (~19 KB)


class GpmSampler:
    def __init__(self, symbols: Symbols, discovery: Discovery) -> None:
        self._symbols = symbols
        self._discovery = discovery
        self._lock = threading.Lock()
        self._states: dict[str, GpmState] = {}
        self._support: dict[str, bool] = {}  # GPU uuid -> nvmlGpmQueryDeviceSupport answer

    # ------------------------------------------------------------ lifecycle

    def forget(self, uuids: Iterable[str]) -> None:
        """Free the samples of these devices (gone, or their MIG mode changed)."""
        with self._lock:
            dropped = [self._states.pop(u) for u in uuids if u in self._states]
        self._free(dropped)

    def keep_only(self, present: set[str]) -> None:
        with self._lock:
            dropped = [self._states.pop(u) for u in [u for u in self._states if u not in present]]
        self._free(dropped)

    def close(self) -> None:
        with self._lock:
            states = list(self._states.values())
            self._states.clear()
            self._support.clear()
        self._free(states)

    def _free(self, states: Sequence[GpmState]) -> None:
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

    # -------------------------------------------------------------- reading

    def _target(self, uuid: str, handle: Any) -> tuple[str, Any, int | None]:
        """(GPU uuid, GPU handle, GPU instance id or None) to sample for a GPU or MIG device."""
        if not uuid.startswith("MIG-"):
            return uuid, handle, None
        known = self._discovery.mig_parent(uuid)
        if known is not None:
            parent_uuid, gi = known
            return parent_uuid, self._discovery.handle_for(parent_uuid), gi
        parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        parent_uuid = text(pynvml.nvmlDeviceGetUUID(parent))
        gi = int(pynvml.nvmlDeviceGetGpuInstanceId(handle))
        self._discovery.remember_mig_parent(uuid, parent_uuid, gi)
        return parent_uuid, parent, gi

    def _supported(self, gpu_uuid: str, gpu_handle: Any) -> bool:
        with self._lock:
            known = self._support.get(gpu_uuid)
        if known is not None:
            return known
        if "nvmlGpmQueryDeviceSupport" in self._symbols.missing:
            return False
        try:
            supported = bool(pynvml.nvmlGpmQueryDeviceSupport(gpu_handle).isSupportedDevice)
        except pynvml.NVMLError as err:
            error_code = code(err)
            if error_code == FUNCTION_NOT_FOUND:
                log.info("nvml_gpm_unavailable", reason="driver lacks the GPM API: DCP fields unsupported")
                self._symbols.missing.add("nvmlGpmQueryDeviceSupport")
                return False
            if error_code in (NOT_SUPPORTED, ARGUMENT_VERSION_MISMATCH):
                supported = False
            else:
                raise
        with self._lock:
            self._support[gpu_uuid] = supported
        return supported

    def read(self, uuid: str, handle: Any, specs: GpmSpecs, result: ReadResult) -> None:
        try:
            gpu_uuid, gpu_handle, gi = self._target(uuid, handle)
            supported = self._supported(gpu_uuid, gpu_handle)
        except (pynvml.NVMLError, DeviceError) as err:
            _failed(uuid, err, specs, result)
            return
        if not supported:
            result.unsupported.update(spec.name for spec, _id in specs)
            return
        with self._lock:
            state = self._states.get(uuid)
            if state is None:
                state = self._states[uuid] = GpmState()
            if state.busy or state.closed:  # a hung read of this device still owns the samples
                return
            state.busy = True
        try:
            _sample(uuid, state, gpu_handle, gi, specs, result)
        finally:
            with self._lock:
                state.busy = False
                free_now = state.closed
            if free_now:
                self._free([state])


def _sample(uuid: str, state: GpmState, gpu_handle: Any, gi: int | None, specs: GpmSpecs, result: ReadResult) -> None:
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
        _failed(uuid, err, specs, result)
        return
    previous = state.samples[0]
    state.samples.reverse()  # this sample is the next read's previous one
    if not state.has_previous:
        state.has_previous = True
        return  # metrics need two samples
    ids = list(dict.fromkeys(metric_id for _spec, metric_id in specs))
    if state.request is None:
        state.request = pynvml.c_nvmlGpmMetricsGet_t()
    request = state.request
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = len(ids)
    request.sample1 = previous
    request.sample2 = current
    for i, metric_id in enumerate(ids):
        request.metrics[i].metricId = metric_id
        request.metrics[i].nvmlReturn = SUCCESS
        request.metrics[i].value = 0.0
    try:
        pynvml.nvmlGpmMetricsGet(request)
    except pynvml.NVMLError as err:
        _failed(uuid, err, specs, result)
        return
    by_id: dict[int, float | int] = {}
    for i, metric_id in enumerate(ids):
        entry = request.metrics[i]
        ret = int(entry.nvmlReturn)
        by_id[metric_id] = float(entry.value) if ret == SUCCESS else ret
    for spec, metric_id in specs:
        value = by_id[metric_id]
        if isinstance(value, float):
            if value == value:  # NaN (no activity to compute yet) is blank in DCGM: no value, no error
                result.values[spec.name] = to_exported(spec, value)
        elif value in UNSUPPORTED_CODES:
            result.unsupported.add(spec.name)
        elif value == GPU_IS_LOST:
            raise DeviceLostError(uuid)
        else:
            result.errors[spec.name] = error_name(value)


def _failed(uuid: str, err: BaseException, specs: GpmSpecs, result: ReadResult) -> None:
    if isinstance(err, DeviceError):
        raise err
    error_code = code(err)
    if error_code == GPU_IS_LOST:
        raise DeviceLostError(uuid) from err
    for spec, _id in specs:
        if error_code in UNSUPPORTED_CODES:
            result.unsupported.add(spec.name)
        else:
            result.errors[spec.name] = type(err).__name__
