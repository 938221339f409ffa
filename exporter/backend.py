"""The seam between NVML (or the simulator) and everything above it.

`nvml.NvmlBackend` and `simulate.SimulatedBackend` implement these protocols;
the collector, the health engine and the device plugin only see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from exporter.fields import FieldSpec
from exporter.model import DeviceEvent, GpuProcess, Inventory, ReadResult


class BackendError(Exception):
    """A whole-backend failure (library missing, init failed)."""


class DeviceLostError(Exception):
    """The device is gone (NVML GPU_IS_LOST or it vanished): mark it down."""


class DeviceError(Exception):
    """The device failed as a whole this time (not one field); it may recover.

    `error` names the failure (the NVML error name, e.g. "NVMLError_Unknown") so that the
    health engine can tell the same error on every GPU (our fault) from one GPU's fault.
    """

    def __init__(self, message: str, error: str = "") -> None:
        super().__init__(message)
        self.error = error or type(self).__name__


class MonitorError(DeviceError):
    """The read failed for a reason of ours, not the device's: NVML not initialised, the driver
    not loaded or of another version than the library, no permission on the device node. Such a
    failure says nothing about the GPU's health and must never fence it."""


class EventSource(Protocol):
    @property
    def registered(self) -> tuple[str, ...]:
        """UUIDs of the GPUs whose events this set receives (registration may fail for some)."""
        ...

    def wait(self, timeout_s: float) -> list[DeviceEvent]:
        """Block up to timeout_s; return the events that arrived (possibly none).

        Raises DeviceLostError/BackendError when the event set must be rebuilt.
        Only ever called from one thread (NVML event sets are not thread-safe).
        """
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str  # "nvml" or "simulated", for logs and build info

    def start(self) -> None:
        """Initialise (nvmlInit); raises BackendError with a readable reason."""
        ...

    def shutdown(self) -> None: ...

    def discover(self) -> Inventory:
        """Enumerate GPUs and MIG devices. Cheap enough to call every cycle."""
        ...

    def read(self, uuid: str, fields: Sequence[FieldSpec]) -> ReadResult:
        """Read `fields` of one GPU ("GPU-...") or MIG device ("MIG-...").

        May block (a hung driver call); the collector calls it from a
        per-device worker thread with a deadline. Raises DeviceLostError or
        DeviceError for whole-device failures.
        """
        ...

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        """The processes running on one GPU or MIG device (`--process-metrics`), sorted by PID.

        A GPU with MIG enabled lists its instances' processes too, with their instance ids. Called
        like `read` (from a reader thread, within the device's deadline); raises DeviceLostError,
        or DeviceError/MonitorError when the query fails.
        """
        ...

    def open_events(self, inventory: Inventory) -> EventSource:
        """Create an event set for XIDs (and ECC/MIG-change events) on every GPU."""
        ...
