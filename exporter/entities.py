"""Which devices the DCGM families have series for, under each `--mig-layout`.

One answer for the DCGM block (exporter/render.py) and the DCGM_EXP_* families (exporter/dcgmexp.py),
so that a MIG GPU never has its power series on its instances and its XID counts on itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from exporter.labels import MigLayout
from exporter.snapshot import DeviceSample


@dataclass(frozen=True)
class Target:
    """One device with DCGM series."""

    sample: DeviceSample
    all_fields: bool  # every field (a GPU; a GPU instance under the dcgm layout), else instance-scope ones
    parent_uuid: str | None  # where a GPU instance's GPU-wide values come from (dcgm layout)


def dcgm_targets(samples: Iterable[DeviceSample], layout: MigLayout) -> list[Target]:
    """The devices with DCGM series, in snapshot order.

    dcgm layout (dcgm-exporter's `-d f`): a MIG-enabled GPU with GPU instances is watched only as its
    instances, each with every field (GPU-wide values are the parent's), and has no series of its
    own. parent layout: the GPU has its series and its instances carry only the instance-scope
    fields. Either way one series per GPU instance: a second compute instance of the same GPU
    instance would repeat its labels."""
    samples = list(samples)
    with_instances = {s.gpu.uuid for s in samples if s.mig is not None}
    hidden = {s.gpu.uuid for s in samples if s.mig is None and not s.exported}
    dcgm = layout == "dcgm"
    targets: list[Target] = []
    seen_instances: set[tuple[str, int]] = set()
    for s in samples:
        if s.mig is None:
            if not s.exported or (dcgm and s.gpu.uuid in with_instances):
                continue
            targets.append(Target(s, True, None))
            continue
        instance = (s.gpu.uuid, s.mig.gpu_instance_id)
        if instance in seen_instances:
            continue
        seen_instances.add(instance)
        # A GPU read only for its instances (`-d i`) gives them its GPU-wide values under either layout.
        full = dcgm or s.gpu.uuid in hidden
        targets.append(Target(s, full, s.gpu.uuid if full else None))
    return targets
