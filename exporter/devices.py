"""`-d/--devices` selection in dcgm-exporter's syntax: f, g[:ids], i[:ids]."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from exporter.model import Gpu, MigDevice


class DeviceSelectorError(ValueError):
    pass


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


def _parse_ids(text: str, spec: str) -> frozenset[int]:
    ids: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise DeviceSelectorError(f"--devices {spec!r}: {part!r} is not an id or a range like 2-4")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise DeviceSelectorError(f"--devices {spec!r}: range {part!r} runs backwards")
        ids.update(range(lo, hi + 1))
    return frozenset(ids)


def parse_device_selector(spec: str) -> DeviceSelector:
    from exporter.config import ConfigError

    text = spec.strip()
    if text == "f":
        return DeviceSelector("f")
    m = re.fullmatch(r"([gi])(?::(.+))?", text)
    if not m:
        raise ConfigError(f"--devices {spec!r}: expected f, g[:ids] or i[:ids]")
    try:
        ids = _parse_ids(m.group(2), spec) if m.group(2) else None
    except DeviceSelectorError as exc:
        raise ConfigError(str(exc)) from None
    mode: Literal["g", "i"] = "g" if m.group(1) == "g" else "i"
    return DeviceSelector(mode, ids)
