"""Our own metric families, each declared once, next to the code that emits it (node_exporter style).

A module that exports a family declares it at its top as a `Family` constant and writes it with
`family.header` (the `# HELP` and `# TYPE` lines, formatted once at import) and `family.sample(...)`
/ `family.scalar(...)` (one sample line: string concatenation only; the renderer runs once per cycle
and is benchmarked). `exporter/ownmetrics.py` collects the declared families for docs/metrics.md and
for the test that every served family is documented with the same HELP and TYPE
(tests/core/test_ownmetrics.py), so each text lives in one place only.

The DCGM families are not declared here: they come from the field catalogue (`exporter/fields.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from exporter.labels import escape_help

# The docs' name for the labels every per-device own series starts with (RenderContext.device_labels):
# gpu, uuid, pci_bus_id, device, model_name, [gpu_i_profile, gpu_i_id], hostname.
DEVICE_LABELS = "device labels"
# The same facts in dcgm-exporter's spelling (RenderContext.dcgm_labels): gpu, UUID, pci_bus_id, device,
# modelName, [GPU_I_PROFILE, GPU_I_ID], Hostname.
DCGM_DEVICE_LABELS = "DCGM device labels"


@dataclass(frozen=True)
class Family:
    """One metric family: what docs/metrics.md says about it, and its header lines.

    `labels_doc` lists the labels in the order they are written ("" if none); `part` is the part
    of the exposition that renders it (the `part` label of gpuhealth_render_success); `note`, for
    docs/metrics.md only, says what the HELP text need not (when the family is served, say)."""

    name: str
    type: Literal["gauge", "counter"]
    help: str
    labels_doc: str
    part: str
    note: str = ""
    header: str = field(init=False, repr=False, compare=False)
    """The `# HELP` and `# TYPE` lines, each ending in a newline."""

    def __post_init__(self) -> None:
        header = f"# HELP {self.name} {escape_help(self.help)}\n# TYPE {self.name} {self.type}\n"
        object.__setattr__(self, "header", header)

    def sample(self, labels: str, value: str | int) -> str:
        """One sample line, newline included: `name{labels} value`.

        `labels` is the text inside the braces, already escaped (RenderContext.device_labels,
        format_labels); `value` an int or a value already formatted (render.format_value)."""
        return f"{self.name}{{{labels}}} {value}\n"

    def samples(self, rows: Iterable[tuple[str, str | int]]) -> str:
        """`sample(labels, value)` for each (labels, value) row, joined: for the per-device loops,
        where a call per sample would cost more than the line (pass a `zip`, not a generator)."""
        head = self.name + "{"
        return "".join([f"{head}{labels}}} {value}\n" for labels, value in rows])

    def scalar(self, value: str | int) -> str:
        """The family's one sample without labels, newline included: `name value`."""
        return f"{self.name} {value}\n"
