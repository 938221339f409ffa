"""The seam between NVML (or the simulator) and everything above it.

`nvml.NvmlBackend` and `simulate.SimulatedBackend` implement these protocols;
the collector, the health engine and the device plugin only see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from exporter.fields import FieldSpec
from exporter.model import DeviceEvent, Inventory, ReadResult


class BackendError(Exception):
    """A whole-backend failure (library missing, init failed)."""


class DeviceLostError(Exception):
    """The device is gone (NVML GPU_IS_LOST or it vanished): mark it down."""


class DeviceError(Exception):
    """The device failed as a whole this time (not one field); it may recover."""


class EventSource(Protocol):
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

    def open_events(self, inventory: Inventory) -> EventSource:
        """Create an event set for XIDs (and ECC/MIG-change events) on every GPU."""
        ...
