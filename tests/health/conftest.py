"""Fixtures for the health engine tests: a small fleet, snapshots, an engine on a fake clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from exporter.health.engine import HealthEngine
from exporter.health.policy import Policy
from exporter.model import EVENT_XID, DeviceEvent, Gpu, Inventory, MigDevice
from exporter.snapshot import DeviceSample, Snapshot

GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
GPU1 = "GPU-11111111-1111-1111-1111-111111111111"
MIG_A = "MIG-aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"  # GPU0, GI 1
MIG_B = "MIG-bbbbbbbb-bbbb-bbbb-bbbb-bbbbbbbbbbbb"  # GPU0, GI 2


def inventory(mig: bool = False) -> Inventory:
    migs = (
        (
            MigDevice(MIG_A, GPU0, 0, 1, 0, "3g.40gb", 0),
            MigDevice(MIG_B, GPU0, 0, 2, 0, "3g.40gb", 1),
        )
        if mig
        else ()
    )
    return Inventory(
        "570.86.15",
        (
            Gpu(0, GPU0, "00000000:8D:00.0", 0, "NVIDIA H100 80GB HBM3", mig, migs),
            Gpu(1, GPU1, "00000000:9D:00.0", 1, "NVIDIA H100 80GB HBM3"),
        ),
    )


def xid(code: int, gpu: str = GPU0, gi: int | None = None, t: float = 0.0) -> DeviceEvent:
    """An XID event on `gpu` (on GPU instance `gi` of it when given) at time `t`."""
    return DeviceEvent(gpu, EVENT_XID, code, gi, 0 if gi is not None else None, t)


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def snapshot(
    inv: Inventory,
    at: float,
    values: Mapping[str, Mapping[str, float]] | None = None,
    *,
    down: Mapping[str, str] | None = None,
    stale: Mapping[str, float] | None = None,
    vanished: tuple[str, ...] = (),
) -> Snapshot:
    """One cycle: `values` per UUID, `down` uuid -> error, `stale` uuid -> age."""
    values = values or {}
    down = down or {}
    stale = stale or {}
    samples = []
    for gpu in inv.gpus:
        for uuid, mig in [(gpu.uuid, None), *((m.uuid, m) for m in gpu.migs)]:
            samples.append(
                DeviceSample(
                    gpu,
                    mig,
                    dict(values.get(uuid, {})),
                    up=uuid not in down,
                    stale=uuid in stale,
                    age_s=stale.get(uuid, 0.0),
                    error=down.get(uuid, "timeout" if uuid in stale else ""),
                )
            )
    return Snapshot(inv, tuple(samples), at, 0.01, vanished)


EngineFactory = Callable[..., HealthEngine]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_engine(tmp_path: Path, clock: Clock) -> Iterator[EngineFactory]:
    engines: list[HealthEngine] = []

    def factory(policy: Policy | None = None, state_dir: Path | None = None, **kw: object) -> HealthEngine:
        kw.setdefault("control_socket", False)
        eng = HealthEngine(policy or Policy.build(), state_dir or tmp_path / "state", clock, **kw)  # type: ignore[arg-type]
        eng.start()
        engines.append(eng)
        return eng

    yield factory
    for eng in engines:
        eng.stop()
