"""Resource managers: which devices are advertised under which resource, and allocation preferences.

Pure functions of (Inventory, DevicePluginConfig, HealthView): no gRPC, no NVML. The plugin server
holds the precomputed `ResourcePlan` so that Allocate / GetPreferredAllocation, which the kubelet
calls without a timeout, only do dictionary look-ups.

MIG strategies follow NVIDIA's k8s-device-plugin:

- `none`: every GPU is advertised whole as `<resource>`, MIG enabled or not.
- `single`: when no GPU has MIG enabled this is `none`. Otherwise every GPU must have MIG enabled with
  at least one MIG device, all of one profile; the MIG devices are advertised as `<resource>`.
  NVIDIA's plugin refuses to start on any other layout; we keep the exporter running, advertise no
  devices for the resource and report why (`ResourcePlan.problems`, logged by the manager).
- `mixed`: GPUs without MIG as `<resource>`; MIG devices as `<domain>/mig-<profile>` per profile. A
  MIG-enabled GPU without MIG devices contributes nothing (reported as a problem).

`replicas > 1` (time-slicing) turns every device into `<id>::<n>`, n = 0..replicas-1, all sharing the
underlying device's health: one fenced GPU makes every replica Unhealthy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from exporter.deviceplugin.config import DevicePluginConfig, mig_resource_name
from exporter.deviceplugin.placement import EMPTY, Topology, Unit, choose_aligned, choose_distributed, choose_mig
from exporter.health.verdict import HealthView
from exporter.model import Gpu, Inventory, MigDevice

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
REPLICA_SEPARATOR = "::"


@dataclass(frozen=True)
class AdvertisedDevice:
    """One kubelet-visible device of a resource."""

    id: str  # what the kubelet sees: GPU-..., MIG-..., or <uuid>::<n>
    uuid: str  # what the container gets (NVIDIA_VISIBLE_DEVICES / CDI name): GPU or MIG UUID
    gpu_uuid: str  # the physical GPU: NVLink pairs, replica grouping
    health_uuids: tuple[str, ...]  # all must be healthy for scheduling (a MIG device also checks its parent)
    numa_node: int | None
    order: int  # position within the resource; deterministic tie-breaks


class ResourceDevices:
    """The devices of one resource, with an ID index built once."""

    __slots__ = ("by_id", "devices", "name", "replicated")

    def __init__(self, name: str, devices: Sequence[AdvertisedDevice], replicated: bool) -> None:
        self.name = name
        self.devices: tuple[AdvertisedDevice, ...] = tuple(devices)
        self.replicated = replicated
        self.by_id: dict[str, AdvertisedDevice] = {d.id: d for d in self.devices}

    def __len__(self) -> int:
        return len(self.devices)


@dataclass(frozen=True)
class ResourcePlan:
    """Everything the plugin advertises for one inventory."""

    resources: Mapping[str, ResourceDevices]
    nvlink_pairs: frozenset[tuple[str, str]]
    problems: tuple[str, ...] = ()  # why devices are withheld (layout invalid for the MIG strategy)
    # Pair scores of the GPUs (NVLink links, PCIe level) for GetPreferredAllocation, built once here.
    topology: Topology = field(default=EMPTY)


@dataclass(frozen=True)
class _Base:
    resource: str
    uuid: str
    gpu: Gpu
    mig: MigDevice | None


def _whole(resource: str, gpus: Iterable[Gpu]) -> list[_Base]:
    return [_Base(resource, g.uuid, g, None) for g in gpus]


def _base_devices(inventory: Inventory, config: DevicePluginConfig) -> tuple[list[_Base], list[str]]:
    name = config.resource_name
    gpus = inventory.gpus
    problems: list[str] = []
    if config.mig_strategy == "none":
        return _whole(name, gpus), problems

    mig_gpus = [g for g in gpus if g.mig_enabled]
    empty = [g for g in mig_gpus if not g.migs]
    for g in empty:
        problems.append(f"GPU {g.index} ({g.uuid}) has MIG enabled but no MIG devices: it is not advertised")

    if config.mig_strategy == "single":
        if not mig_gpus:
            return _whole(name, gpus), problems
        if len(mig_gpus) != len(gpus):
            plain = ", ".join(str(g.index) for g in gpus if not g.mig_enabled)
            problems.append(
                f"mig-strategy single needs MIG enabled on every GPU or on none; GPUs {plain} have MIG disabled"
            )
        profiles = sorted({m.profile for g in mig_gpus for m in g.migs})
        if len(profiles) > 1:
            problems.append(f"mig-strategy single needs one MIG profile on the node, found {', '.join(profiles)}")
        if problems:
            # Same outcome as NVIDIA's plugin refusing to start: nothing schedulable, but our metrics and
            # health keep working and the resource shows capacity 0 instead of vanishing after 5 minutes.
            return [], problems
        return [_Base(name, m.uuid, g, m) for g in mig_gpus for m in g.migs], problems

    # mixed
    out = _whole(name, (g for g in gpus if not g.mig_enabled))
    for g in mig_gpus:
        out.extend(_Base(mig_resource_name(name, m.profile), m.uuid, g, m) for m in g.migs)
    return out, problems


def build_plan(inventory: Inventory, config: DevicePluginConfig) -> ResourcePlan:
    """The advertised devices per resource; `config.resource_name` is always present (maybe empty)."""
    bases, problems = _base_devices(inventory, config)
    grouped: dict[str, list[AdvertisedDevice]] = {config.resource_name: []}
    replicated = config.replicas > 1
    for base in bases:
        devices = grouped.setdefault(base.resource, [])
        health_uuids = (base.uuid,) if base.mig is None else (base.uuid, base.gpu.uuid)
        numa = base.gpu.numa_node if base.gpu.numa_node is not None and base.gpu.numa_node >= 0 else None
        for n in range(config.replicas):
            devices.append(
                AdvertisedDevice(
                    id=f"{base.uuid}{REPLICA_SEPARATOR}{n}" if replicated else base.uuid,
                    uuid=base.uuid,
                    gpu_uuid=base.gpu.uuid,
                    health_uuids=health_uuids,
                    numa_node=numa,
                    order=len(devices),
                )
            )
    resources = {name: ResourceDevices(name, devs, replicated) for name, devs in grouped.items()}
    return ResourcePlan(
        resources=resources,
        nvlink_pairs=inventory.nvlink_pairs,
        problems=tuple(problems),
        topology=Topology.from_inventory(inventory),
    )


def device_health(plan: ResourcePlan, health: HealthView) -> dict[str, dict[str, bool]]:
    """`{resource: {device id: healthy_for_scheduling}}`; each UUID's verdict is asked once.

    A MIG device is healthy only if its own verdict and its parent's are: the engine already propagates
    a fenced parent, but checking both here keeps the plugin safe whatever the engine does.
    A verdict that cannot be obtained counts as unhealthy: we do not hand out GPUs we cannot vouch for.
    """
    cache: dict[str, bool] = {}

    def ok(uuid: str) -> bool:
        if uuid not in cache:
            try:
                cache[uuid] = health.verdict(uuid).healthy_for_scheduling
            except Exception:
                cache[uuid] = False
        return cache[uuid]

    return {
        name: {d.id: all(ok(u) for u in d.health_uuids) for d in res.devices} for name, res in plan.resources.items()
    }


# --- GetPreferredAllocation -------------------------------------------------------------------------


def _dedup(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def preferred_allocation(
    res: ResourceDevices,
    topology: Topology | frozenset[tuple[str, str]],
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
) -> list[str]:
    """Best `size` IDs out of `available`, always containing `must_include` (rules: `placement`).

    Whole GPUs: go-gpuallocator's best-effort choice over whole splits of the available GPUs, with
    NVSwitch links counted and ties going to partly used islands (`placement.choose_aligned`). MIG
    devices: as few parent GPUs as possible, best fit (`placement.choose_mig`). Replicas: NVIDIA's
    distributed policy, ties by topology (`placement.choose_distributed`). `topology` may still be
    a bare set of NVLinked pairs (then one link each, NUMA from the devices).
    """
    if not isinstance(topology, Topology):
        numa = {d.gpu_uuid: d.numa_node for d in res.devices}
        topology = Topology(nvlink_pairs=topology, numa=numa)
    must = _dedup(must_include)
    if size <= len(must):
        return must
    must_set = set(must)
    candidates = [res.by_id[i] for i in _dedup(available) if i in res.by_id and i not in must_set]
    # IDs we do not know cannot be ranked; they only fill up if nothing better is left.
    unknown = [i for i in _dedup(available) if i not in res.by_id and i not in must_set]
    need = size - len(must)
    chosen = [res.by_id[i] for i in must if i in res.by_id]
    if len(candidates) <= need:
        picks = candidates
    elif res.replicated:
        picks = _by_unit(res, topology, candidates, chosen, need, replicas=True)
    elif any(d.uuid != d.gpu_uuid for d in (*candidates, *chosen)):
        picks = _by_unit(res, topology, candidates, chosen, need, replicas=False)
    else:
        picks = _aligned(res, topology, candidates, chosen, need)
    result = must + [d.id for d in picks]
    return result + unknown[: size - len(result)]


def _aligned(
    res: ResourceDevices,
    topology: Topology,
    candidates: list[AdvertisedDevice],
    chosen: list[AdvertisedDevice],
    need: int,
) -> list[AdvertisedDevice]:
    # Whole GPUs without replicas: one device per physical GPU, so GPU UUIDs stand for the devices.
    ordered = sorted(candidates, key=lambda d: d.order)
    by_gpu = {d.gpu_uuid: d for d in ordered}
    taken = {d.gpu_uuid for d in (*ordered, *chosen)}
    in_use = [d.gpu_uuid for d in res.devices if d.gpu_uuid not in taken]
    required = [d.gpu_uuid for d in chosen]
    picked = choose_aligned(topology, list(by_gpu), required, len(required) + need, in_use)
    return [by_gpu[g] for g in picked[len(required) :]]


def _by_unit(
    res: ResourceDevices,
    topology: Topology,
    candidates: list[AdvertisedDevice],
    chosen: list[AdvertisedDevice],
    need: int,
    replicas: bool,
) -> list[AdvertisedDevice]:
    # Replicas group by the underlying device (GPU or MIG: NVIDIA's AnnotatedID.GetID), MIG devices
    # by their parent GPU.
    def unit(d: AdvertisedDevice) -> Unit:
        return Unit(d.id, d.uuid if replicas else d.gpu_uuid, d.gpu_uuid, d.order)

    totals: dict[str, int] = {}
    for d in res.devices:
        g = unit(d).group
        totals[g] = totals.get(g, 0) + 1
    choose = choose_distributed if replicas else choose_mig
    picks = choose(topology, [unit(d) for d in candidates], [unit(d) for d in chosen], need, totals)
    return [res.by_id[u.id] for u in picks]
