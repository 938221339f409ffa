"""Label sets in dcgm-exporter's order, escaped once per device, not per scrape."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from exporter.fields import FieldSpec, Label
from exporter.model import Gpu, Inventory, MigDevice

# How a MIG-enabled GPU appears in the DCGM families (`--mig-layout`):
# dcgm: as dcgm-exporter's default (`-d f`) shows it, only as its GPU instances, each with every
#       field (GPU-wide values repeated per instance), no series of the GPU itself;
# parent: the GPU's own series for GPU-wide fields, plus per-instance series for the fields
#       NVML gives per instance (memory, BAR1, GPM activity).
MigLayout = Literal["dcgm", "parent"]

# Own metrics use this prefix everywhere.
PREFIX = "gpuhealth_"


def escape_label_value(value: str) -> str:
    """Escape a label value for text format 0.0.4 (backslash, quote, newline)."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def label_field_values(fields: Iterable[FieldSpec], gpu: Gpu, inventory: Inventory) -> list[tuple[str, str]]:
    """The label-type fields of a counters file as (label name, value) for one GPU (a MIG instance
    takes its GPU's), sorted by name as dcgm-exporter's template writes its label map. A fact the
    GPU cannot give is left out: no label, not an empty one."""
    pairs: list[tuple[str, str]] = []
    for spec in fields:
        if spec.type != "label":
            continue
        source = spec.reader.source if isinstance(spec.reader, Label) else ""
        if source == "driver_version":
            value: str | None = inventory.driver_version
        elif source == "nvml_version":
            value = inventory.nvml_version
        else:
            value = gpu.attribute(source)
        if value:
            pairs.append((spec.metric_name, value))
    return sorted(pairs)


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(pairs: Iterable[tuple[str, str]]) -> str:
    """`a="1",b="2"` (no braces), values escaped."""
    return ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)


@dataclass
class RenderContext:
    """Per-device label prefixes, built once per inventory change.

    Two label sets per device:
    - `dcgm_labels(uuid)`: what dcgm-exporter puts on every DCGM metric: gpu, UUID,
      pci_bus_id, device, modelName, [GPU_I_PROFILE, GPU_I_ID], Hostname.
    - `device_labels(uuid)`: the same facts in Prometheus' snake_case for our own
      `gpuhealth_*` families (gpu, uuid, pci_bus_id, device, model_name,
      [gpu_i_profile, gpu_i_id], hostname), so they pass `promtool check metrics`.
      They join with DCGM series on the shared lower-case labels
      (`on(instance, gpu)` or `on(pci_bus_id)`).
    """

    hostname_label: str | None  # "Hostname", "hostname", or None (-n)
    hostname: str
    _dcgm: dict[str, str] = field(default_factory=dict)
    _own: dict[str, str] = field(default_factory=dict)

    @property
    def hostname_pair(self) -> str:
        """The host label for own families (`hostname="..."`), "" with -n."""
        if self.hostname_label is None:
            return ""
        return f'hostname="{escape_label_value(self.hostname)}"'

    def rebuild(self, inventory: Inventory) -> None:
        dcgm: dict[str, str] = {}
        own: dict[str, str] = {}
        for gpu in inventory.gpus:
            dcgm[gpu.uuid] = self._labels(gpu, None, dcgm=True)
            own[gpu.uuid] = self._labels(gpu, None, dcgm=False)
            for mig in gpu.migs:
                dcgm[mig.uuid] = self._labels(gpu, mig, dcgm=True)
                own[mig.uuid] = self._labels(gpu, mig, dcgm=False)
        self._dcgm, self._own = dcgm, own

    def _labels(self, gpu: Gpu, mig: MigDevice | None, dcgm: bool) -> str:
        names = _DCGM_NAMES if dcgm else _OWN_NAMES
        values = [str(gpu.index), gpu.uuid, gpu.pci_bus_id, gpu.device, gpu.name]
        if mig is not None:
            values += [mig.profile, str(mig.gpu_instance_id)]
        pairs = list(zip(names, values, strict=False))  # names has room for the MIG labels
        if self.hostname_label is not None:
            pairs.append((self.hostname_label if dcgm else "hostname", self.hostname))
        return format_labels(pairs)

    def dcgm_labels(self, uuid: str) -> str:
        """Escaped DCGM label pairs for a GPU or MIG UUID; "" for an unknown UUID."""
        return self._dcgm.get(uuid, "")

    def device_labels(self, uuid: str) -> str:
        """Escaped snake_case label pairs for own families; "" for an unknown UUID."""
        return self._own.get(uuid, "")

    def orphan_labels(self, uuid: str) -> str:
        """Labels for a device no longer in the inventory (e.g. fell off the bus)."""
        pair = f'uuid="{escape_label_value(uuid)}"'
        return f"{pair},{self.hostname_pair}" if self.hostname_pair else pair


_DCGM_NAMES = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID")
_OWN_NAMES = ("gpu", "uuid", "pci_bus_id", "device", "model_name", "gpu_i_profile", "gpu_i_id")
