"""One collection cycle's result: what the renderer and the health engine read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from exporter.fields import FieldSpec
from exporter.model import Gpu, GpuProcess, Inventory, MigDevice


@dataclass(frozen=True)
class DeviceSample:
    """The latest values of one GPU or MIG device.

    When the device's read missed its deadline, `values` are the last good
    ones and `stale` is True; `age_s` says how old they are.
    """

    gpu: Gpu
    mig: MigDevice | None
    values: Mapping[str, float]
    up: bool  # False: lost, or failing as a whole
    stale: bool = False  # True: the read is hung/late; values are the last good ones
    age_s: float = 0.0
    error: str = ""  # why up is False or stale is True (NVML error name, "timeout", "lost")
    # The failure is the monitor's (NVML unusable for a reason of ours), not the device's.
    monitor_fault: bool = False
    # Fields the device answered NOT_SUPPORTED for (not asked again for a while).
    unsupported: frozenset[str] = frozenset()
    # False: read only for its GPU instances' GPU-wide values (`-d i` selects the instances, not the
    # GPU): no series of its own in the DCGM families.
    exported: bool = True
    # The device's own UUID (MIG- for a MIG device); derived, stored because the
    # renderer and health look it up for every sample of every cycle.
    uuid: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "uuid", self.mig.uuid if self.mig is not None else self.gpu.uuid)


@dataclass(frozen=True)
class Snapshot:
    inventory: Inventory
    samples: tuple[DeviceSample, ...]
    taken_at: float  # time.time() at the end of the cycle
    duration_s: float
    # GPUs seen in an earlier cycle that enumeration no longer returns.
    vanished: tuple[str, ...] = field(default=())
    # What the renderer needs besides the samples, so it never reaches into the collector:
    fields: tuple[FieldSpec, ...] = ()  # the counters file's fields this cycle
    nvml_errors: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (field, error) -> count so far
    collections: int = 0  # cycles run, this one included
    # --process-metrics: device UUID (GPU-, or MIG- for a process on a MIG instance) -> its processes, as
    # last read (every --process-interval cycles); empty when the feature is off. A device whose process
    # query failed is absent, not empty.
    processes: Mapping[str, tuple[GpuProcess, ...]] = field(default_factory=dict)
    processes_read_at: float = 0.0  # time.time() of that read; 0 when never

    def sample(self, uuid: str) -> DeviceSample | None:
        for s in self.samples:
            if s.uuid == uuid:
                return s
        return None
