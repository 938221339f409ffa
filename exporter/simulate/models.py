"""GPU models the simulator offers (`MODELS`), their MIG profiles, and MIG placement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from exporter.simulate.fieldnames import (
    ALWAYS_FIELDS,
    ECC_FIELDS,
    FAN_SPEED,
    GPM_FIELDS,
    MEMORY_TEMP,
    NVLINK_TOTAL,
    REMAP_FIELDS,
    RETIRED_FIELDS,
    VGPU_LICENSE,
)


@dataclass(frozen=True)
class MigProfile:
    name: str  # "3g.40gb"
    compute_slices: int
    memory_slices: int  # of 8
    memory_mib: int
    placements: tuple[tuple[int, int], ...]  # (start memory slice, GPU instance id NVML assigns there)


def _mig_profiles(mem: dict[str, int], names: dict[str, str]) -> dict[str, MigProfile]:
    """The 7-compute / 8-memory-slice layout shared by A100 and H100 (GI ids = NVML swizzle ids)."""
    shapes: dict[str, tuple[int, int, tuple[tuple[int, int], ...]]] = {
        "1g": (1, 1, tuple((s, 7 + s) for s in range(7))),
        "1g+": (1, 2, ((0, 3), (2, 4), (4, 5), (6, 6))),
        "2g": (2, 2, ((0, 3), (2, 4), (4, 5))),
        "3g": (3, 4, ((0, 1), (4, 2))),
        "4g": (4, 4, ((0, 1),)),
        "7g": (7, 8, ((0, 0),)),
    }
    out = {}
    for shape, name in names.items():
        c, m, placements = shapes[shape]
        out[name] = MigProfile(name, c, m, mem[name], placements)
    return out


_H100_MIG = _mig_profiles(
    {"1g.10gb": 9984, "1g.20gb": 20096, "2g.20gb": 20096, "3g.40gb": 40448, "4g.40gb": 40448, "7g.80gb": 81152},
    {"1g": "1g.10gb", "1g+": "1g.20gb", "2g": "2g.20gb", "3g": "3g.40gb", "4g": "4g.40gb", "7g": "7g.80gb"},
)
_A100_MIG = _mig_profiles(
    {"1g.10gb": 9728, "1g.20gb": 19968, "2g.20gb": 19968, "3g.40gb": 40192, "4g.40gb": 40192, "7g.80gb": 80896},
    {"1g": "1g.10gb", "1g+": "1g.20gb", "2g": "2g.20gb", "3g": "3g.40gb", "4g": "4g.40gb", "7g": "7g.80gb"},
)


@dataclass(frozen=True)
class GpuModel:
    key: str
    name: str  # as nvmlDeviceGetName returns it
    fb_total_mib: int
    fb_reserved_mib: int
    power_limit_w: float
    idle_power_w: float
    sm_clock_max: int
    sm_clock_idle: int
    mem_clock: int
    mem_clock_idle: int
    idle_temp_c: float
    load_temp_rise_c: float  # GPU temperature rise at the power limit
    memory_temp_offset_c: float | None  # None: no HBM sensor (NOT_SUPPORTED)
    fan: bool  # False: passive (NOT_SUPPORTED)
    nvlink: str  # "all" (NVSwitch), "cube" (DGX-1 hybrid cube mesh), "none"
    nvlink_kib_s: float  # all links, TX + RX, at full tilt
    pcie_bytes_s: float
    ecc: bool
    row_remap: bool
    retired_pages: bool
    video: bool  # encoder/decoder used by the "infer" pattern
    vgpu_license: bool
    idle_pstate: int
    mig: dict[str, MigProfile] = field(default_factory=dict)
    gpm: bool = False  # Hopper+: NVML's GPM API gives the DCP activity fields
    # NVLink links per GPU (to NVSwitches for "all", to peers for "cube"); 0 without NVLink.
    nvlink_links: int = 0
    pcie_per_switch: int = 2  # GPUs behind one PCIe switch: 2 on SXM baseboards, 4 on PCIe card servers

    def supported(self) -> frozenset[str]:
        s = set(ALWAYS_FIELDS)
        if self.memory_temp_offset_c is not None:
            s.add(MEMORY_TEMP)
        if self.fan:
            s.add(FAN_SPEED)
        if self.nvlink != "none":
            s.add(NVLINK_TOTAL)
        if self.ecc:
            s |= ECC_FIELDS
        if self.row_remap:
            s |= REMAP_FIELDS
        if self.retired_pages:
            s |= RETIRED_FIELDS
        if self.vgpu_license:
            s.add(VGPU_LICENSE)
        if self.gpm:
            s |= GPM_FIELDS
        return frozenset(s)


MODELS: dict[str, GpuModel] = {
    m.key: m
    for m in (
        GpuModel(
            "h100",
            "NVIDIA H100 80GB HBM3",
            81559,
            532,
            700.0,
            70.0,
            1980,
            345,
            2619,
            2619,
            30.0,
            40.0,
            6.0,
            False,
            "all",
            8.8e8,
            6.4e10,
            True,
            True,
            False,
            False,
            True,
            0,
            _H100_MIG,
            gpm=True,
            nvlink_links=18,  # NVLink 4, through four NVSwitches (HGX H100)
        ),
        GpuModel(
            "a100",
            "NVIDIA A100-SXM4-80GB",
            81920,
            512,
            400.0,
            55.0,
            1410,
            210,
            1593,
            1593,
            29.0,
            36.0,
            5.0,
            False,
            "all",
            5.9e8,
            3.2e10,
            True,
            True,
            False,
            False,
            True,
            0,
            _A100_MIG,
            nvlink_links=12,  # NVLink 3, through six NVSwitches (HGX A100)
        ),
        GpuModel(
            "v100",
            "Tesla V100-SXM2-32GB",
            32768,
            305,
            300.0,
            40.0,
            1530,
            135,
            877,
            877,
            30.0,
            35.0,
            3.0,
            False,
            "cube",
            2.9e8,
            1.6e10,
            True,
            False,
            True,
            False,
            True,
            0,
            nvlink_links=6,  # NVLink 2: DGX-1 hybrid cube mesh, 1 or 2 links per peer
        ),
        GpuModel(
            "l4",
            "NVIDIA L4",
            23034,
            434,
            72.0,
            16.0,
            2040,
            210,
            6251,
            405,
            32.0,
            40.0,
            None,
            False,
            "none",
            0.0,
            3.2e10,
            True,
            True,
            False,
            True,
            True,
            8,
            pcie_per_switch=4,  # PCIe card servers: four GPUs behind each switch
        ),
        GpuModel(
            "rtx4090",
            "NVIDIA GeForce RTX 4090",
            24564,
            400,
            450.0,
            20.0,
            2520,
            210,
            10501,
            405,
            35.0,
            40.0,
            None,
            True,
            "none",
            0.0,
            3.2e10,
            False,
            False,
            False,
            True,
            False,
            8,
            pcie_per_switch=4,  # PCIe card servers: four GPUs behind each switch
        ),
    )
}


def place_migs(model: GpuModel, names: Sequence[str], item: str) -> list[tuple[str, int]]:
    """Place MIG profiles like NVML does: larger first; 3g and up from the top, smaller from the bottom.

    Returns (profile, GPU instance id) pairs ordered by GPU instance id.
    """
    used = [False] * 8
    out: list[tuple[str, int]] = []
    for name in sorted(names, key=lambda n: -model.mig[n].memory_slices * 8 - model.mig[n].compute_slices):
        prof = model.mig[name]
        candidates = prof.placements if prof.compute_slices < 3 else tuple(reversed(prof.placements))
        for start, gi in candidates:
            if not any(used[start : start + prof.memory_slices]):
                for i in range(start, start + prof.memory_slices):
                    used[i] = True
                out.append((name, gi))
                break
        else:
            raise ValueError(f"mig item {item!r}: {name} does not fit next to the other instances")
    out.sort(key=lambda p: p[1])
    return out
