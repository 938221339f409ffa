"""Label sets in dcgm-exporter's order, escaped once per device, not per scrape."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from exporter.model import Gpu, Inventory, MigDevice

# Own metrics use this prefix everywhere.
PREFIX = "gpuhealth_"


def escape_label_value(value: str) -> str:
    """Escape a label value for text format 0.0.4 (backslash, quote, newline)."""
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_labels(pairs: Iterable[tuple[str, str]]) -> str:
    """`a="1",b="2"` (no braces), values escaped."""
    return ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)


@dataclass
class RenderContext:
    """Per-device label prefixes, built once per inventory change.

    `device_labels(uuid)` gives the escaped labels dcgm-exporter puts on every
    metric of that device: gpu, UUID, pci_bus_id, device, modelName,
    [GPU_I_PROFILE, GPU_I_ID], Hostname. Own metrics reuse it so that joins
    with DCGM series work on the same labels.
    """

    hostname_label: str | None  # "Hostname", "hostname", or None (-n)
    hostname: str
    _by_uuid: dict[str, str] = field(default_factory=dict)

    @property
    def hostname_pair(self) -> str:
        if self.hostname_label is None:
            return ""
        return f'{self.hostname_label}="{escape_label_value(self.hostname)}"'

    def rebuild(self, inventory: Inventory) -> None:
        by_uuid: dict[str, str] = {}
        for gpu in inventory.gpus:
            by_uuid[gpu.uuid] = self._labels(gpu, None)
            for mig in gpu.migs:
                by_uuid[mig.uuid] = self._labels(gpu, mig)
        self._by_uuid = by_uuid

    def _labels(self, gpu: Gpu, mig: MigDevice | None) -> str:
        pairs = [
            ("gpu", str(gpu.index)),
            ("UUID", gpu.uuid),
            ("pci_bus_id", gpu.pci_bus_id),
            ("device", gpu.device),
            ("modelName", gpu.name),
        ]
        if mig is not None:
            pairs += [("GPU_I_PROFILE", mig.profile), ("GPU_I_ID", str(mig.gpu_instance_id))]
        if self.hostname_label is not None:
            pairs.append((self.hostname_label, self.hostname))
        return format_labels(pairs)

    def device_labels(self, uuid: str) -> str:
        """Escaped label pairs for a GPU or MIG UUID; "" for an unknown UUID."""
        return self._by_uuid.get(uuid, "")
