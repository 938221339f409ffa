"""`-d/--devices` selection in dcgm-exporter's syntax: f, g[:ids], i[:ids]."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from exporter.model import Gpu, MigDevice

# The largest id a selector may name: DCGM's limit on instances per node (DCGM_MAX_INSTANCES, 32 GPUs x 8
# instances; GPU indices stay under 32). A range is bounded before it is expanded: `g:0-99999999` must be
# an error, not 2 GB of ids.
MAX_DEVICE_ID = 255


class DeviceSelectorError(ValueError):
    """A selector that does not parse; the message says what is wrong with it (not which flag it came from)."""


@dataclass(frozen=True)
class DeviceSelector:
    """Which devices are collected.

    f: every GPU; a MIG-enabled GPU is collected as its MIG instances (for
       per-instance fields) plus the GPU itself (for GPU-wide fields).
    g: GPUs only (no per-instance series); ids are NVML indices.
    i: MIG GPU instances only; ids are GPU instance ids.
    """

    mode: Literal["f", "g", "i"]
    ids: frozenset[int] | None = None
    spec: str = field(default="", compare=False)  # the text it was parsed from, for messages

    def __str__(self) -> str:
        if self.spec:
            return self.spec
        return self.mode if self.ids is None else f"{self.mode}:{','.join(str(i) for i in sorted(self.ids))}"

    def gpu_selected(self, gpu: Gpu) -> bool:
        if self.mode == "i":
            return False
        return self.ids is None or gpu.index in self.ids

    def mig_selected(self, mig: MigDevice) -> bool:
        if self.mode == "g":
            return False
        if self.mode == "f":
            return True
        return self.ids is None or mig.gpu_instance_id in self.ids


def _parse_ids(text: str) -> frozenset[int]:
    ids: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise DeviceSelectorError(f"{part!r} is not an id or a range like 2-4")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise DeviceSelectorError(f"range {part!r} runs backwards")
        if hi > MAX_DEVICE_ID:
            raise DeviceSelectorError(f"id {hi} in {part.strip()!r} is past the device limit ({MAX_DEVICE_ID})")
        ids.update(range(lo, hi + 1))
    return frozenset(ids)


def parse_device_selector(spec: str) -> DeviceSelector:
    """Raises DeviceSelectorError; exporter.config names the flag."""
    text = spec.strip()
    if text == "f":
        return DeviceSelector("f", spec=spec)
    m = re.fullmatch(r"([gi])(?::(.+))?", text)
    if not m:
        raise DeviceSelectorError("expected f, g[:ids] or i[:ids]")
    ids = _parse_ids(m.group(2)) if m.group(2) else None
    mode: Literal["g", "i"] = "g" if m.group(1) == "g" else "i"
    return DeviceSelector(mode, ids, spec=spec)
