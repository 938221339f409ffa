"""The field catalogue: every DCGM field we can export, and how it is read.

One table is the source of truth for the NVML adapter (how to read), the
simulator (what to produce), the renderer (type, help) and the generated
metrics reference in docs/metrics.md.

Reading strategies (`FieldSpec.reader`, one of the `Reader` dataclasses below):
- `FieldValue()` (`FV`): batched `nvmlDeviceGetFieldValues` with the NVML_FI ids in
  `fi` (several ids are summed, e.g. NVLink TX + RX).
- `Call(name)`: a dedicated NVML call; the adapter maps the name to a function.
- `Rate(field_id)`: a per-second rate derived from a cumulative NVML byte counter
  (avoids nvmlDeviceGetPcieThroughput, which blocks ~20 ms per call).
- `LinkRate()`: DCGM's NVLink throughput: the change of the KiB counters in `fi`
  (summed over all links) per second, divided by 1000 and truncated, 0 on the first
  read and while the counters read 0 (DcgmCacheManager::ReadAndCacheNvLinkBandwidth).
- `Event()` (`EVENT`): filled from NVML events (XIDs), never polled.
- `Label(source)`: a label-type field (driver version, serial, VBIOS, ...): read once
  at discovery (`Gpu.attributes`, `Inventory.driver_version`/`nvml_version`), put on
  every series of the device as a label named after the field.
- `Gpm(metric_id)`: a DCGM profiling (DCP) field computed by NVML's GPM API (Hopper
  and newer) as metric NVML_GPM_METRIC_<id> between the previous read's sample and
  this one's (so the first read gives no value). GPM reports percent (scale 0.01 gives
  DCGM's 0-1 ratio) or MiB/s (scale 2**20 gives bytes/s). Activity metrics have
  scope "instance": NVML samples them per MIG GPU instance (nvmlGpmMigSampleGet on
  the parent with the GPU instance id); NVLink rates are GPU-wide. GPUs without GPM
  (pre-Hopper, old drivers) report them unsupported.
- `Dcp()` (`DCP`): a DCGM profiling field NVML cannot give; skipped with one warning.

`Event`, `Label` and `Dcp` are never polled (`is_polled`): the collector leaves them
out of every read, and a backend asked for one anyway skips it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, NoReturn, TypeAlias

MetricType = Literal["gauge", "counter", "label"]
# DCGM's storage type of the field (dcgm_fields.cpp): how dcgm-exporter prints its value.
# int64: whole numbers ("42"); double: six decimals ("52.636000", Go's %f); string: labels.
ValueType = Literal["int64", "double", "string"]
Scope = Literal["gpu", "instance"]

# NVML's scopeId for "all NVLink links".
ALL_LINKS = 0xFFFFFFFF


# --- how a field is read (FieldSpec.reader) ---


@dataclass(frozen=True)
class FieldValue:
    """Batched nvmlDeviceGetFieldValues with the NVML_FI ids in FieldSpec.fi (summed)."""

    def __str__(self) -> str:
        return "fv"


@dataclass(frozen=True)
class Rate:
    """Per-second rate of the cumulative NVML byte counter NVML_FI `field_id`."""

    field_id: int

    def __str__(self) -> str:
        return f"rate:{self.field_id}"


@dataclass(frozen=True)
class LinkRate:
    """DCGM's NVLink throughput from the summed KiB counters in FieldSpec.fi (see the module doc)."""

    def __str__(self) -> str:
        return "linkrate"


@dataclass(frozen=True)
class Call:
    """A dedicated NVML call; the adapter keeps one small function per name."""

    name: str

    def __str__(self) -> str:
        return f"call:{self.name}"


@dataclass(frozen=True)
class Gpm:
    """NVML GPM metric NVML_GPM_METRIC_<metric_id> between two samples."""

    metric_id: int

    def __str__(self) -> str:
        return f"gpm:{self.metric_id}"


@dataclass(frozen=True)
class Event:
    """Filled from NVML events (XIDs); never polled."""

    def __str__(self) -> str:
        return "event"


@dataclass(frozen=True)
class Label:
    """A label-type field, read once at discovery; never polled.

    `source`: "driver_version" and "nvml_version" (the node's), else a key of `Gpu.attributes`."""

    source: str = "driver_version"

    def __str__(self) -> str:
        return f"label:{self.source}"


@dataclass(frozen=True)
class Dcp:
    """A DCGM profiling field NVML cannot give; never polled, skipped with one warning."""

    def __str__(self) -> str:
        return "dcp"


Reader: TypeAlias = FieldValue | Rate | LinkRate | Call | Gpm | Event | Label | Dcp
PolledReader: TypeAlias = FieldValue | Rate | LinkRate | Call | Gpm

FV = FieldValue()
EVENT = Event()
LABEL = Label()
DCP = Dcp()

# The one owner of "readers nobody polls": the collector leaves them out, the adapters skip them.
NOT_POLLED: Final = (Event, Label, Dcp)


def assert_never(value: NoReturn) -> NoReturn:
    """Static exhaustiveness check over `Reader` (typing.assert_never needs Python 3.11)."""
    raise AssertionError(f"unhandled reader {value!r}")


@dataclass(frozen=True)
class FieldSpec:
    name: str  # DCGM field name, which is also the metric name
    dcgm_id: int | None
    type: MetricType  # dcgm-exporter's default Prometheus type
    help: str  # dcgm-exporter's help text (unit included)
    reader: Reader
    fi: tuple[int, ...] = ()  # NVML_FI_* ids for reader FieldValue()
    scale: float = 1.0  # multiply the NVML value by this to get the exported unit
    # "instance": also readable per MIG device (memory, BAR1); "gpu": GPU-wide only.
    scope: Scope = "gpu"
    nvml_unit: str = ""  # what NVML returns, for the reference docs
    value_type: ValueType = "int64"
    # The metric name the counters file asked for (a legacy `dcgm_sm_clock`, an old
    # `DCGM_FI_DEV_CLOCK_THROTTLE_REASONS`); "" means `name`. Values stay keyed by `name`.
    metric: str = ""

    @property
    def metric_name(self) -> str:
        """The exposed metric name: the counters file's spelling, else the DCGM field name."""
        return self.metric or self.name


def _f(
    name: str,
    dcgm_id: int | None,
    type_: MetricType,
    help_: str,
    reader: Reader,
    fi: tuple[int, ...] = (),
    scale: float = 1.0,
    scope: Scope = "gpu",
    nvml_unit: str = "",
    value_type: ValueType | None = None,
) -> FieldSpec:
    if value_type is None:
        value_type = "string" if type_ == "label" else "int64"
    return FieldSpec(name, dcgm_id, type_, help_, reader, fi, scale, scope, nvml_unit, value_type)


MIB = 1.0 / (1 << 20)
PERCENT = 0.01  # GPM percent -> DCGM ratio; to_exported divides by 100 so 35 % is exactly 0.35
MIB_PER_S = float(1 << 20)  # GPM MiB/s -> bytes/s

# fmt: off
CATALOGUE: tuple[FieldSpec, ...] = (
    # --- dcgm-exporter's default set (non-DCP) ---
    _f("DCGM_FI_DEV_SM_CLOCK", 100, "gauge", "SM clock frequency (in MHz).", Call("sm_clock"), nvml_unit="MHz"),
    _f("DCGM_FI_DEV_MEM_CLOCK", 101, "gauge", "Memory clock frequency (in MHz).", Call("mem_clock"), nvml_unit="MHz"),
    _f("DCGM_FI_DEV_MEMORY_TEMP", 140, "gauge", "Memory temperature (in C).", FV, (82,), nvml_unit="C"),
    _f("DCGM_FI_DEV_GPU_TEMP", 150, "gauge", "GPU temperature (in C).", Call("gpu_temp"), nvml_unit="C"),
    _f("DCGM_FI_DEV_POWER_USAGE", 155, "gauge", "Power draw (in W).", Call("power_usage"), scale=0.001, nvml_unit="mW",
       value_type="double"),
    _f(
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 156, "counter",
        "Total energy consumption since boot (in mJ).", FV, (83,), nvml_unit="mJ",
    ),
    _f("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", 202, "counter", "Total number of PCIe retries.", FV, (94,)),
    _f("DCGM_FI_DEV_GPU_UTIL", 203, "gauge", "GPU utilization (in %).", Call("gpu_util"), nvml_unit="%"),
    _f("DCGM_FI_DEV_MEM_COPY_UTIL", 204, "gauge", "Memory utilization (in %).", Call("mem_util"), nvml_unit="%"),
    _f("DCGM_FI_DEV_ENC_UTIL", 206, "gauge", "Encoder utilization (in %).", Call("enc_util"), nvml_unit="%"),
    _f("DCGM_FI_DEV_DEC_UTIL", 207, "gauge", "Decoder utilization (in %).", Call("dec_util"), nvml_unit="%"),
    _f("DCGM_FI_DEV_XID_ERRORS", 230, "gauge", "Value of the last XID error encountered.", EVENT),
    _f(
        "DCGM_FI_DEV_FB_FREE", 251, "gauge", "Framebuffer memory free (in MiB).", Call("fb_free"),
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_FB_USED", 252, "gauge", "Framebuffer memory used (in MiB).", Call("fb_used"),
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_FB_RESERVED", 253, "gauge", "Framebuffer memory reserved (in MiB).", Call("fb_reserved"),
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", 449, "counter",
        "Total number of NVLink bandwidth counters for all lanes.", LinkRate(), (138, 139),
        nvml_unit="KiB (rate: KiB/s / 1000)",
    ),
    _f("DCGM_FI_DEV_VGPU_LICENSE_STATUS", 526, "gauge", "vGPU License status", Call("vgpu_license")),
    _f(
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", 393, "counter",
        "Number of remapped rows for uncorrectable errors", FV, (143,),
    ),
    _f(
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", 394, "counter",
        "Number of remapped rows for correctable errors", FV, (142,),
    ),
    _f("DCGM_FI_DEV_ROW_REMAP_FAILURE", 395, "gauge", "Whether remapping of rows has failed", FV, (145,)),
    _f("DCGM_FI_DRIVER_VERSION", 1, "label", "Driver Version", LABEL),
    # --- label fields dcgm-exporter ships commented out ---
    _f("DCGM_FI_NVML_VERSION", 2, "label", "NVML Version", Label("nvml_version")),
    _f("DCGM_FI_DEV_NAME", 50, "label", "Device Name", Label("name")),
    _f("DCGM_FI_DEV_BRAND", 51, "label", "Device Brand", Label("brand")),
    _f("DCGM_FI_DEV_SERIAL", 53, "label", "Device Serial Number", Label("serial")),
    _f("DCGM_FI_DEV_OEM_INFOROM_VER", 56, "label", "OEM inforom version", Label("inforom_oem")),
    _f("DCGM_FI_DEV_ECC_INFOROM_VER", 80, "label", "ECC inforom version", Label("inforom_ecc")),
    _f(
        "DCGM_FI_DEV_POWER_INFOROM_VER", 81, "label", "Power management object inforom version",
        Label("inforom_power"),
    ),
    _f("DCGM_FI_DEV_INFOROM_IMAGE_VER", 82, "label", "Inforom image version", Label("inforom_image")),
    _f("DCGM_FI_DEV_VBIOS_VERSION", 85, "label", "VBIOS version of the device", Label("vbios")),
    # --- health fields (commented out upstream; on by default here) ---
    _f("DCGM_FI_DEV_ROW_REMAP_PENDING", 396, "gauge", "Whether remapping of rows is pending", FV, (144,)),
    _f("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", 310, "counter", "Total number of single-bit volatile ECC errors.", FV, (3,)),
    _f("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 311, "counter", "Total number of double-bit volatile ECC errors.", FV, (4,)),
    _f(
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", 312, "counter",
        "Total number of single-bit persistent ECC errors.", FV, (5,),
    ),
    _f(
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", 313, "counter",
        "Total number of double-bit persistent ECC errors.", FV, (6,),
    ),
    _f(
        "DCGM_FI_DEV_RETIRED_SBE", 390, "counter",
        "Total number of retired pages due to single-bit errors.", FV, (29,),
    ),
    _f(
        "DCGM_FI_DEV_RETIRED_DBE", 391, "counter",
        "Total number of retired pages due to double-bit errors.", FV, (30,),
    ),
    _f("DCGM_FI_DEV_RETIRED_PENDING", 392, "counter", "Total number of pages pending retirement.", FV, (31,)),
    _f(
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS", 112, "gauge",
        "Current clock event reasons (bitmask of DCGM_CLOCKS_EVENT_REASON_*).", Call("clocks_event_reasons"),
    ),
    _f(
        "DCGM_FI_DEV_POWER_VIOLATION", 240, "counter",
        "Throttling duration due to power constraints (in ns).", FV, (74,), nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_THERMAL_VIOLATION", 241, "counter",
        "Throttling duration due to thermal constraints (in ns).", FV, (75,), nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_SYNC_BOOST_VIOLATION", 242, "counter",
        "Throttling duration due to sync-boost constraints (in ns).", FV, (76,), nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_BOARD_LIMIT_VIOLATION", 243, "counter",
        "Throttling duration due to board limit constraints (in ns).", FV, (77,), nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_LOW_UTIL_VIOLATION", 244, "counter",
        "Throttling duration due to low utilization (in ns).", FV, (78,), nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_RELIABILITY_VIOLATION", 245, "counter",
        "Throttling duration due to reliability constraints (in ns).", FV, (79,), nvml_unit="ns",
    ),
    _f(
        "DCGM_FI_DEV_POWER_MGMT_LIMIT", 160, "gauge", "Power management limit (in W).", Call("power_limit"),
        scale=0.001, nvml_unit="mW", value_type="double",
    ),
    _f("DCGM_FI_DEV_PSTATE", 190, "gauge", "Performance state (P-State) 0-15. 0=highest", Call("pstate")),
    _f("DCGM_FI_DEV_FAN_SPEED", 191, "gauge", "Fan speed (in 0-100%).", Call("fan_speed"), nvml_unit="%"),
    _f(
        "DCGM_FI_DEV_BAR1_USED", 92, "gauge", "Used BAR1 memory (in MiB).", Call("bar1_used"),
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_FB_TOTAL", 250, "gauge", "Framebuffer memory total (in MiB).", Call("fb_total"),
        scale=MIB, scope="instance", nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT", 200, "gauge",
        "PCIe transmit throughput (in KB/s), from the PCIe byte counter.", Rate(197), scale=1.0 / 1024,
        nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT", 201, "gauge",
        "PCIe receive throughput (in KB/s), from the PCIe byte counter.", Rate(198), scale=1.0 / 1024,
        nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", 1523, "gauge",
        "Recovery action the driver asks for (0 none, 1 GPU reset, 2 node reboot, 3 drain P2P, "
        "4 drain and reset).",
        FV, (230,),
    ),
    # --- DCGM profiling (DCP) fields ---
    _f(
        "DCGM_FI_PROF_PCIE_TX_BYTES", 1009, "gauge",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.", Rate(197), nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_PROF_PCIE_RX_BYTES", 1010, "gauge",
        "The rate of data received over the PCIe bus - including both protocol headers and data payloads - "
        "in bytes per second.", Rate(198), nvml_unit="bytes",
    ),
    _f(
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE", 1001, "gauge", "Ratio of time the graphics engine is active.", Gpm(1),
        scale=PERCENT, scope="instance", nvml_unit="% (GPM GRAPHICS_UTIL)", value_type="double",
    ),
    _f(
        "DCGM_FI_PROF_SM_ACTIVE", 1002, "gauge", "The ratio of cycles an SM has at least 1 warp assigned.", Gpm(2),
        scale=PERCENT, scope="instance", nvml_unit="% (GPM SM_UTIL)", value_type="double",
    ),
    _f(
        "DCGM_FI_PROF_SM_OCCUPANCY", 1003, "gauge", "The ratio of number of warps resident on an SM.", Gpm(3),
        scale=PERCENT, scope="instance", nvml_unit="% (GPM SM_OCCUPANCY)", value_type="double",
    ),
    _f(
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", 1004, "gauge",
        "Ratio of cycles the tensor (HMMA) pipe is active.", Gpm(5),
        scale=PERCENT, scope="instance", nvml_unit="% (GPM ANY_TENSOR_UTIL)", value_type="double",
    ),
    _f(
        "DCGM_FI_PROF_DRAM_ACTIVE", 1005, "gauge",
        "Ratio of cycles the device memory interface is active sending or receiving data.", Gpm(10),
        scale=PERCENT, scope="instance", nvml_unit="% (GPM DRAM_BW_UTIL)", value_type="double",
    ),
    _f(
        "DCGM_FI_PROF_PIPE_FP64_ACTIVE", 1006, "gauge", "Ratio of cycles the fp64 pipes are active.", Gpm(11),
        scale=PERCENT, scope="instance", nvml_unit="% (GPM FP64_UTIL)", value_type="double",
    ),
    _f(
        "DCGM_FI_PROF_PIPE_FP32_ACTIVE", 1007, "gauge", "Ratio of cycles the fp32 pipes are active.", Gpm(12),
        scale=PERCENT, scope="instance", nvml_unit="% (GPM FP32_UTIL)", value_type="double",
    ),
    _f(
        "DCGM_FI_PROF_PIPE_FP16_ACTIVE", 1008, "gauge", "Ratio of cycles the fp16 pipes are active.", Gpm(13),
        scale=PERCENT, scope="instance", nvml_unit="% (GPM FP16_UTIL)", value_type="double",
    ),
    _f(
        "DCGM_FI_PROF_NVLINK_TX_BYTES", 1011, "gauge", "The rate of data transmitted over NVLink (bytes/s).",
        Gpm(61), scale=MIB_PER_S, nvml_unit="MiB/s (GPM NVLINK_TOTAL_TX_PER_SEC)",
    ),
    _f(
        "DCGM_FI_PROF_NVLINK_RX_BYTES", 1012, "gauge", "The rate of data received over NVLink (bytes/s).",
        Gpm(60), scale=MIB_PER_S, nvml_unit="MiB/s (GPM NVLINK_TOTAL_RX_PER_SEC)",
    ),
)
# fmt: on

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
    "DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION",
)
# DCGM_FI_DEV_PCIE_TX/RX_THROUGHPUT are readable when a counters file lists them, but not collected by
# default: DCGM never gives them (hard-coded NOT_SUPPORTED), so dcgm-exporter users have no series of
# them; DCGM_FI_PROF_PCIE_TX/RX_BYTES (in the default set) carry the same traffic in bytes/s.

DEFAULT_FIELDS: tuple[str, ...] = DCGM_DEFAULT_SET + HEALTH_SET


def to_exported(spec: FieldSpec, raw: float) -> float:
    """NVML's value in the exported unit. MiB values are whole MiB (bytes // 2**20), as DCGM reports them."""
    if spec.scale == MIB:
        return float(int(raw) >> 20)
    if spec.scale == PERCENT:
        return raw / 100.0
    return raw * spec.scale


def is_polled(spec: FieldSpec) -> bool:
    """Whether a backend read is ever asked for this field (not an event, label or DCP-only field)."""
    return not isinstance(spec.reader, NOT_POLLED)


def lookup(name: str) -> FieldSpec | None:
    """The spec for a DCGM field name (aliases accepted), or None."""
    return BY_NAME.get(ALIASES.get(name, name))


# Clock event reason bits (NVML_CLOCKS_EVENT_REASON_*), for health and docs.
CLOCK_EVENT_HW_SLOWDOWN = 0x8
CLOCK_EVENT_HW_THERMAL = 0x40
CLOCK_EVENT_HW_POWER_BRAKE = 0x80
