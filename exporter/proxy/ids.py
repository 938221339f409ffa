"""Device IDs an upstream plugin advertises -> the NVML UUIDs whose verdicts decide their health.

NVIDIA's k8s-device-plugin advertises a device by its UUID (`GPU-...`, `MIG-...`: internal/rm/devices.go
BuildDevice sets `ID = uuid`), a replica of a shared GPU as `<uuid>::<n>` (internal/rm/device_map.go,
NewAnnotatedID). Its `--device-id-strategy=index` changes only what the container is given in Allocate
(internal/plugin/server.go uniqueDeviceIDsFromAnnotatedDeviceIDs), never the kubelet's IDs. Index-shaped
IDs (`0`, `0:1` for MIG device 1 of GPU 0, as internal/rm/nvml_devices.go numbers them) are still
resolved through the inventory, for plugins that do advertise them.
"""

from __future__ import annotations

import re

from exporter.model import Inventory

_INDEX = re.compile(r"^(\d+)(?::(\d+))?$")


class DeviceIds:
    """Resolutions built once per inventory; each device ID costs one dict lookup after the first."""

    def __init__(self, inventory: Inventory) -> None:
        self._parents = {m.uuid: m.parent_uuid for g in inventory.gpus for m in g.migs}
        self._by_index: dict[str, tuple[str, ...]] = {}
        for gpu in inventory.gpus:
            self._by_index[str(gpu.index)] = (gpu.uuid,)
            for mig in gpu.migs:
                self._by_index[f"{gpu.index}:{mig.slot}"] = (mig.uuid, gpu.uuid)
        self._cache: dict[str, tuple[str, ...] | None] = {}

    def uuids(self, device_id: str) -> tuple[str, ...] | None:
        """The UUIDs whose verdicts count for `device_id` (a MIG device: its own and its GPU's), or
        None for an ID this node's inventory cannot place (an index of a device not discovered)."""
        try:
            return self._cache[device_id]
        except KeyError:
            pass
        base = device_id.split("::", 1)[0]  # a replica is judged by its GPU
        found: tuple[str, ...] | None
        if base.startswith("MIG-"):
            parent = self._parents.get(base)
            found = (base, parent) if parent else (base,)
        elif base.startswith("GPU-"):
            found = (base,)
        elif _INDEX.match(base):
            found = self._by_index.get(base)
        else:
            found = None
        self._cache[device_id] = found
        return found
