"""NvmlBackend: `exporter.backend.Backend` over NVML, composed of the package's parts.

Reads of different devices run concurrently in worker threads (ctypes drops the GIL during a
driver call, so a hung call blocks only its own thread). The parts' locks only guard their Python
caches and are never held across a driver call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import pynvml
import structlog

from exporter.backend import BackendError, DeviceError, DeviceLostError
from exporter.fields import NOT_POLLED, Call, FieldSpec, FieldValue, Gpm, LinkRate, Rate, assert_never
from exporter.logs import Reminder
from exporter.model import GpuProcess, Inventory, ReadResult
from exporter.nvml.calls import CallReader
from exporter.nvml.compat import Symbols, text
from exporter.nvml.discovery import Discovery
from exporter.nvml.errors import (
    LIB_RM_VERSION_MISMATCH,
    code,
    raise_whole_device_failure,
)
from exporter.nvml.events import NvmlEventSource
from exporter.nvml.fieldvalues import FieldValueReader
from exporter.nvml.gpm import GpmSampler
from exporter.nvml.processes import ProcessReader
from exporter.nvml.topology import TopologyReader

log = structlog.get_logger("exporter.nvml")

# How a field set splits by reader: (MIG-unsupported names, field values, rates, link rates, calls, GPM).
_Plan = tuple[
    tuple[str, ...],
    list[FieldSpec],
    list[tuple[FieldSpec, int]],
    list[FieldSpec],
    list[tuple[FieldSpec, str]],
    list[tuple[FieldSpec, int]],
]
_PLANS_KEPT = 64  # field sets whose split is remembered (one or two per device)


class NvmlBackend:
    """`exporter.backend.Backend` over NVML."""

    name = "nvml"

    def __init__(self, library_path: str | None = None) -> None:
        self._library_path = library_path
        self._started = False
        self._driver_version = ""
        self._nvml_version = ""
        self._symbols = Symbols()
        self._gpm: GpmSampler
        self._discovery = Discovery(self._symbols, forget=lambda uuids: self._gpm.forget(uuids))
        self._gpm = GpmSampler(self._symbols, self._discovery)
        self._field_values = FieldValueReader()
        self._calls = CallReader(self._symbols)
        self._topology = TopologyReader()
        self._processes = ProcessReader(self._symbols)
        # id(fields), is_mig -> (fields, its split): the collector asks with the same tuple every cycle.
        self._plans: dict[tuple[int, bool], tuple[Sequence[FieldSpec], _Plan]] = {}

    @property
    def discovery_log(self) -> Reminder:
        """When discovery's lasting trouble is logged (replaceable, e.g. with a test clock)."""
        return self._discovery.log

    @discovery_log.setter
    def discovery_log(self, reminder: Reminder) -> None:
        self._discovery.log = reminder

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
            self._driver_version = text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as err:
            log.warning("nvml_driver_version_failed", error=str(err))
            self._driver_version = ""
        try:
            self._nvml_version = text(pynvml.nvmlSystemGetNVMLVersion())
        except pynvml.NVMLError:
            self._nvml_version = ""  # only the DCGM_FI_NVML_VERSION label needs it: left out

    def _init_failure(self, err: BaseException) -> str:
        error_code = code(err)
        where = self._library_path or "libnvidia-ml.so.1"
        if error_code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
            return (
                f"NVML library {where} not found: is the NVIDIA driver installed and its user-space "
                "libraries visible to this container (NVIDIA container toolkit, or --nvml-library)?"
            )
        if error_code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
            return "NVIDIA kernel driver not loaded (nvmlInit: Driver Not Loaded): no GPU driver on this node?"
        if error_code == pynvml.NVML_ERROR_NO_PERMISSION:
            return "no permission to open the NVIDIA device nodes (nvmlInit: Insufficient Permissions)"
        if error_code == LIB_RM_VERSION_MISMATCH:
            return "NVML library and kernel driver versions differ (driver upgraded without a reboot?)"
        return f"nvmlInit failed: {err}"

    def shutdown(self) -> None:
        if not self._started:
            return
        self._started = False
        self._gpm.close()
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as err:
            log.warning("nvml_shutdown_failed", error=str(err))
        self._discovery.reset()
        self._field_values.reset()
        self._processes.reset()

    def _require_started(self) -> None:
        if not self._started:
            raise BackendError("NVML backend not started")

    # ------------------------------------------------------------ discovery

    def discover(self) -> Inventory:
        self._require_started()
        gpus = self._discovery.gpus()
        self._gpm.keep_only({g.uuid for g in gpus} | {m.uuid for g in gpus for m in g.migs})
        pairs, p2p = self._discovery.nvlink(gpus)
        return Inventory(
            driver_version=self._driver_version,
            gpus=tuple(gpus),
            nvml_version=self._nvml_version,
            nvlink_pairs=pairs,
            p2p_status=p2p,
            links=self._topology.read(gpus, self._discovery.handle_for),
        )

    # -------------------------------------------------------------- reading

    def read(self, uuid: str, fields: Sequence[FieldSpec]) -> ReadResult:
        self._require_started()
        handle = self._discovery.handle_for(uuid)
        is_mig = uuid.startswith("MIG-")
        result = ReadResult()
        plan = self._plan(fields, is_mig)
        mig_unsupported, fv_specs, rate_specs, link_specs, call_specs, gpm_specs = plan
        if mig_unsupported:
            result.unsupported.update(mig_unsupported)
        if fv_specs or rate_specs or link_specs:
            self._field_values.read(uuid, handle, fv_specs, rate_specs, result, link_specs)
        if call_specs:
            self._calls.read(uuid, handle, call_specs, result)
        if gpm_specs:
            self._gpm.read(uuid, handle, gpm_specs, result)
        if len(result.errors) >= 2 and not result.values:  # one field failing says nothing of the device
            raise_whole_device_failure(uuid, result)
        return result

    def _plan(self, fields: Sequence[FieldSpec], is_mig: bool) -> _Plan:
        key = (id(fields), is_mig)
        kept = self._plans.get(key)
        if kept is not None and kept[0] is fields:
            return kept[1]
        mig_unsupported: list[str] = []
        fv_specs: list[FieldSpec] = []
        rate_specs: list[tuple[FieldSpec, int]] = []
        link_specs: list[FieldSpec] = []
        call_specs: list[tuple[FieldSpec, str]] = []
        gpm_specs: list[tuple[FieldSpec, int]] = []
        for spec in fields:
            reader = spec.reader
            if isinstance(reader, NOT_POLLED):
                continue
            if is_mig and spec.scope != "instance":
                mig_unsupported.append(spec.name)
            elif isinstance(reader, FieldValue):
                fv_specs.append(spec)
            elif isinstance(reader, Rate):
                rate_specs.append((spec, reader.field_id))
            elif isinstance(reader, LinkRate):
                link_specs.append(spec)
            elif isinstance(reader, Call):
                call_specs.append((spec, reader.name))
            elif isinstance(reader, Gpm):
                gpm_specs.append((spec, reader.metric_id))
            else:
                assert_never(reader)
        plan: _Plan = (tuple(mig_unsupported), fv_specs, rate_specs, link_specs, call_specs, gpm_specs)
        if isinstance(fields, tuple):  # immutable: safe to reuse while the same object is asked for
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            self._plans[key] = (fields, plan)
        return plan

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        self._require_started()
        return self._processes.read(uuid, self._discovery.handle_for(uuid))

    # --------------------------------------------------------------- events

    def open_events(self, inventory: Inventory) -> NvmlEventSource:
        self._require_started()
        handles: list[tuple[str, Any]] = []
        for gpu in inventory.gpus:
            try:
                handles.append((gpu.uuid, self._discovery.handle_for(gpu.uuid)))
            except (DeviceLostError, DeviceError) as err:
                log.warning("event_registration_failed", uuid=gpu.uuid, error=str(err))
        return NvmlEventSource(self._symbols, handles)
