"""Kubelet device IDs -> NVML devices of this node.

Device IDs are whatever the device plugin advertised (kubelet-apis.md §1):
  GPU-<uuid>                     a whole GPU
  MIG-<uuid>                     a MIG device (R470+), resolved through the Inventory
  MIG-GPU-<uuid>/<gi>/<ci>       a MIG device as R450/R460 drivers named it
  <any of the above>::<n>        time-slicing / MPS replica n
  nvidia<N>[/gi<M>][/vgpu<K>]    GKE's device plugin: N is the minor number, K a shared replica

Both UUID and GKE forms are recognised whatever --kubernetes-gpu-id-type says: the shapes cannot
be confused, and "wrong id type => no pod labels" is a classic dcgm-exporter support question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.model import Gpu, Inventory, MigDevice

_GKE = re.compile(r"^nvidia(\d+)(?:/gi(\d+))?(?:/vgpu(\d+))?$")

# (gpu uuid, GPU instance id or None for a whole GPU): the key attribution is stored under.
DeviceKey = tuple[str, int | None]


@dataclass(frozen=True)
class DeviceRef:
    gpu_uuid: str
    gpu_instance_id: int | None
    replica: int | None

    @property
    def key(self) -> DeviceKey:
        return (self.gpu_uuid, self.gpu_instance_id)


class DeviceIndex:
    """Lookups built once per inventory layout; every resolution is cached, misses included.

    dcgm-exporter burns CPU on MIG nodes by asking NVML per device per scrape; here a MIG UUID
    costs one dict lookup per layout, and an unknown ID (a GPU hidden by -d, a stale pod) costs
    one lookup too.
    """

    def __init__(self, inventory: Inventory) -> None:
        self.layout = inventory.layout_key()
        self.gpus: dict[str, Gpu] = {g.uuid: g for g in inventory.gpus}
        self._by_minor: dict[int, Gpu] = {g.minor: g for g in inventory.gpus}
        self._migs: dict[str, MigDevice] = {m.uuid: m for g in inventory.gpus for m in g.migs}
        self._by_gi: dict[DeviceKey, MigDevice] = {
            (m.parent_uuid, m.gpu_instance_id): m for g in inventory.gpus for m in g.migs
        }
        self._cache: dict[str, DeviceRef | None] = {}

    def resolve(self, device_id: str) -> DeviceRef | None:
        try:
            return self._cache[device_id]
        except KeyError:
            ref = self._resolve(device_id)
            self._cache[device_id] = ref
            return ref

    def label_uuid(self, key: DeviceKey) -> str | None:
        """The UUID whose device labels a series for this key carries (the MIG UUID for a MIG device)."""
        gpu_uuid, gi = key
        if gi is None:
            return gpu_uuid if gpu_uuid in self.gpus else None
        mig = self._by_gi.get(key)
        return mig.uuid if mig is not None else None

    def mig_enabled(self, gpu_uuid: str) -> bool:
        gpu = self.gpus.get(gpu_uuid)
        return gpu is not None and gpu.mig_enabled

    def devices(self) -> list[tuple[DeviceKey, str]]:
        """Allocatable-shaped NVML devices: whole non-MIG GPUs and MIG devices, with their kind.

        Kind is "gpu" or "mig:<profile>"; it is how a device never seen by the kubelet is matched
        to the resource its siblings are advertised under.
        """
        out: list[tuple[DeviceKey, str]] = []
        for gpu in self.gpus.values():
            if gpu.mig_enabled:
                out.extend(((gpu.uuid, m.gpu_instance_id), f"mig:{m.profile}") for m in gpu.migs)
            else:
                out.append(((gpu.uuid, None), "gpu"))
        return out

    def _resolve(self, device_id: str) -> DeviceRef | None:
        base, sep, suffix = device_id.rpartition("::")
        replica: int | None = None
        if sep:
            if not suffix.isdigit():
                return None
            replica = int(suffix)
        else:
            base = device_id
        if base.startswith("GPU-"):
            return DeviceRef(base, None, replica) if base in self.gpus else None
        if base.startswith("MIG-GPU-"):
            parts = base[len("MIG-") :].split("/")
            if len(parts) != 3 or not parts[1].isdigit():
                return None
            key = (parts[0], int(parts[1]))
            return DeviceRef(key[0], key[1], replica) if key in self._by_gi else None
        if base.startswith("MIG-"):
            mig = self._migs.get(base)
            return DeviceRef(mig.parent_uuid, mig.gpu_instance_id, replica) if mig is not None else None
        match = _GKE.match(base)
        if match is None:
            return None
        gpu = self._by_minor.get(int(match.group(1)))
        if gpu is None:
            return None
        if match.group(3) is not None:
            replica = int(match.group(3))
        if match.group(2) is None:
            return DeviceRef(gpu.uuid, None, replica)
        gi = int(match.group(2))
        return DeviceRef(gpu.uuid, gi, replica) if (gpu.uuid, gi) in self._by_gi else None
