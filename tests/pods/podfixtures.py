"""Inventories and kubelet layouts for pod attribution tests (importable by other tests too)."""

from __future__ import annotations

from typing import Any

from exporter.model import Gpu, Inventory, MigDevice
from podresources.client import AllocatableResources, ContainerDevices, ContainerResources, PodResources


def gpu_uuid(i: int) -> str:
    return f"GPU-00000000-0000-0000-0000-{i:012d}"


def mig_uuid(i: int, gi: int) -> str:
    return f"MIG-11111111-0000-{i:04d}-{gi:04d}-000000000000"


def make_inventory(n: int = 4, mig: dict[int, list[tuple[int, str]]] | None = None) -> Inventory:
    """n GPUs; mig maps GPU index -> [(gpu instance id, profile)] for MIG-enabled GPUs.

    Minor numbers deliberately differ from indices (as on real nodes) so GKE ids are resolved by minor.
    """
    gpus = []
    for i in range(n):
        migs = tuple(
            MigDevice(mig_uuid(i, gi), gpu_uuid(i), i, gi, 0, profile, slot)
            for slot, (gi, profile) in enumerate((mig or {}).get(i, []))
        )
        gpus.append(
            Gpu(i, gpu_uuid(i), f"00000000:{0x10 + i:02X}:00.0", i + 10, "NVIDIA H100 80GB HBM3", bool(migs), migs)
        )
    return Inventory("550.54.15", tuple(gpus))


def container(name: str, resource: str | None = None, ids: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "devices": []}
    if resource is not None:
        c["devices"].append({"resource_name": resource, "device_ids": ids or []})
    c.update(extra)
    return c


def pod(name: str, namespace: str, *containers: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "containers": list(containers)}


def big_layout(pods: int = 200, containers: int = 8) -> list[dict[str, object]]:
    """200 pods x 8 containers with many devices each: a List reply well over gRPC's 4 MiB default."""
    nic_ids = [f"0000:{i:02x}:00.{j}-sriov-virtual-function-long-device-identifier" for i in range(8) for j in range(6)]
    out = []
    for p in range(pods):
        cs = []
        for c in range(containers):
            cs.append({
                "name": f"c{c}",
                "devices": [
                    {"resource_name": "example.com/sriov", "device_ids": nic_ids},
                    {"resource_name": "nvidia.com/gpu", "device_ids": [gpu_uuid((p * containers + c) % 8)]},
                ],
                "cpu_ids": list(range(64)),
            })  # fmt: skip
        out.append(pod(f"pod-{p}", f"ns-{p % 7}", *cs))
    return out


def pod_resources(pods: list[dict[str, Any]]) -> list[PodResources]:
    """The layouts above as the client returns them (a List reply built by hand, no kubelet)."""
    return [
        PodResources(
            p["name"],
            p["namespace"],
            tuple(
                ContainerResources(
                    c["name"],
                    tuple(ContainerDevices(d["resource_name"], tuple(d["device_ids"])) for d in c["devices"]),
                    dynamic_resources=tuple(c.get("dynamic_resources", ())),
                )
                for c in p["containers"]
            ),
        )
        for p in pods
    ]


def allocatable(devices: list[dict[str, Any]]) -> AllocatableResources:
    """A GetAllocatableResources reply built by hand, from the fake kubelet's `set_allocatable` shape."""
    return AllocatableResources(tuple(ContainerDevices(d["resource_name"], tuple(d["device_ids"])) for d in devices))
