"""A minimal in-process Backend for unit tests of the collector and renderer.

End-to-end tests use the real pynvml binding against tests/fakenvml instead.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from exporter.backend import DeviceError, DeviceLostError
from exporter.fields import FieldSpec
from exporter.model import DeviceEvent, Gpu, GpuProcess, Inventory, MigDevice, ReadResult


class ScriptedBackend:
    name = "scripted"

    def __init__(self, gpus: int = 2, mig_on: int | None = None) -> None:
        migs: dict[int, tuple[MigDevice, ...]] = {}
        if mig_on is not None:
            parent = f"GPU-{mig_on:08d}"
            migs[mig_on] = (
                MigDevice(f"MIG-{mig_on}-a", parent, mig_on, 1, 0, "3g.40gb", 0),
                MigDevice(f"MIG-{mig_on}-b", parent, mig_on, 5, 0, "1g.10gb", 1),
            )
        self.inventory = Inventory(
            driver_version="570.1",
            gpus=tuple(
                Gpu(
                    i,
                    f"GPU-{i:08d}",
                    f"00000000:{i + 0x18:02X}:00.0",
                    i,
                    "NVIDIA H100 80GB HBM3",
                    mig_enabled=i in migs,
                    migs=migs.get(i, ()),
                )
                for i in range(gpus)
            ),
        )
        self.values: dict[str, dict[str, float]] = {}
        self.unsupported: dict[str, set[str]] = {}
        self.lost: set[str] = set()
        self.hang: dict[str, threading.Event] = {}
        self.asked: list[tuple[str, tuple[str, ...]]] = []
        # --process-metrics: uuid -> its processes; the uuids asked, in order; gates and failures
        self.process_lists: dict[str, tuple[GpuProcess, ...]] = {}
        self.process_asked: list[str] = []
        self.process_hang: dict[str, threading.Event] = {}
        self.process_errors: dict[str, str] = {}  # uuid -> error name raised as DeviceError

    def start(self) -> None: ...
    def shutdown(self) -> None:
        for ev in (*self.hang.values(), *self.process_hang.values()):
            ev.set()

    def discover(self) -> Inventory:
        return self.inventory

    def read(self, uuid: str, fields: Sequence[FieldSpec]) -> ReadResult:
        self.asked.append((uuid, tuple(f.name for f in fields)))
        gate = self.hang.get(uuid)
        if gate is not None:
            gate.wait()
        if uuid in self.lost:
            raise DeviceLostError(uuid)
        res = ReadResult()
        have = self.values.get(uuid, {})
        for f in fields:
            if f.name in self.unsupported.get(uuid, set()):
                res.unsupported.add(f.name)
            elif f.name in have:
                res.values[f.name] = have[f.name]
        return res

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        self.process_asked.append(uuid)
        gate = self.process_hang.get(uuid)
        if gate is not None:
            gate.wait()
        if uuid in self.lost:
            raise DeviceLostError(uuid)
        if uuid in self.process_errors:
            raise DeviceError(f"{uuid}: process query failed", self.process_errors[uuid])
        return self.process_lists.get(uuid, ())

    def open_events(self, inventory: Inventory) -> NoEvents:
        return NoEvents(tuple(g.uuid for g in inventory.gpus))


class NoEvents:
    def __init__(self, registered: tuple[str, ...] = ()) -> None:
        self.registered = registered

    def wait(self, timeout_s: float) -> list[DeviceEvent]:
        threading.Event().wait(timeout_s)
        return []

    def close(self) -> None: ...
