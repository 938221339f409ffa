"""In-memory stand-ins: a HealthView whose verdicts tests flip, and inventory builders."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

from exporter.health.verdict import HealthState, Verdict
from exporter.model import Gpu, Inventory, MigDevice


class FakeHealth:
    """Implements exporter.health.verdict.HealthView; unknown UUIDs are healthy."""

    def __init__(self, unhealthy: tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, HealthState] = dict.fromkeys(unhealthy, HealthState.UNHEALTHY)
        self._callbacks: list[Callable[[], None]] = []

    def set(self, uuid: str, state: HealthState) -> None:
        with self._lock:
            self._states[uuid] = state
            callbacks = list(self._callbacks)
        for cb in callbacks:
            cb()

    def verdict(self, uuid: str) -> Verdict:
        with self._lock:
            return Verdict(uuid, self._states.get(uuid, HealthState.HEALTHY))

    def verdicts(self) -> Mapping[str, Verdict]:
        with self._lock:
            return {u: Verdict(u, s) for u, s in self._states.items()}

    def subscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)


def uuid(i: int) -> str:
    return f"GPU-{i:08d}-0000-0000-0000-000000000000"


def mig_uuid(i: int, j: int) -> str:
    return f"MIG-{i:08d}-{j:04d}-0000-0000-000000000000"


def gpu(i: int, numa: int | None = None, migs: tuple[str, ...] | None = None) -> Gpu:
    """GPU i; `migs` = profiles of its MIG devices (None = MIG disabled, () = enabled without devices)."""
    mig_devices = tuple(
        MigDevice(mig_uuid(i, j), uuid(i), i, gpu_instance_id=j + 1, compute_instance_id=0, profile=p, slot=j)
        for j, p in enumerate(migs or ())
    )
    return Gpu(
        index=i,
        uuid=uuid(i),
        pci_bus_id=f"00000000:{i + 0x10:02X}:00.0",
        minor=i,
        name="NVIDIA H100 80GB HBM3",
        mig_enabled=migs is not None,
        migs=mig_devices,
        numa_node=numa,
    )


def inventory(gpus: Iterable[Gpu], nvlink: Iterable[tuple[int, int]] = ()) -> Inventory:
    pairs = frozenset((min(uuid(a), uuid(b)), max(uuid(a), uuid(b))) for a, b in nvlink)
    return Inventory(driver_version="570.124.06", gpus=tuple(gpus), nvlink_pairs=pairs)


class MutableInventory:
    """The `inventory` callable the manager takes; tests swap the layout."""

    def __init__(self, inv: Inventory) -> None:
        self.current = inv

    def __call__(self) -> Inventory:
        return self.current
