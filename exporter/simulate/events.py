"""The simulated event source: scheduled and injected events, delivered by the backend."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from exporter.model import DeviceEvent

if TYPE_CHECKING:
    from exporter.simulate.backend import SimulatedBackend


class SimulatedEventSource:
    """EventSource over the backend's scheduled and injected events."""

    def __init__(self, backend: SimulatedBackend, gpu_uuids: Iterable[str]) -> None:
        self._backend = backend
        self.registered = tuple(gpu_uuids)
        self._uuids = frozenset(self.registered)
        self.closed = False

    def wait(self, timeout_s: float) -> list[DeviceEvent]:
        return self._backend._wait_events(self, self._uuids, timeout_s)

    def close(self) -> None:
        self._backend._close_events(self)


@dataclass(order=True)
class _Scheduled:
    at: float
    seq: int
    gpu_uuid: str = field(compare=False)
    event_type: int = field(compare=False)  # 0: the GPU is lost (wait raises DeviceLostError)
    xid: int = field(compare=False, default=0)
    gi: int | None = field(compare=False, default=None)


_LOST = 0

