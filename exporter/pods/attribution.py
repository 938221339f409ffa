"""The mapping itself, as a pure function: kubelet replies + device index + settings -> `Attribution`.

`attribute` does no I/O, starts no thread and reads no clock: it resolves every device ID the
kubelet lists (List for the pods, GetAllocatableResources for the health view) against the
inventory's `DeviceIndex` and returns an immutable result that the worker publishes as is
(exporter/pods/mapper.py). Pod metadata (UIDs, labels) and DRA ResourceSlice devices are passed in
as the Kubernetes API caches last saw them.

The one piece of memory across refreshes, under which resources each device was ever seen, goes
in as `device_resources` and comes back updated in the result: a device that turns unhealthy
vanishes from allocatable, and this is how its resource is still known.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from exporter.pods.deviceids import DeviceIndex, DeviceKey
from exporter.pods.kube import DRA_DRIVER, PodMeta
from exporter.pods.podlabels import compile_allowlist, pod_label_pairs
from exporter.pods.settings import PodMappingConfig
from podresources.client import AllocatableResources, PodResources

LabelSet = tuple[tuple[str, str], ...]
# (label uuid, resource, namespace, pod, container); free devices have empty pod fields
AllocationRow = tuple[str, str, str, str, str]
# (label uuid, resource, 1 unhealthy | 0 listed as allocatable)
HealthRow = tuple[str, str, int]
# device -> every resource it was ever seen under (allocatable or in use)
DeviceResources = Mapping[DeviceKey, frozenset[str]]
# (pool, device name) -> ResourceSlice device attributes (exporter.pods.kube.dra_device_index)
DraDevices = Mapping[tuple[str, str], Mapping[str, str]]

DEFAULT_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared")
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"


@dataclass(frozen=True)
class Use:
    """One container's use of one device under one resource."""

    namespace: str
    pod: str
    container: str
    resource: str
    replica: int | None


@dataclass(frozen=True)
class Attribution:
    """What one refresh found: per-device label sets, allocation rows and the kubelet's health view."""

    index: DeviceIndex
    labels: dict[DeviceKey, tuple[LabelSet, ...]]
    allocation: tuple[AllocationRow, ...]
    # empty when GetAllocatableResources has never answered
    kubelet_health: tuple[HealthRow, ...]
    # to pass to the next `attribute` call on the same layout
    device_resources: DeviceResources = field(default_factory=dict)

    def labels_for(self, gpu_uuid: str, gpu_instance_id: int | None) -> tuple[LabelSet, ...]:
        if gpu_instance_id is None and self.index.mig_enabled(gpu_uuid):
            # A MIG-enabled GPU's own series describe the whole GPU, shared by every instance's pods.
            return ()
        return self.labels.get((gpu_uuid, gpu_instance_id), ())


def relevant_resources(config: PodMappingConfig) -> frozenset[str]:
    """The resource names attributed besides every `nvidia.com/mig-*`."""
    return frozenset(DEFAULT_RESOURCES) | frozenset(config.resource_names)


def attribute(
    index: DeviceIndex,
    pods: Iterable[PodResources],
    alloc: AllocatableResources | None,
    config: PodMappingConfig,
    *,
    pod_meta: Mapping[Any, PodMeta] | None = None,
    dra_devices: DraDevices | None = None,
    device_resources: DeviceResources | None = None,
) -> Attribution:
    """Resolve one List reply (and the allocatable list, if any) into an `Attribution`.

    `pod_meta` is keyed by (namespace, pod name) and only read with --kubernetes-enable-pod-uid/-labels;
    `dra_devices` only with --kubernetes-dra. `device_resources` is the previous result's, for the
    same layout (None or empty after a layout change).
    """
    resources = relevant_resources(config)

    def relevant(resource: str) -> bool:
        return resource in resources or resource.startswith(MIG_RESOURCE_PREFIX)

    uses: dict[DeviceKey, list[Use]] = {}
    dra = dra_devices or {}
    for pod in pods:
        for c in pod.containers:
            for dev in c.devices:
                if not relevant(dev.resource_name):
                    continue
                for device_id in dev.device_ids:
                    ref = index.resolve(device_id)
                    if ref is not None:
                        uses.setdefault(ref.key, []).append(
                            Use(pod.namespace, pod.name, c.name, dev.resource_name, ref.replica)
                        )
            for claim in c.dynamic_resources if config.dra else ():
                for cr in claim.claim_resources:
                    if cr.driver_name != DRA_DRIVER:
                        continue
                    key = resolve_dra(index, dra.get((cr.pool_name, cr.device_name)))
                    if key is not None:
                        uses.setdefault(key, []).append(Use(pod.namespace, pod.name, c.name, DRA_DRIVER, None))

    meta = (pod_meta or {}) if config.needs_pod_metadata else {}
    allowlist = compile_allowlist(config.pod_labels_allowlist)
    labels: dict[DeviceKey, tuple[LabelSet, ...]] = {}
    for key, key_uses in uses.items():
        key_uses.sort(key=lambda u: (-1 if u.replica is None else u.replica, u.namespace, u.pod, u.container))
        labels[key] = label_sets(key_uses, config, meta, allowlist)

    allocatable: dict[DeviceKey, set[str]] = {}
    if alloc is not None:
        for dev in alloc.devices:
            if relevant(dev.resource_name):
                for device_id in dev.device_ids:
                    ref = index.resolve(device_id)
                    if ref is not None:
                        allocatable.setdefault(ref.key, set()).add(dev.resource_name)
    seen = dict(device_resources or {})
    health: tuple[HealthRow, ...] = ()
    if alloc is not None:
        seen = remember_resources(seen, uses, allocatable)
        health = kubelet_health(index, seen, allocatable)
    return Attribution(
        index=index,
        labels=labels,
        allocation=allocation_rows(index, uses, allocatable),
        kubelet_health=health,
        device_resources=seen,
    )


def resolve_dra(index: DeviceIndex, attrs: Mapping[str, str] | None) -> DeviceKey | None:
    """A ResourceSlice device -> an NVML device: by `uuid`, else by `parentUUID` + `profile` if unambiguous."""
    if attrs is None:
        return None
    uuid = attrs.get("uuid", "")
    ref = index.resolve(uuid) if uuid else None
    if ref is not None:
        return ref.key
    # A MIG device published without a resolvable MIG UUID: parent GPU + profile, if unambiguous.
    parent = attrs.get("parentUUID")
    profile = attrs.get("profile")
    gpu = index.gpus.get(parent or "")
    if gpu is None or profile is None:
        return None
    matches = [m for m in gpu.migs if m.profile == profile]
    return (gpu.uuid, matches[0].gpu_instance_id) if len(matches) == 1 else None


def label_sets(
    uses: list[Use], config: PodMappingConfig, meta: Mapping[Any, PodMeta], allowlist: re.Pattern[str] | None
) -> tuple[LabelSet, ...]:
    """The series of one device: `uses` sorted by (replica, namespace, pod, container)."""
    if config.shared_mode == "first-pod":
        return (pod_labels(uses[0], None, config, meta, allowlist),)
    shared = any(u.replica is not None for u in uses)
    seen: set[tuple[str, str, str]] = set()
    out: list[LabelSet] = []
    for u in uses:  # sorted by replica: the first seen is the container's lowest replica
        who = (u.namespace, u.pod, u.container)
        if who in seen:
            continue
        seen.add(who)
        vgpu = str(u.replica if u.replica is not None else 0) if shared else None
        out.append(pod_labels(u, vgpu, config, meta, allowlist))
    return tuple(out)


def pod_labels(
    use: Use,
    vgpu: str | None,
    config: PodMappingConfig,
    meta: Mapping[Any, PodMeta],
    allowlist: re.Pattern[str] | None,
) -> LabelSet:
    """container, namespace, pod, [vgpu], [pod_uid], [pod labels sorted by key]."""
    pairs: list[tuple[str, str]] = [("container", use.container), ("namespace", use.namespace), ("pod", use.pod)]
    if vgpu is not None:
        pairs.append(("vgpu", vgpu))
    pm = meta.get((use.namespace, use.pod))
    if config.enable_pod_uid and pm is not None:
        pairs.append(("pod_uid", pm.uid))
    if config.enable_pod_labels and pm is not None:
        pairs.extend(pod_label_pairs(pm.labels, allowlist))
    return tuple(pairs)


def allocation_rows(
    index: DeviceIndex, uses: Mapping[DeviceKey, list[Use]], allocatable: Mapping[DeviceKey, set[str]]
) -> tuple[AllocationRow, ...]:
    """One row per (device, resource, container) in use, and per allocatable (device, resource) nobody uses."""
    rows: set[AllocationRow] = set()
    for key, key_uses in uses.items():
        uuid = index.label_uuid(key)
        if uuid is not None:
            rows.update((uuid, u.resource, u.namespace, u.pod, u.container) for u in key_uses)
    for key, resources in allocatable.items():
        uuid = index.label_uuid(key)
        if uuid is None:
            continue
        used = {u.resource for u in uses.get(key, ())}
        rows.update((uuid, r, "", "", "") for r in resources - used)
    return tuple(sorted(rows))


def remember_resources(
    seen: DeviceResources, uses: Mapping[DeviceKey, list[Use]], allocatable: Mapping[DeviceKey, set[str]]
) -> dict[DeviceKey, frozenset[str]]:
    """`seen` plus the resources each device is allocatable or in use under now (DRA claims aside)."""
    out: dict[DeviceKey, set[str]] = {key: set(rs) for key, rs in seen.items()}
    for key, resources in allocatable.items():
        out.setdefault(key, set()).update(resources)
    for key, key_uses in uses.items():
        for u in key_uses:
            if u.resource != DRA_DRIVER:
                out.setdefault(key, set()).add(u.resource)
    return {key: frozenset(rs) for key, rs in out.items()}


def kubelet_health(
    index: DeviceIndex, seen: DeviceResources, allocatable: Mapping[DeviceKey, set[str]]
) -> tuple[HealthRow, ...]:
    """Per NVML device and resource: 0 if the kubelet lists it as allocatable, 1 if not."""
    devices = index.devices()
    kind_of = dict(devices)
    by_kind: dict[str, set[str]] = {}
    for key, seen_under in seen.items():
        kind = kind_of.get(key)
        if kind is not None:
            by_kind.setdefault(kind, set()).update(seen_under)
    any_mig_resource = any(r.startswith(MIG_RESOURCE_PREFIX) for rs in by_kind.values() for r in rs)
    rows: list[HealthRow] = []
    for key, kind in devices:
        uuid = index.label_uuid(key)
        if uuid is None:
            continue
        resources: Set[str] = seen.get(key) or by_kind.get(kind) or set()
        if not resources and kind.startswith("mig:") and any_mig_resource:
            # Mixed strategy: a profile none of whose devices the kubelet ever listed.
            resources = {MIG_RESOURCE_PREFIX + kind[len("mig:") :]}
        for r in sorted(resources):
            rows.append((uuid, r, 0 if r in allocatable.get(key, ()) else 1))
    return tuple(rows)
