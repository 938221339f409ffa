"""Plain data shared by every layer above the NVML adapter.

Nothing here imports pynvml: the simulated fleet and the real adapter both
produce these objects, so collection, rendering and health run the same code
on real and simulated GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def dcgm_profile_name(slices: int, memory_mib: int) -> str:
    """DCGM's GPU instance profile name: "<slices>g.<ceil(memory MiB / 1024)>gb" (DcgmCacheManager)."""
    return f"{slices}g.{math.ceil(memory_mib / 1024)}gb"


@dataclass(frozen=True)
class MigDevice:
    """One MIG device (a GPU instance + compute instance) of a parent GPU."""

    uuid: str  # "MIG-<uuid>"
    parent_uuid: str  # "GPU-<uuid>"
    parent_index: int
    gpu_instance_id: int
    compute_instance_id: int
    # GPU instance profile as DCGM names it: "<slices>g.<ceil(memory MiB / 1024)>gb" (e.g. "7g.79gb";
    # never the "+me" of the NVML device name), so GPU_I_PROFILE matches dcgm-exporter's.
    profile: str
    slot: int  # index passed to nvmlDeviceGetMigDeviceHandleByIndex


@dataclass(frozen=True)
class Gpu:
    """One physical GPU as discovered through NVML (or the simulator)."""

    index: int
    uuid: str  # "GPU-<uuid>"
    pci_bus_id: str  # "00000000:8D:00.0"
    minor: int  # /dev/nvidia<minor>
    name: str  # model name, e.g. "NVIDIA H100 80GB HBM3"
    mig_enabled: bool = False
    migs: tuple[MigDevice, ...] = ()
    numa_node: int | None = None
    # Static facts read once at discovery for label-type fields (`fields.Label.source` -> value):
    # brand, serial, vbios, inforom_*, name. A fact NVML cannot give is left out.
    attributes: tuple[tuple[str, str], ...] = ()

    @property
    def device(self) -> str:
        """dcgm-exporter's `device` label value: nvidia<DCGM GPU id>, i.e. the NVML index (not the minor)."""
        return f"nvidia{self.index}"

    def attribute(self, source: str) -> str | None:
        return next((value for key, value in self.attributes if key == source), None)


# PCIe topology levels as nvmlDeviceGetTopologyCommonAncestor reports them (nvmlGpuTopologyLevel_t).
TOPOLOGY_INTERNAL = 0  # the same board (e.g. the two GPUs of one card)
TOPOLOGY_SINGLE = 10  # behind one PCIe switch
TOPOLOGY_MULTIPLE = 20  # behind several switches, no host bridge crossed
TOPOLOGY_HOSTBRIDGE = 30  # under the same host bridge
TOPOLOGY_NODE = 40  # the same NUMA node (NVML_TOPOLOGY_CPU in older headers)
TOPOLOGY_SYSTEM = 50  # across the CPU interconnect (SMP link between sockets)


@dataclass(frozen=True)
class GpuLink:
    """How two GPUs reach each other: one unordered pair, UUIDs sorted (`a < b`).

    `nvlinks` counts the active NVLink links between them: direct links to the peer, or through an
    NVSwitch fabric the fewer of the two GPUs' switch links (what one GPU can push to the other).
    `pcie` is the PCIe topology level (`TOPOLOGY_*`), None when NVML could not say.
    """

    a: str
    b: str
    nvlinks: int = 0
    pcie: int | None = None


@dataclass(frozen=True)
class Inventory:
    """Everything discovery found, in NVML index order."""

    driver_version: str
    gpus: tuple[Gpu, ...]
    nvml_version: str = ""
    # Pairs of GPU UUIDs (sorted within the pair) that are linked by NVLink.
    nvlink_pairs: frozenset[tuple[str, str]] = frozenset()
    # (GPU UUID, peer GPU UUID, nvmlGpuP2PStatus_t of NVLink P2P between them: 0 OK, 1 chipset not
    # supported, 2 GPU not supported, 3 topology not supported, 4 disabled by regkey, 5 not supported,
    # 6 unknown) for every ordered pair the backend could ask about; empty when it cannot ask.
    p2p_status: tuple[tuple[str, str, int], ...] = ()
    # Per GPU pair topology (NVLink link count, PCIe level), sorted by (a, b); empty when unknown. Read
    # once at discovery; the device plugin's preferred allocation scores GPU sets with it.
    links: tuple[GpuLink, ...] = ()

    def gpu_by_uuid(self, uuid: str) -> Gpu | None:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        return None

    def mig_by_uuid(self, uuid: str) -> MigDevice | None:
        for gpu in self.gpus:
            for mig in gpu.migs:
                if mig.uuid == uuid:
                    return mig
        return None

    def layout_key(self) -> tuple[object, ...]:
        """Changes whenever GPUs or MIG devices appear, vanish or move."""
        return tuple((g.uuid, g.mig_enabled, tuple(m.uuid for m in g.migs)) for g in self.gpus)


# Event types, as NVML's bit values so the adapter passes them through unchanged.
EVENT_SINGLE_BIT_ECC = 0x1
EVENT_DOUBLE_BIT_ECC = 0x2
EVENT_XID = 0x8
EVENT_MIG_CONFIG_CHANGE = 0x100
EVENT_GPU_LOST = -1  # not an NVML bit: the wait reported GPU_IS_LOST for this GPU


@dataclass(frozen=True)
class DeviceEvent:
    """One NVML event, attributed to a GPU (and to a MIG instance when NVML says so)."""

    gpu_uuid: str
    event_type: int
    xid: int = 0  # eventData for EVENT_XID; 999 = unknown
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    timestamp: float = 0.0  # time.time() when received


PROCESS_KINDS = ("compute", "graphics", "mps")


@dataclass(frozen=True)
class GpuProcess:
    """One process NVML lists on a GPU or MIG device (issue #14: who uses how much of a shared GPU).

    `used_memory_bytes` is None where NVML does not say (NVML_VALUE_NOT_AVAILABLE). The utilisation
    fields are percentages (0-100) from NVML's per-process samples, None when NVML gave no sample for
    the process since the last read."""

    pid: int
    kind: str  # one of PROCESS_KINDS; a process listed as compute and graphics is listed once, as compute
    used_memory_bytes: int | None
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    sm_util: float | None = None
    mem_util: float | None = None
    enc_util: float | None = None
    dec_util: float | None = None


@dataclass
class ReadResult:
    """What one device read produced, values already in the exported unit.

    `values` is keyed by DCGM field name. Fields the device cannot give are in
    `unsupported` (remembered by the caller, never asked again); fields that
    failed this time are in `errors` with the NVML error name.
    """

    values: dict[str, float] = field(default_factory=dict)
    unsupported: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
