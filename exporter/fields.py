"""The field catalogue: every DCGM field we can export, and how it is read.

One table is the source of truth for the NVML adapter (how to read), the
simulator (what to produce), the renderer (type, help) and the generated
metrics reference in docs/metrics.md.

Reading strategies (`FieldSpec.reader`):
- "fv": batched `nvmlDeviceGetFieldValues` with the NVML_FI ids in `fi`
  (several ids are summed, e.g. NVLink TX + RX).
- "call:<what>": a dedicated NVML call; the adapter maps <what> to a function.
- "rate:<fi>": a per-second rate derived from a cumulative NVML byte counter
  (avoids nvmlDeviceGetPcieThroughput, which blocks ~20 ms per call).
- "event": filled from NVML events (XIDs), never polled.
- "label": a label-type field (driver version).
- "gpm:<id>": a DCGM profiling (DCP) field computed by NVML's GPM API (Hopper and
  newer) as metric NVML_GPM_METRIC_<id> between the previous read's sample and this
  one's (so the first read gives no value). GPM reports percent (scale 0.01 gives
  DCGM's 0-1 ratio) or MiB/s (scale 2**20 gives bytes/s). Activity metrics have
  scope "instance": NVML samples them per MIG GPU instance (nvmlGpmMigSampleGet on
  the parent with the GPU instance id); NVLink rates are GPU-wide. GPUs without GPM
  (pre-Hopper, old drivers) report them unsupported.
- "dcp": a DCGM profiling field NVML cannot give; skipped with one warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MetricType = Literal["gauge", "counter", "label"]
Scope = Literal["gpu", "instance"]

# NVML's scopeId for "all NVLink links".
ALL_LINKS = 0xFFFFFFFF


@dataclass(frozen=True)
class FieldSpec:
    name: str  # DCGM field name, which is also the metric name
    dcgm_id: int | None
    type: MetricType  # dcgm-exporter's default Prometheus type
    help: str  # dcgm-exporter's help text (unit included)
    reader: str
    fi: tuple[int, ...] = ()  # NVML_FI_* ids for reader "fv"
    scale: float = 1.0  # multiply the NVML value by this to get the exported unit
    # "instance": also readable per MIG device (memory, BAR1); "gpu": GPU-wide only.
    scope: Scope = "gpu"
    nvml_unit: str = ""  # what NVML returns, for the reference docs


def _f(
    name: str,
    dcgm_id: int | None,
    type_: MetricType,
    help_: str,
    reader: str,
    fi: tuple[int, ...] = (),
    scale: float = 1.0,
    scope: Scope = "gpu",
    nvml_unit: str = "",
) -> FieldSpec:
    return FieldSpec(name, dcgm_id, type_, help_, reader, fi, scale, scope, nvml_unit)


MIB = 1.0 / (1 << 20)
PERCENT = 0.01  # GPM percent -> DCGM ratio; to_exported divides by 100 so 35 % is exactly 0.35
MIB_PER_S = float(1 << 20)  # GPM MiB/s -> bytes/s

CATALOGUE: tuple[FieldSpec, ...] = (
    # --- dcgm-exporter's default set (non-DCP) ---
    _f("DCGM_FI_DEV_SM_CLOCK", 100, "gauge", "SM clock frequency (in MHz).", "call:sm_clock", nvml_unit="MHz"),
    _f("DCGM_FI_DEV_MEM_CLOCK", 101, "gauge", "Memory clock frequency (in MHz).", "call:mem_clock", nvml_unit="MHz"),
    _f("DCGM_FI_DEV_MEMORY_TEMP", 140, "gauge", "Memory temperature (in C).", "fv", (82,), nvml_unit="C"),
    _f("DCGM_FI_DEV_GPU_TEMP", 150, "gauge", "GPU temperature (in C).", "call:gpu_temp", nvml_unit="C"),
    _f("DCGM_FI_DEV_POWER_USAGE", 155, "gauge", "Power draw (in W).", "call:power_usage", scale=0.001, nvml_unit="mW"),
    _f(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 156, "counter",
        "Total energy consumption since boot (in mJ).", "fv", (83,), nvml_unit="mJ",
    ),
    _f("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", 202, "counter", "Total number of PCIe retries.", "fv", (94,)),
    _f("DCGM_FI_DEV_GPU_UTIL", 203, "gauge", "GPU utilization (in %).", "call:gpu_util", nvml_unit="%"),
    _f("DCGM_FI_DEV_MEM_COPY_UTIL", 204, "gauge", "Memory utilization (in %).", "call:mem_util", nvml_unit="%"),
    _f("DCGM_FI_DEV_ENC_UTIL", 206, "gauge", "Encoder utilization (in %).", "call:enc_util", nvml_unit="%"),
    _f("DCGM_FI_DEV_DEC_UTIL", 207, "gauge", "Decoder utilization (in %).", "call:dec_util", nvml_unit="%"),
    _f("DCGM_FI_DEV_XID_ERRORS", 230, "gauge", "Value of the last XID error encountered.", "event"),
    _f(
        "DCGM_FI_DEV_FB_FREE", 251, "gauge", "Framebuffer memory free (in MiB).", "call:fb_free",
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_FB_USED", 252, "gauge", "Framebuffer memory used (in MiB).", "call:fb_used",
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_FB_RESERVED", 253, "gauge", "Framebuffer memory reserved (in MiB).", "call:fb_reserved",
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", 449, "counter",
        "Total number of NVLink bandwidth counters for all lanes.", "fv", (138, 139), nvml_unit="KiB",
    ),
    _f("DCGM_FI_DEV_VGPU_LICENSE_STATUS", 526, "gauge", "vGPU License status", "call:vgpu_license"),
    _f(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", 393, "counter",
        "Number of remapped rows for uncorrectable errors", "fv", (143,),
    ),
    _f(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", 394, "counter",
        "Number of remapped rows for correctable errors", "fv", (142,),
    ),
    _f("DCGM_FI_DEV_ROW_REMAP_FAILURE", 395, "gauge", "Whether remapping of rows has failed", "fv", (145,)),
    _f("DCGM_FI_DRIVER_VERSION", None, "label", "Driver Version", "label"),
    # --- health fields (commented out upstream; on by default here) ---
    _f("DCGM_FI_DEV_ROW_REMAP_PENDING", 396, "gauge", "Whether remapping of rows is pending", "fv", (144,)),
    _f("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", 310, "counter", "Total number of single-bit volatile ECC errors.", "fv", (3,)),
    _f("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 311, "counter", "Total number of double-bit volatile ECC errors.", "fv", (4,)),
    _f(
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", 312, "counter",
        "Total number of single-bit persistent ECC errors.", "fv", (5,),
    ),
    _f(
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", 313, "counter",
        "Total number of double-bit persistent ECC errors.", "fv", (6,),
    ),
    _f(
        "DCGM_FI_DEV_RETIRED_SBE", 390, "counter",
        "Total number of retired pages due to single-bit errors.", "fv", (29,),
    ),
    _f(
        "DCGM_FI_DEV_RETIRED_DBE", 391, "counter",
        "Total number of retired pages due to double-bit errors.", "fv", (30,),
    ),
    _f("DCGM_FI_DEV_RETIRED_PENDING", 392, "counter", "Total number of pages pending retirement.", "fv", (31,)),
    _f(
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS", 112, "gauge",
        "Current clock event reasons (bitmask of DCGM_CLOCKS_EVENT_REASON_*).", "call:clocks_event_reasons",
    ),
    _f(
        "DCGM_FI_DEV_POWER_VIOLATION", 240, "counter",
        "Throttling duration due to power constraints (in us).", "fv", (74,), scale=0.001, nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_THERMAL_VIOLATION", 241, "counter",
        "Throttling duration due to thermal constraints (in us).", "fv", (75,), scale=0.001, nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_SYNC_BOOST_VIOLATION", 242, "counter",
        "Throttling duration due to sync-boost constraints (in us).", "fv", (76,), scale=0.001, nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_BOARD_LIMIT_VIOLATION", 243, "counter",
        "Throttling duration due to board limit constraints (in us).", "fv", (77,), scale=0.001, nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_LOW_UTIL_VIOLATION", 244, "counter",
        "Throttling duration due to low utilization (in us).", "fv", (78,), scale=0.001, nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_RELIABILITY_VIOLATION", 245, "counter",
        "Throttling duration due to reliability constraints (in us).", "fv", (79,), scale=0.001, nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_POWER_MGMT_LIMIT", 160, "gauge", "Power management limit (in W).", "call:power_limit",
        scale=0.001, nvml_unit="mW",
    ),
    _f("DCGM_FI_DEV_PSTATE", 190, "gauge", "Performance state (P-State) 0-15. 0=highest", "call:pstate"),
    _f("DCGM_FI_DEV_FAN_SPEED", 191, "gauge", "Fan speed (in 0-100%).", "call:fan_speed", nvml_unit="%"),
    _f(
        "DCGM_FI_DEV_BAR1_USED", 91, "gauge", "Used BAR1 memory (in MiB).", "call:bar1_used",
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_FB_TOTAL", 250, "gauge", "Framebuffer memory total (in MiB).", "call:fb_total",
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT", 200, "gauge",
        "PCIe transmit throughput (in KB/s), from the PCIe byte counter.", "rate:197", scale=1.0 / 1024,
        nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT", 201, "gauge",
        "PCIe receive throughput (in KB/s), from the PCIe byte counter.", "rate:198", scale=1.0 / 1024,
        nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", None, "gauge",
        "Recovery action the driver asks for (0 none, 1 GPU reset, 2 node reboot, 3 drain P2P, "
        "4 drain and reset, 5 recover IMEX domain, 6 bus reset, 7 system reboot).",
        "fv", (230,),
    ),
    # --- DCGM profiling (DCP) fields ---
    _f(
        "DCGM_FI_PROF_PCIE_TX_BYTES", 1009, "gauge",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.", "rate:197", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_PROF_PCIE_RX_BYTES", 1010, "gauge",
        "The rate of data received over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.", "rate:198", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE", 1001, "gauge", "Ratio of time the graphics engine is active.", "gpm:1",
        scale=PERCENT, scope="instance", nvml_unit="% (GPM GRAPHICS_UTIL)",
    ),
    _f(
        "DCGM_FI_PROF_SM_ACTIVE", 1002, "gauge", "The ratio of cycles an SM has at least 1 warp assigned.", "gpm:2",
        scale=PERCENT, scope="instance", nvml_unit="% (GPM SM_UTIL)",
    ),
    _f(
        "DCGM_FI_PROF_SM_OCCUPANCY", 1003, "gauge", "The ratio of number of warps resident on an SM.", "gpm:3",
        scale=PERCENT, scope="instance", nvml_unit="% (GPM SM_OCCUPANCY)",
    ),
    _f(
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 1004, "gauge",
        "Ratio of cycles the tensor (HMMA) pipe is active.", "gpm:5",
        scale=PERCENT, scope="instance", nvml_unit="% (GPM ANY_TENSOR_UTIL)",
    ),
    _f(
        "DCGM_FI_PROF_DRAM_ACTIVE", 1005, "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.", "gpm:10",
        scale=PERCENT, scope="instance", nvml_unit="% (GPM DRAM_BW_UTIL)",
    ),
    _f(
        "DCGM_FI_PROF_PIPE_FP64_ACTIVE", 1006, "gauge", "Ratio of cycles the fp64 pipes are active.", "gpm:11",
        scale=PERCENT, scope="instance", nvml_unit="% (GPM FP64_UTIL)",
    ),
    _f(
        "DCGM_FI_PROF_PIPE_FP32_ACTIVE", 1007, "gauge", "Ratio of cycles the fp32 pipes are active.", "gpm:12",
        scale=PERCENT, scope="instance", nvml_unit="% (GPM FP32_UTIL)",
    ),
    _f(
        "DCGM_FI_PROF_PIPE_FP16_ACTIVE", 1008, "gauge", "Ratio of cycles the fp16 pipes are active.", "gpm:13",
        scale=PERCENT, scope="instance", nvml_unit="% (GPM FP16_UTIL)",
    ),
    _f(
        "DCGM_FI_PROF_NVLINK_TX_BYTES", 1011, "gauge", "The rate of data transmitted over NVLink (bytes/s).",
        "gpm:61", scale=MIB_PER_S, nvml_unit="MiB/s (GPM NVLINK_TOTAL_TX_PER_SEC)",
    ),
    _f(
        "DCGM_FI_PROF_NVLINK_RX_BYTES", 1012, "gauge", "The rate of data received over NVLink (bytes/s).",
        "gpm:60", scale=MIB_PER_S, nvml_unit="MiB/s (GPM NVLINK_TOTAL_RX_PER_SEC)",
    ),
)

BY_NAME: dict[str, FieldSpec] = {spec.name: spec for spec in CATALOGUE}

# Older names users still have in their CSV files.
ALIASES: dict[str, str] = {
    "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS": "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
}

# dcgm-exporter's default-counters.csv, in its order (DCP fields included: the
# PCIe ones are derived from NVML counters, the others come from GPM on Hopper+).
DCGM_DEFAULT_SET: tuple[str, ...] = (
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_ENC_UTIL",
    "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_RESERVED",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
    "DCGM_FI_DEV_VGPU_LICENSE_STATUS",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE",
    "DCGM_FI_DRIVER_VERSION",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "DCGM_FI_PROF_DRAM_ACTIVE",
    "DCGM_FI_PROF_PCIE_TX_BYTES",
    "DCGM_FI_PROF_PCIE_RX_BYTES",
)

# The health fields dcgm-exporter ships commented out; we collect them by default
# because the health engine needs them.
HEALTH_SET: tuple[str, ...] = (
    "DCGM_FI_DEV_ROW_REMAP_PENDING",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
    "DCGM_FI_DEV_RETIRED_SBE",
    "DCGM_FI_DEV_RETIRED_DBE",
    "DCGM_FI_DEV_RETIRED_PENDING",
    "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
    "DCGM_FI_DEV_POWER_VIOLATION",
    "DCGM_FI_DEV_THERMAL_VIOLATION",
    "DCGM_FI_DEV_SYNC_BOOST_VIOLATION",
    "DCGM_FI_DEV_BOARD_LIMIT_VIOLATION",
    "DCGM_FI_DEV_LOW_UTIL_VIOLATION",
    "DCGM_FI_DEV_RELIABILITY_VIOLATION",
    "DCGM_FI_DEV_POWER_MGMT_LIMIT",
    "DCGM_FI_DEV_PSTATE",
    "DCGM_FI_DEV_FAN_SPEED",
    "DCGM_FI_DEV_BAR1_USED",
    "DCGM_FI_DEV_FB_TOTAL",
    "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
    "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
    "DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION",
)

DEFAULT_FIELDS: tuple[str, ...] = DCGM_DEFAULT_SET + HEALTH_SET


def to_exported(spec: FieldSpec, raw: float) -> float:
    """NVML's value in the exported unit. MiB values are whole MiB (bytes // 2**20), as DCGM reports them."""
    if spec.scale == MIB:
        return float(int(raw) >> 20)
    if spec.scale == PERCENT:
        return raw / 100.0
    return raw * spec.scale


def lookup(name: str) -> FieldSpec | None:
    """The spec for a DCGM field name (aliases accepted), or None."""
    return BY_NAME.get(ALIASES.get(name, name))


# Clock event reason bits (NVML_CLOCKS_EVENT_REASON_*), for health and docs.
CLOCK_EVENT_HW_SLOWDOWN = 0x8
CLOCK_EVENT_HW_THERMAL = 0x40
CLOCK_EVENT_HW_POWER_BRAKE = 0x80
