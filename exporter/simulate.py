"""A simulated GPU node for `--simulate[=SPEC]`: no GPU, no driver, no compiler.

`SimulatedBackend` implements `exporter.backend.Backend`, so collection,
rendering, health and the device plugin run the same code as on real GPUs.
It serves demos, trying dashboards and alert rules, and load-testing Prometheus.

Values are a pure function of (spec, seed, elapsed time): the simulation steps
in one-second segments from the moment the backend was built, using a clock
injected in the constructor (`time.monotonic` by default), so tests can drive
time. Each GPU follows a workload pattern (train, infer, batch, hold, idle);
power follows utilisation (capped at the model's limit, which makes the power
violation counter grow), temperature follows power with a thermal lag, energy
integrates power, and counters only ever increase.

Spec grammar (comma-separated items; whitespace around items is ignored)::

    SPEC     := "" | ITEM ("," ITEM)*
    ITEM     := PRESET | "file:" PATH | KEY "=" VALUE
    PRESET   := MODEL ["x" N]              h100x8 (the default), a100x4, l4x2, rtx4090, v100x8
    MODEL    := h100 | a100 | v100 | l4 | rtx4090
    KEY=VALUE:
      model=MODEL           gpus=N (1-1024)       seed=N        driver=X.Y.Z
      mig=SEL:PROFILES[;SEL:PROFILES...]   PROFILES := PROFILE["*"K]("+"PROFILE["*"K])* | "" | none
                                           e.g. mig=0:3g.40gb+2g.20gb+1g.10gb*2;1:7g.80gb
      workload=SEL:PATTERN[;...]           PATTERN := train | infer | batch | hold | idle
      faults=FAULT[;FAULT...]              (mig, workload and faults accumulate when repeated;
                                            an empty value clears the earlier ones)
    SEL      := N | N-M | all
    FAULT    := KIND ":" GPU ["/gi" G] [":" ARG] ["@" TIME ["+" DURATION]]
      xid:GPU[/giG]:XID@T      an XID event (attributed to GPU instance G when given)
      dbe:GPU@T                double-bit ECC error: DBE event + XID 48, DBE counters +1,
                               uncorrectable remapped rows +1 and remap pending (or a retired page)
      remap-failure:GPU@T      row remapping failed: ROW_REMAP_FAILURE=1 and XID 64
      recovery:GPU:ACTION@T    GET_GPU_RECOVERY_ACTION = ACTION (0-7 or none, reset, reboot,
                               drain-p2p, drain-reset, imex, bus-reset, system-reboot)
      lost:GPU@T[+D]           reads raise DeviceLostError; the event wait raises it once
      vanish:GPU@T[+D]         the GPU disappears from discover(); reads raise DeviceLostError
      hang:GPU@T[+D]           read() blocks (until D passes or shutdown())
      thermal:GPU@T[+D]        HW thermal slowdown: hot, clocks down, thermal violation grows
    TIME, DURATION := number with optional unit ms|s|m|h (default s); T defaults to 0;
                      without +D a fault lasts forever.

`file:PATH.json` reads the same options from a JSON object (keys model, gpus, seed,
driver, preset, mig, workload, faults; mig/workload/faults as a string, a list of
strings, or for mig/workload an object {"0": "3g.40gb+4g.40gb"}).

See docs/simulate.md for what each model supports and the value ranges.
"""

from __future__ import annotations

import bisect
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exporter.backend import BackendError, DeviceError, DeviceLostError
from exporter.fields import FieldSpec
from exporter.model import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_XID,
    DeviceEvent,
    Gpu,
    Inventory,
    MigDevice,
    ReadResult,
)

__all__ = ["MODELS", "Fault", "SimulatedBackend", "SimulatedEventSource"]

DEFAULT_DRIVER = "570.124.06"
MAX_GPUS = 1024
HANG_POLL_S = 0.05

# ---------------------------------------------------------------------------
# Field names (DCGM field name = metric name)

SM_CLOCK = "DCGM_FI_DEV_SM_CLOCK"
MEM_CLOCK = "DCGM_FI_DEV_MEM_CLOCK"
MEMORY_TEMP = "DCGM_FI_DEV_MEMORY_TEMP"
GPU_TEMP = "DCGM_FI_DEV_GPU_TEMP"
POWER_USAGE = "DCGM_FI_DEV_POWER_USAGE"
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
PCIE_REPLAY = "DCGM_FI_DEV_PCIE_REPLAY_COUNTER"
GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
MEM_COPY_UTIL = "DCGM_FI_DEV_MEM_COPY_UTIL"
ENC_UTIL = "DCGM_FI_DEV_ENC_UTIL"
DEC_UTIL = "DCGM_FI_DEV_DEC_UTIL"
FB_FREE = "DCGM_FI_DEV_FB_FREE"
FB_USED = "DCGM_FI_DEV_FB_USED"
FB_RESERVED = "DCGM_FI_DEV_FB_RESERVED"
FB_TOTAL = "DCGM_FI_DEV_FB_TOTAL"
BAR1_USED = "DCGM_FI_DEV_BAR1_USED"
NVLINK_TOTAL = "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"
VGPU_LICENSE = "DCGM_FI_DEV_VGPU_LICENSE_STATUS"
UNC_REMAPPED = "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"
COR_REMAPPED = "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"
REMAP_FAILURE = "DCGM_FI_DEV_ROW_REMAP_FAILURE"
REMAP_PENDING = "DCGM_FI_DEV_ROW_REMAP_PENDING"
SBE_VOL = "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"
DBE_VOL = "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"
SBE_AGG = "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL"
DBE_AGG = "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL"
RETIRED_SBE = "DCGM_FI_DEV_RETIRED_SBE"
RETIRED_DBE = "DCGM_FI_DEV_RETIRED_DBE"
RETIRED_PENDING = "DCGM_FI_DEV_RETIRED_PENDING"
CLOCK_REASONS = "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"
POWER_VIOLATION = "DCGM_FI_DEV_POWER_VIOLATION"
THERMAL_VIOLATION = "DCGM_FI_DEV_THERMAL_VIOLATION"
SYNC_BOOST_VIOLATION = "DCGM_FI_DEV_SYNC_BOOST_VIOLATION"
BOARD_LIMIT_VIOLATION = "DCGM_FI_DEV_BOARD_LIMIT_VIOLATION"
LOW_UTIL_VIOLATION = "DCGM_FI_DEV_LOW_UTIL_VIOLATION"
RELIABILITY_VIOLATION = "DCGM_FI_DEV_RELIABILITY_VIOLATION"
POWER_LIMIT = "DCGM_FI_DEV_POWER_MGMT_LIMIT"
PSTATE = "DCGM_FI_DEV_PSTATE"
FAN_SPEED = "DCGM_FI_DEV_FAN_SPEED"
PCIE_TX = "DCGM_FI_DEV_PCIE_TX_THROUGHPUT"
PCIE_RX = "DCGM_FI_DEV_PCIE_RX_THROUGHPUT"
PROF_PCIE_TX = "DCGM_FI_PROF_PCIE_TX_BYTES"
PROF_PCIE_RX = "DCGM_FI_PROF_PCIE_RX_BYTES"
RECOVERY_ACTION = "DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION"

# Clock event reason bits (NVML_CLOCKS_EVENT_REASON_*).
_REASON_IDLE = 0x1
_REASON_SW_POWER_CAP = 0x4
_REASON_HW_SLOWDOWN = 0x8
_REASON_HW_THERMAL = 0x40

_ALWAYS = frozenset({
    SM_CLOCK, MEM_CLOCK, GPU_TEMP, POWER_USAGE, ENERGY, PCIE_REPLAY, GPU_UTIL, MEM_COPY_UTIL,
    ENC_UTIL, DEC_UTIL, FB_FREE, FB_USED, FB_RESERVED, FB_TOTAL, BAR1_USED, CLOCK_REASONS,
    POWER_VIOLATION, THERMAL_VIOLATION, SYNC_BOOST_VIOLATION, BOARD_LIMIT_VIOLATION,
    LOW_UTIL_VIOLATION, RELIABILITY_VIOLATION, POWER_LIMIT, PSTATE, PCIE_TX, PCIE_RX,
    PROF_PCIE_TX, PROF_PCIE_RX, RECOVERY_ACTION,
})
_ECC = frozenset({SBE_VOL, DBE_VOL, SBE_AGG, DBE_AGG})
_REMAP = frozenset({UNC_REMAPPED, COR_REMAPPED, REMAP_FAILURE, REMAP_PENDING})
_RETIRED = frozenset({RETIRED_SBE, RETIRED_DBE, RETIRED_PENDING})
# Not readable through a handle of a MIG-enabled GPU.
_NOT_ON_MIG_PARENT = frozenset({GPU_UTIL, MEM_COPY_UTIL, ENC_UTIL, DEC_UTIL})

# ---------------------------------------------------------------------------
# GPU models


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

    def supported(self) -> frozenset[str]:
        s = set(_ALWAYS)
        if self.memory_temp_offset_c is not None:
            s.add(MEMORY_TEMP)
        if self.fan:
            s.add(FAN_SPEED)
        if self.nvlink != "none":
            s.add(NVLINK_TOTAL)
        if self.ecc:
            s |= _ECC
        if self.row_remap:
            s |= _REMAP
        if self.retired_pages:
            s |= _RETIRED
        if self.vgpu_license:
            s.add(VGPU_LICENSE)
        return frozenset(s)


MODELS: dict[str, GpuModel] = {
    m.key: m
    for m in (
        GpuModel("h100", "NVIDIA H100 80GB HBM3", 81559, 532, 700.0, 70.0, 1980, 345, 2619, 2619, 30.0, 40.0, 6.0,
                 False, "all", 8.8e8, 6.4e10, True, True, False, False, True, 0, _H100_MIG),
        GpuModel("a100", "NVIDIA A100-SXM4-80GB", 81920, 512, 400.0, 55.0, 1410, 210, 1593, 1593, 29.0, 36.0, 5.0,
                 False, "all", 5.9e8, 3.2e10, True, True, False, False, True, 0, _A100_MIG),
        GpuModel("v100", "Tesla V100-SXM2-32GB", 32768, 305, 300.0, 40.0, 1530, 135, 877, 877, 30.0, 35.0, 3.0,
                 False, "cube", 2.9e8, 1.6e10, True, False, True, False, True, 0),
        GpuModel("l4", "NVIDIA L4", 23034, 434, 72.0, 16.0, 2040, 210, 6251, 405, 32.0, 40.0, None,
                 False, "none", 0.0, 3.2e10, True, True, False, True, True, 8),
        GpuModel("rtx4090", "NVIDIA GeForce RTX 4090", 24564, 400, 450.0, 20.0, 2520, 210, 10501, 405, 35.0, 40.0,
                 None, True, "none", 0.0, 3.2e10, False, False, False, True, False, 8),
    )
}

PATTERNS = ("train", "infer", "batch", "hold", "idle")
# Default workload per GPU index (mod 8): some GPUs idle, so "allocated but idle" dashboards have data.
_DEFAULT_PATTERNS = ("train", "train", "infer", "hold", "train", "batch", "infer", "idle")
_MIG_PATTERNS = ("infer", "train", "batch", "hold", "infer", "idle", "train")

# HGX-style PCI bus numbers for the 8 GPUs of one board.
_PCI_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)

RECOVERY_ACTIONS = {
    "none": 0, "reset": 1, "gpu-reset": 1, "reboot": 2, "node-reboot": 2, "drain-p2p": 3, "drain-reset": 4,
    "imex": 5, "bus-reset": 6, "system-reboot": 7,
}

# ---------------------------------------------------------------------------
# Deterministic hashing (splitmix64): cheap, no global state.

_M64 = (1 << 64) - 1
_INV64 = 1.0 / 18446744073709551616.0


def _mix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    k = 0x5151_5EED
    for p in parts:
        k = _mix(k ^ (p & _M64))
    return k


def _u(key: int, n: int) -> float:
    """Uniform in [0, 1) for (key, n)."""
    return _mix(key ^ ((n * 0x100000001B3) & _M64)) * _INV64


class _Smooth:
    """Value noise in [0, 1): random knots every `period` steps, smoothstep between them (knots memoised)."""

    __slots__ = ("key", "knots", "period")

    def __init__(self, key: int, period: int) -> None:
        self.key, self.period = key, period
        self.knots = (-2, 0.0, 0.0)  # (k, value at k, value at k+1); replaced as a whole: thread-safe

    def at(self, n: int) -> float:
        k, r = divmod(n, self.period)
        knots = self.knots
        if knots[0] != k:
            a = knots[2] if knots[0] == k - 1 else _u(self.key, k)
            knots = self.knots = (k, a, _u(self.key, k + 1))
        f = r / self.period
        f = f * f * (3.0 - 2.0 * f)
        return knots[1] + (knots[2] - knots[1]) * f


def _uuid(key: int) -> str:
    a, b = _mix(key), _mix(key ^ 0xA5A5A5A5)
    h = f"{a:016x}{b:016x}"
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


# ---------------------------------------------------------------------------
# Faults


@dataclass(frozen=True)
class Fault:
    """One scheduled fault. `at` and `duration` are seconds of simulated (elapsed) time."""

    kind: str
    gpu: int
    at: float = 0.0
    duration: float | None = None  # None: until the end
    xid: int = 0
    gi: int | None = None
    action: int = 0
    text: str = ""

    def active(self, t: float) -> bool:
        return t >= self.at and (self.duration is None or t < self.at + self.duration)


_FAULT_KINDS = ("xid", "dbe", "remap-failure", "recovery", "lost", "vanish", "hang", "thermal")
_WITH_DURATION = ("lost", "vanish", "hang", "thermal")
_TIME_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?$")
_TARGET_RE = re.compile(r"^(\d+)(?:/gi(\d+))?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_time(text: str, what: str, fault: str) -> float:
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"fault {fault!r}: bad {what} {text!r} (want seconds, e.g. 30, 1.5, 500ms, 5m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_fault(text: str, gpus: int, mig_gis: dict[int, set[int]] | None = None) -> Fault:
    """Parse one FAULT (see the module docstring) for a node of `gpus` GPUs."""
    raw = text.strip()
    head, _, at_part = raw.partition("@")
    at, duration = 0.0, None
    if at_part:
        when, _, dur = at_part.partition("+")
        at = _parse_time(when, "time", raw)
        if dur:
            duration = _parse_time(dur, "duration", raw)
            if duration <= 0:
                raise ValueError(f"fault {raw!r}: duration must be positive")
    parts = head.split(":")
    kind = parts[0].strip().lower()
    if kind not in _FAULT_KINDS:
        raise ValueError(f"fault {raw!r}: unknown kind {kind!r} (one of {', '.join(_FAULT_KINDS)})")
    if duration is not None and kind not in _WITH_DURATION:
        raise ValueError(f"fault {raw!r}: {kind} takes no +duration (only {', '.join(_WITH_DURATION)} do)")
    want_arg = kind in ("xid", "recovery")
    if len(parts) != (3 if want_arg else 2):
        form = {"xid": "xid:GPU[/giN]:XID@T", "recovery": "recovery:GPU:ACTION@T"}.get(kind, f"{kind}:GPU@T")
        raise ValueError(f"fault {raw!r}: expected {form}")
    tm = _TARGET_RE.match(parts[1].strip())
    if not tm:
        raise ValueError(f"fault {raw!r}: bad target {parts[1]!r} (want a GPU index, e.g. 3 or 0/gi2)")
    gpu = int(tm.group(1))
    if gpu >= gpus:
        raise ValueError(f"fault {raw!r}: GPU {gpu} does not exist (the node has {gpus} GPUs, 0-{gpus - 1})")
    gi = int(tm.group(2)) if tm.group(2) is not None else None
    if gi is not None:
        if kind != "xid":
            raise ValueError(f"fault {raw!r}: only xid faults can name a GPU instance")
        have = (mig_gis or {}).get(gpu)
        if have is None:
            raise ValueError(f"fault {raw!r}: GPU {gpu} has no MIG layout (add mig={gpu}:...)")
        if gi not in have:
            raise ValueError(
                f"fault {raw!r}: GPU {gpu} has no GPU instance {gi} (it has {', '.join(map(str, sorted(have)))})"
            )
    xid = action = 0
    if kind == "xid":
        try:
            xid = int(parts[2])
        except ValueError:
            raise ValueError(f"fault {raw!r}: XID {parts[2]!r} is not a number") from None
        if not 0 < xid < 1 << 32:
            raise ValueError(f"fault {raw!r}: XID {xid} out of range")
    elif kind == "recovery":
        a = parts[2].strip().lower()
        if a.isdigit() and int(a) <= 7:
            action = int(a)
        elif a in RECOVERY_ACTIONS:
            action = RECOVERY_ACTIONS[a]
        else:
            raise ValueError(
                f"fault {raw!r}: unknown recovery action {parts[2]!r} (0-7 or {', '.join(RECOVERY_ACTIONS)})"
            )
    return Fault(kind, gpu, at, duration, xid, gi, action, raw)


# ---------------------------------------------------------------------------
# Spec parsing


@dataclass
class SimConfig:
    model: str = "h100"
    gpus: int = 8
    seed: int = 0
    driver: str = DEFAULT_DRIVER
    mig: dict[int, tuple[str, ...]] = field(default_factory=dict)
    workload: dict[int, str] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)


_PRESET_RE = re.compile(r"^([a-z0-9]+)x(\d+)$")
_KEYS = ("model", "gpus", "seed", "driver", "mig", "workload", "faults", "preset")


def _split_list(value: str) -> list[str]:
    return [p.strip() for p in value.split(";") if p.strip()]


def _selector(sel: str, gpus: int, what: str) -> list[int]:
    s = sel.strip().lower()
    if s in ("all", "*"):
        return list(range(gpus))
    m = re.match(r"^(\d+)(?:-(\d+))?$", s)
    if not m:
        raise ValueError(f"{what}: bad GPU selector {sel!r} (want N, N-M or all)")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo or hi >= gpus:
        raise ValueError(f"{what}: GPU {sel} does not exist (the node has {gpus} GPUs, 0-{gpus - 1})")
    return list(range(lo, hi + 1))


def _int(value: str, key: str, lo: int, hi: int) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{key}={value!r}: not an integer") from None
    if not lo <= n <= hi:
        raise ValueError(f"{key}={value!r}: must be {lo}-{hi}")
    return n


def _json_items(path: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"file:{path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"file:{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"file:{path}: want a JSON object of options")
    items: list[tuple[str, str]] = []
    for key, value in data.items():
        if key not in _KEYS:
            raise ValueError(f"file:{path}: unknown key {key!r} (one of {', '.join(_KEYS)})")
        if isinstance(value, dict):
            if key not in ("mig", "workload"):
                raise ValueError(f"file:{path}: {key} cannot be an object")
            parts = []
            for sel, v in value.items():
                if isinstance(v, list):
                    v = "+".join(str(x) for x in v)
                parts.append(f"{sel}:{v}")
            items.append((key, ";".join(parts)))
        elif isinstance(value, list):
            items.append((key, ";".join(str(v) for v in value)))
        elif isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"file:{path}: {key} must be a string or an integer")
        else:
            items.append((key, str(value)))
    return items


def parse_spec(spec: str | None) -> SimConfig:
    """Parse a `--simulate` spec into a SimConfig (raises ValueError naming the bad part)."""
    items: list[tuple[str, str]] = []
    for token in (spec or "").split(","):
        tok = token.strip()
        if not tok:
            continue
        if tok.startswith("file:"):
            items.extend(_json_items(tok[5:]))
        elif "=" in tok:
            key, _, value = tok.partition("=")
            key = key.strip().lower()
            if key not in _KEYS:
                raise ValueError(f"unknown option {key!r} in {tok!r} (one of {', '.join(_KEYS)}, or a preset)")
            items.append((key, value.strip()))
        else:
            items.append(("preset", tok))
    cfg = SimConfig()
    # Node shape first, so the order of items does not matter for mig/workload/faults.
    for key, value in items:
        if key == "preset":
            v = value.strip().lower()
            m = _PRESET_RE.match(v)
            if v in MODELS:
                cfg.model = v
            elif m and m.group(1) in MODELS:
                cfg.model = m.group(1)
                cfg.gpus = _int(m.group(2), f"GPU count in preset {value!r}", 1, MAX_GPUS)
            else:
                raise ValueError(
                    f"unknown preset {value!r} (want MODEL[xN] with MODEL one of {', '.join(MODELS)}, e.g. h100x8)"
                )
        elif key == "model":
            if value.lower() not in MODELS:
                raise ValueError(f"model={value!r}: unknown model (one of {', '.join(MODELS)})")
            cfg.model = value.lower()
        elif key == "gpus":
            cfg.gpus = _int(value, "gpus", 1, MAX_GPUS)
        elif key == "seed":
            cfg.seed = _int(value, "seed", 0, (1 << 63) - 1)
        elif key == "driver":
            if not re.match(r"^\d+(\.\d+){1,2}$", value):
                raise ValueError(f"driver={value!r}: want a version like {DEFAULT_DRIVER}")
            cfg.driver = value
    model = MODELS[cfg.model]
    for key, value in items:
        if key in ("mig", "workload", "faults") and not value.strip():
            # An empty value clears what came before (e.g. to drop the faults of a file: spec).
            if key == "mig":
                cfg.mig.clear()
            elif key == "workload":
                cfg.workload.clear()
            else:
                cfg.faults.clear()
        elif key == "mig":
            for item in _split_list(value):
                sel, sep, profiles = item.partition(":")
                if not sep:
                    raise ValueError(f"mig item {item!r}: want GPU:PROFILE+PROFILE (e.g. 0:3g.40gb+4g.40gb)")
                if not model.mig:
                    raise ValueError(f"mig item {item!r}: {model.name} does not support MIG (use h100 or a100)")
                names: list[str] = []
                for p in profiles.split("+"):
                    p = p.strip().lower()
                    if p in ("", "none"):
                        continue
                    name, star, count = p.partition("*")
                    if name not in model.mig:
                        raise ValueError(
                            f"mig item {item!r}: unknown profile {name!r} for {model.name} "
                            f"(one of {', '.join(model.mig)})"
                        )
                    k = _int(count, f"mig profile count in {item!r}", 1, 7) if star else 1
                    names.extend([name] * k)
                _place(model, names, item)  # validate now, with the item in the message
                for gpu in _selector(sel, cfg.gpus, f"mig item {item!r}"):
                    cfg.mig[gpu] = tuple(names)
        elif key == "workload":
            for item in _split_list(value):
                sel, sep, pattern = item.partition(":")
                pattern = pattern.strip().lower()
                if not sep or pattern not in PATTERNS:
                    raise ValueError(f"workload item {item!r}: want GPU:PATTERN with PATTERN one of {PATTERNS}")
                for gpu in _selector(sel, cfg.gpus, f"workload item {item!r}"):
                    cfg.workload[gpu] = pattern
        elif key == "faults":
            cfg.faults.extend(_split_list(value))
    return cfg


def _place(model: GpuModel, names: Sequence[str], item: str) -> list[tuple[str, int]]:
    """Place MIG profiles like NVML does: larger first; 3g and up from the top, smaller from the bottom.

    Returns (profile, GPU instance id) pairs ordered by GPU instance id.
    """
    used = [False] * 8
    out: list[tuple[str, int]] = []
    for name in sorted(names, key=lambda n: -model.mig[n].memory_slices * 8 - model.mig[n].compute_slices):
        prof = model.mig[name]
        candidates = prof.placements if prof.compute_slices < 3 else tuple(reversed(prof.placements))
        for start, gi in candidates:
            if not any(used[start:start + prof.memory_slices]):
                for i in range(start, start + prof.memory_slices):
                    used[i] = True
                out.append((name, gi))
                break
        else:
            raise ValueError(f"mig item {item!r}: {name} does not fit next to the other instances")
    out.sort(key=lambda p: p[1])
    return out


# ---------------------------------------------------------------------------
# Simulated devices

_ALPHA_TEMP = 1.0 - math.exp(-1.0 / 45.0)  # thermal time constant ~45 s
_US_PER_S = 1_000_000.0


class _SimMig:
    def __init__(self, parent: _SimGpu, profile: MigProfile, gi: int, slot: int, key: int, pattern: str) -> None:
        self.parent = parent
        self.profile = profile
        self.gi = gi
        self.key = key
        self.pattern = pattern
        self.uuid = "MIG-" + _uuid(key)
        self.device = MigDevice(self.uuid, parent.uuid, parent.index, gi, 0, profile.name, slot)
        self.mem_frac = 0.25 + 0.6 * _u(key, 7)
        self.bar1 = 2 + int(20 * _u(key, 8))
        self.period = 600 + int(_u(key, 3) * 1200)
        self.noise = _Smooth(key, 31 if pattern == "infer" else 13)
        self.mem_noise = _Smooth(key ^ 4, 17)
        self._cache: tuple[int, dict[str, float]] = (-1, {})

    def util(self, n: int) -> float:
        return _util(self.pattern, self.key, n, self.period, self.noise, _u(self.key ^ 1, n))

    def values(self, t: float) -> dict[str, float]:
        n = int(t)
        cache = self._cache
        if cache[0] != n:
            total = self.profile.memory_mib
            used = _fb_used(self.pattern, n, total, self.mem_frac, self.util(n), self.mem_noise)
            cache = self._cache = (n, {
                FB_TOTAL: float(total), FB_USED: float(used), FB_RESERVED: 0.0, FB_FREE: float(total - used),
                BAR1_USED: float(self.bar1 if used else 1),
            })
        return cache[1]


def _util(pattern: str, key: int, n: int, period: int, noise: _Smooth, jitter: float) -> float:
    """Utilisation (0-100) of a workload pattern at second n; `jitter` is uniform in [0, 1)."""
    if pattern == "train":
        # Steady near 95% with a checkpoint dip every `period` seconds.
        if (n + (key & 0xFFFF)) % period < 25 + (key >> 20) % 30:
            return float(int(4 * jitter))
        return min(100.0, float(int(90 + 9 * noise.at(n) + 2 * jitter)))
    if pattern == "infer":
        return float(int(12 + 63 * noise.at(n) + 8 * jitter))
    if pattern == "batch":
        block = (n + (key & 0xFFF)) // 300
        if _u(key ^ 2, block) >= 0.6:
            return 0.0
        return float(int(60 + 30 * _u(key ^ 3, block) + 10 * jitter))
    return 0.0


def _fb_used(pattern: str, n: int, usable: int, frac: float, util: float, noise: _Smooth) -> int:
    if pattern == "idle" or (pattern == "batch" and util == 0.0):
        return 0
    if pattern == "hold":
        return int(usable * frac * 0.6)
    wobble = 0.02 * noise.at(n) if pattern != "train" else 0.004 * noise.at(n // 10)
    return min(usable, int(usable * (frac + wobble)))


class _SimGpu:
    """One simulated GPU: its identity, its workload and its stepped state."""

    def __init__(self, index: int, n_gpus: int, model: GpuModel, seed: int, pattern: str) -> None:
        self.index = index
        self.model = model
        self.key = _key(seed, index, 0x6B9)
        self.pattern = pattern
        self.uuid = "GPU-" + _uuid(self.key)
        bus = _PCI_BUSES[index % 8]
        self.pci_bus_id = f"{index // 8:08X}:{bus:02X}:00.0"
        self.numa = 0 if n_gpus == 1 else (index * 2) // n_gpus
        self.supported = model.supported()
        self.migs: list[_SimMig] = []
        self.mig_enabled = False
        self.faults: list[Fault] = []  # value-affecting and availability faults, by time
        self.lock = threading.Lock()
        k = self.key
        # Per-GPU constants.
        self.period = 600 + int(_u(k, 1) * 1200)
        self.intensity = {"train": 1.06, "infer": 0.8, "batch": 0.95}.get(pattern, 0.0)
        self.intensity *= 0.97 + 0.06 * _u(k, 2)
        self.ambient = -2.0 + 5.0 * _u(k, 3)
        self.mem_frac = {"train": 0.86, "infer": 0.32, "batch": 0.55, "hold": 0.5}.get(pattern, 0.0)
        self.mem_frac += 0.08 * _u(k, 4)
        self.bar1_busy = 4 + int(_u(k, 5) * 36)
        self.noise = _Smooth(k, 31 if pattern == "infer" else 13)
        self.mem_noise = _Smooth(k ^ 4, 17)
        self.jitter = 0.0
        self.cor_remapped = float(int(_u(k, 6) * 3) if _u(k, 7) < 0.3 else 0)
        self.sbe_per_s = 1.0 / 600.0 if _u(k, 8) < 0.15 else 1.0 / 86400.0
        self.replay_per_s = 1.0 / 7200.0
        uptime = 86400.0 * (1 + 29 * _u(k, 9))
        avg_w = model.idle_power_w + 0.3 * (model.power_limit_w - model.idle_power_w)
        self.base = (
            float(int(uptime * avg_w * 1000.0)),  # energy, mJ
            float(int(uptime * model.nvlink_kib_s * 0.05)) if model.nvlink != "none" else 0.0,  # KiB
            float(int(uptime * 0.002 * _US_PER_S * _u(k, 10))),  # power violation, us
            0.0,  # thermal violation, us
            float(int(_u(k, 11) * 3)),  # PCIe replays
            0.0,  # SBE volatile (reset at driver load)
        )
        self.sbe_agg_base = float(int(_u(k, 12) * 12))
        self.low_util_v = 0.0
        self._reset()

    # -- stepping ---------------------------------------------------------

    def _reset(self) -> None:
        self.seg = -1
        self.temp = 0.0
        # Cumulative at the start of the current segment: energy, nvlink, power_v, thermal_v, replay, sbe_vol.
        self.cum = list(self.base)
        self.rates = [0.0, 0.0, 0.0, 0.0]
        self.gauges: dict[str, float] = {}
        self.util = 0.0
        self.power = 0.0
        self.capped = 0.0
        self.thermal = False
        self.j_pcie = 0.0

    def internal_util(self, n: int) -> float:
        if self.migs:
            return sum(m.util(n) * m.profile.compute_slices for m in self.migs) / 7.0
        if self.mig_enabled:
            return 0.0
        return _util(self.pattern, self.key, n, self.period, self.noise, self.jitter)

    def _thermal_at(self, n: int) -> bool:
        return any(f.kind == "thermal" and f.active(float(n)) for f in self.faults)

    def _enter(self, n: int) -> None:
        """Compute the instantaneous state of segment n (temperature carries over from n-1)."""
        m = self.model
        k = self.key
        # One 64-bit hash per second feeds every random draw of the step.
        h = _mix(k ^ ((n * 0x100000001B3) & _M64))
        self.jitter = (h & 0xFF) / 256.0
        j_power = ((h >> 8) & 0xFF) / 256.0
        j_cap = ((h >> 16) & 0xFF) / 256.0
        self.j_pcie = ((h >> 24) & 0xFF) / 256.0
        r_replay = ((h >> 32) & 0xFFFF) / 65536.0
        r_sbe = ((h >> 48) & 0xFFFF) / 65536.0
        u = self.internal_util(n)
        span = m.power_limit_w - m.idle_power_w
        intensity = self.intensity if not self.migs else 0.9
        demand = m.idle_power_w * (0.97 + 0.06 * j_power) + span * u * 0.01 * intensity
        thermal = bool(self.faults) and self._thermal_at(n)
        if thermal:
            demand *= 0.7
        limit = m.power_limit_w
        if demand > limit:
            capped = min(1.0, 0.3 + (demand - limit) / (0.1 * limit))
            power = limit * (0.985 + 0.012 * j_cap)
        else:
            capped = 0.0
            power = demand
        target = m.idle_temp_c + self.ambient + (power - m.idle_power_w) / span * m.load_temp_rise_c
        if thermal:
            target += 30.0
        self.temp = target if self.seg < 0 else self.temp + (target - self.temp) * _ALPHA_TEMP
        if self.migs or self.mig_enabled:
            link = 0.0
        elif self.pattern == "train":
            link = m.nvlink_kib_s * 0.35 * u * 0.01 * (0.8 + 0.4 * j_cap)
        elif self.pattern == "infer":
            link = m.nvlink_kib_s * 0.02 * u * 0.01
        else:
            link = m.nvlink_kib_s * 0.1 * u * 0.01
        self.rates = [power * 1000.0, link, capped * _US_PER_S, _US_PER_S if thermal else 0.0]
        if r_replay < self.replay_per_s:
            self.cum[4] += 1
        if m.ecc and r_sbe < self.sbe_per_s:
            self.cum[5] += 1
        self.util, self.power, self.capped, self.thermal = u, power, capped, thermal
        self.seg = n

    def _advance(self, n: int) -> None:
        if n < self.seg:
            self._reset()
        while self.seg < n:
            if self.seg >= 0:
                c, r = self.cum, self.rates
                c[0] += r[0]
                c[1] += r[1]
                c[2] += r[2]
                c[3] += r[3]
            self._enter(self.seg + 1)
        self.gauges = self._build_gauges(n)

    def _build_gauges(self, n: int) -> dict[str, float]:
        m, u = self.model, self.util
        busy = u > 0.0
        sm = float(m.sm_clock_max if busy else m.sm_clock_idle)
        reasons = 0 if busy else _REASON_IDLE
        if self.capped:
            sm = float(int(sm * (1.0 - 0.12 * self.capped) / 15) * 15)
            reasons |= _REASON_SW_POWER_CAP
        if self.thermal:
            sm = float(int(sm * 0.6 / 15) * 15)
            reasons |= _REASON_HW_SLOWDOWN | _REASON_HW_THERMAL
        total, reserved = m.fb_total_mib, m.fb_reserved_mib
        if self.migs:
            used = sum(int(mig.values(float(n))[FB_USED]) for mig in self.migs)
        elif self.mig_enabled:
            used = 0
        else:
            used = _fb_used(self.pattern, n, total - reserved, self.mem_frac, u, self.mem_noise)
        if self.pattern == "train":
            mem_util, rx, tx = u * 0.45, 0.03 * u * 0.01, 0.01 * u * 0.01
        elif self.pattern == "infer":
            mem_util, rx, tx = u * 0.3, 0.01 * u * 0.01, 0.008 * u * 0.01
        else:
            mem_util, rx, tx = u * 0.4, 0.02 * u * 0.01, 0.005 * u * 0.01
        jitter = self.j_pcie
        rx_b = float(int(m.pcie_bytes_s * rx * (0.7 + 0.6 * jitter) + 20_000 + 30_000 * jitter))
        tx_b = float(int(m.pcie_bytes_s * tx * (0.7 + 0.6 * jitter) + 15_000 + 20_000 * jitter))
        video = float(int(u * 0.25)) if m.video and self.pattern == "infer" else 0.0
        temp = float(round(self.temp))
        g: dict[str, float] = {
            SM_CLOCK: sm,
            MEM_CLOCK: float(m.mem_clock if busy or used else m.mem_clock_idle),
            GPU_TEMP: temp,
            POWER_USAGE: round(self.power, 3),
            PCIE_REPLAY: self.cum[4],
            GPU_UTIL: u,
            MEM_COPY_UTIL: float(int(mem_util)),
            ENC_UTIL: video if m.key == "l4" else 0.0,
            DEC_UTIL: video,
            FB_TOTAL: float(total),
            FB_RESERVED: float(reserved),
            FB_USED: float(used),
            FB_FREE: float(total - reserved - used),
            BAR1_USED: float(self.bar1_busy if used else 1),
            CLOCK_REASONS: float(reasons),
            SYNC_BOOST_VIOLATION: 0.0,
            BOARD_LIMIT_VIOLATION: 0.0,
            LOW_UTIL_VIOLATION: self.low_util_v,
            RELIABILITY_VIOLATION: 0.0,
            POWER_LIMIT: m.power_limit_w,
            PSTATE: 0.0 if busy else float(m.idle_pstate),
            PCIE_TX: float(int(tx_b / 1024)),
            PCIE_RX: float(int(rx_b / 1024)),
            PROF_PCIE_TX: tx_b,
            PROF_PCIE_RX: rx_b,
            RECOVERY_ACTION: 0.0,
        }
        if m.memory_temp_offset_c is not None:
            g[MEMORY_TEMP] = temp + round(m.memory_temp_offset_c + 4.0 * u * 0.01)
        if m.fan:
            g[FAN_SPEED] = float(max(30, min(100, int(30 + (self.temp - 35.0) * 1.6))))
        if m.vgpu_license:
            g[VGPU_LICENSE] = 0.0
        if m.ecc:
            g[SBE_VOL] = self.cum[5]
            g[SBE_AGG] = self.sbe_agg_base + self.cum[5]
            g[DBE_VOL] = 0.0
            g[DBE_AGG] = 0.0
        if m.row_remap and not self.migs:
            g[COR_REMAPPED] = self.cor_remapped
            g[UNC_REMAPPED] = 0.0
            g[REMAP_PENDING] = 0.0
            g[REMAP_FAILURE] = 0.0
        if m.retired_pages:
            g[RETIRED_SBE] = float(int(self.cor_remapped))
            g[RETIRED_DBE] = 0.0
            g[RETIRED_PENDING] = 0.0
        if self.mig_enabled:
            for name in _NOT_ON_MIG_PARENT:
                g.pop(name, None)
        return g

    def values(self, t: float) -> dict[str, float]:
        n = int(t)
        with self.lock:
            if n != self.seg or not self.gauges:
                self._advance(n)
            out = dict(self.gauges)
            c, r = self.cum, self.rates
        frac = t - n
        out[ENERGY] = float(int(c[0] + r[0] * frac))
        out[POWER_VIOLATION] = float(int(c[2] + r[2] * frac))
        out[THERMAL_VIOLATION] = float(int(c[3] + r[3] * frac))
        if NVLINK_TOTAL in self.supported:
            out[NVLINK_TOTAL] = float(int(c[1] + r[1] * frac))
        if self.faults:
            self._overlay(out, t)
        return out

    def _overlay(self, out: dict[str, float], t: float) -> None:
        """Apply DBE / remap-failure / recovery faults that happened by time t."""
        m = self.model
        dbe = 0
        for f in self.faults:
            if f.at > t:
                continue
            if f.kind == "dbe":
                dbe += 1
            elif f.kind == "remap-failure" and REMAP_FAILURE in out:
                out[REMAP_FAILURE] = 1.0
            elif f.kind == "recovery":
                out[RECOVERY_ACTION] = float(f.action)
        if dbe:
            if m.ecc:
                out[DBE_VOL] += dbe
                out[DBE_AGG] += dbe
            if UNC_REMAPPED in out:
                out[UNC_REMAPPED] += dbe
                out[REMAP_PENDING] = 1.0
            if m.retired_pages:
                out[RETIRED_DBE] += dbe
                out[RETIRED_PENDING] = 1.0

    # -- availability -----------------------------------------------------

    def state_fault(self, kinds: tuple[str, ...], t: float) -> Fault | None:
        for f in self.faults:
            if f.kind in kinds and f.active(t):
                return f
        return None


# ---------------------------------------------------------------------------
# Events


class SimulatedEventSource:
    """EventSource over the backend's scheduled and injected events."""

    def __init__(self, backend: SimulatedBackend, gpu_uuids: Iterable[str]) -> None:
        self._backend = backend
        self._uuids = frozenset(gpu_uuids)
        self.closed = False

    def wait(self, timeout_s: float) -> list[DeviceEvent]:
        return self._backend._wait_events(self, self._uuids, timeout_s)

    def close(self) -> None:
        self._backend._close_events(self)


@dataclass(order=True)
class _Scheduled:
    at: float
    seq: int
    gpu_uuid: str = field(compare=False)
    event_type: int = field(compare=False)  # 0: the GPU is lost (wait raises DeviceLostError)
    xid: int = field(compare=False, default=0)
    gi: int | None = field(compare=False, default=None)


_LOST = 0


# ---------------------------------------------------------------------------
# The backend


class SimulatedBackend:
    """A simulated GPU node (see the module docstring for the spec grammar)."""

    name: str = "simulated"

    def __init__(self, config: SimConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        cfg = config or SimConfig()
        if cfg.model not in MODELS:
            raise ValueError(f"model={cfg.model!r}: unknown model (one of {', '.join(MODELS)})")
        self.config = cfg
        self.model = MODELS[cfg.model]
        self._clock = clock
        self._t0 = clock()
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._queue: list[DeviceEvent] = []
        self._schedule: list[_Scheduled] = []
        self._seq = 0
        self._gpus: list[_SimGpu] = []
        for i in range(cfg.gpus):
            pattern = cfg.workload.get(i, _DEFAULT_PATTERNS[i % len(_DEFAULT_PATTERNS)])
            self._gpus.append(_SimGpu(i, cfg.gpus, self.model, cfg.seed, pattern))
        self._by_uuid = {g.uuid: g for g in self._gpus}
        self._migs: dict[str, _SimMig] = {}
        for i, names in sorted(cfg.mig.items()):
            gpu = self._gpus[i]
            gpu.mig_enabled = True
            for slot, (name, gi) in enumerate(_place(self.model, names, f"{i}:{'+'.join(names)}")):
                mk = _key(cfg.seed, i, 0x316, gi)
                pattern = cfg.workload.get(i) or _MIG_PATTERNS[(slot + i) % len(_MIG_PATTERNS)]
                mig = _SimMig(gpu, self.model.mig[name], gi, slot, mk, pattern)
                gpu.migs.append(mig)
                self._migs[mig.uuid] = mig
        self._inventory_cache: tuple[tuple[bool, ...], Inventory] | None = None
        self._mig_gis = {g.index: {m.gi for m in g.migs} for g in self._gpus if g.mig_enabled}
        self._pairs = self._nvlink_pairs()
        for text in cfg.faults:
            self._add_fault(parse_fault(text, cfg.gpus, self._mig_gis))

    @classmethod
    def from_spec(cls, spec: str | None, clock: Callable[[], float] = time.monotonic) -> SimulatedBackend:
        """Build from a `--simulate` spec; raises ValueError naming the bad part."""
        return cls(parse_spec(spec), clock=clock)

    def describe(self) -> str:
        """One line for logs: "8x NVIDIA H100 80GB HBM3 (seed 0, 2 MIG GPUs, 3 faults)"."""
        c = self.config
        return (f"{c.gpus}x {self.model.name} (seed {c.seed}, {len(c.mig)} MIG GPUs, {len(c.faults)} faults)")

    def elapsed(self) -> float:
        """Simulated seconds since the backend was built."""
        return max(0.0, self._clock() - self._t0)

    # -- Backend protocol ---------------------------------------------------

    def start(self) -> None:
        self._stop.clear()

    def shutdown(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def discover(self) -> Inventory:
        t = self.elapsed()
        present = tuple(g.state_fault(("vanish",), t) is None if g.faults else True for g in self._gpus)
        cached = self._inventory_cache
        if cached is not None and cached[0] == present:
            return cached[1]
        gpus = []
        for g, here in zip(self._gpus, present, strict=True):
            if not here:
                continue
            gpus.append(Gpu(
                index=g.index, uuid=g.uuid, pci_bus_id=g.pci_bus_id, minor=g.index, name=self.model.name,
                mig_enabled=g.mig_enabled, migs=tuple(m.device for m in g.migs), numa_node=g.numa,
            ))
        visible = {g.uuid for g in gpus}
        pairs = frozenset(p for p in self._pairs if p[0] in visible and p[1] in visible)
        inv = Inventory(driver_version=self.config.driver, gpus=tuple(gpus), nvlink_pairs=pairs)
        self._inventory_cache = (present, inv)
        return inv

    def read(self, uuid: str, fields: Sequence[FieldSpec]) -> ReadResult:
        gpu = self._by_uuid.get(uuid)
        mig: _SimMig | None = None
        if gpu is None:
            mig = self._migs.get(uuid)
            if mig is None:
                raise DeviceLostError(f"simulated node has no device {uuid}")
            gpu = mig.parent
        t = self.elapsed()
        if gpu.faults:
            t = self._availability(gpu, uuid, t)
        vals = mig.values(t) if mig is not None else gpu.values(t)
        res = ReadResult()
        got, unsupported = res.values, res.unsupported
        for spec in fields:
            v = vals.get(spec.name)
            if v is not None:
                got[spec.name] = v
            elif spec.reader != "event" and spec.reader != "label":
                unsupported.add(spec.name)
        return res

    def open_events(self, inventory: Inventory) -> SimulatedEventSource:
        return SimulatedEventSource(self, (g.uuid for g in inventory.gpus))

    # -- injection ----------------------------------------------------------

    def inject_xid(self, gpu_index: int, xid: int, gi: int | None = None, ci: int | None = None) -> None:
        """Fire an XID event now (thread-safe; wakes a waiting wait())."""
        gpu = self._gpu(gpu_index)
        if gi is not None and gi not in {m.gi for m in gpu.migs}:
            raise ValueError(f"GPU {gpu_index} has no GPU instance {gi}")
        event = DeviceEvent(
            gpu.uuid, EVENT_XID, xid=xid, gpu_instance_id=gi,
            compute_instance_id=(ci if ci is not None else 0) if gi is not None else None, timestamp=time.time(),
        )
        with self._cond:
            self._queue.append(event)
            self._cond.notify_all()

    def inject(self, fault: str) -> Fault:
        """Add a fault (FAULT grammar) at runtime; without "@T" it starts now ("hang:2+30s"). Returns it."""
        text = fault.strip()
        if "@" not in text:
            head, plus, dur = text.partition("+")
            text = f"{head}@{self.elapsed():.6f}{plus}{dur}"
        parsed = parse_fault(text, len(self._gpus), self._mig_gis)
        self._add_fault(parsed)
        return parsed

    # -- internals ------------------------------------------------------------

    def _gpu(self, index: int) -> _SimGpu:
        if not 0 <= index < len(self._gpus):
            raise ValueError(f"GPU {index} does not exist (the node has {len(self._gpus)} GPUs)")
        return self._gpus[index]

    def _add_fault(self, f: Fault) -> None:
        gpu = self._gpus[f.gpu]
        with self._cond:
            if f.kind != "xid":
                with gpu.lock:
                    faults = [*gpu.faults, f]
                    faults.sort(key=lambda x: x.at)
                    gpu.faults = faults
                    if f.kind == "thermal" and f.at < gpu.seg + 1:
                        gpu._reset()  # the past changed: recompute from the start, deterministically
            if f.kind == "xid":
                self._schedule_event(f.at, gpu.uuid, EVENT_XID, f.xid, f.gi)
            elif f.kind == "dbe":
                self._schedule_event(f.at, gpu.uuid, EVENT_DOUBLE_BIT_ECC)
                self._schedule_event(f.at, gpu.uuid, EVENT_XID, 48)
            elif f.kind == "remap-failure":
                self._schedule_event(f.at, gpu.uuid, EVENT_XID, 64)
            elif f.kind == "lost":
                self._schedule_event(f.at, gpu.uuid, _LOST)
            self._cond.notify_all()

    def _schedule_event(self, at: float, uuid: str, event_type: int, xid: int = 0, gi: int | None = None) -> None:
        self._seq += 1
        bisect.insort(self._schedule, _Scheduled(at, self._seq, uuid, event_type, xid, gi))

    def _availability(self, gpu: _SimGpu, uuid: str, t: float) -> float:
        """Raise for a lost/vanished GPU; block while it hangs. Returns the time to read at."""
        while True:
            f = gpu.state_fault(("lost", "vanish"), t)
            if f is not None:
                raise DeviceLostError(f"simulated GPU {gpu.index} ({uuid}) is lost (fault {f.text})")
            h = gpu.state_fault(("hang",), t)
            if h is None:
                return t
            # Block like a wedged driver call, in chunks, until the hang ends or shutdown().
            if self._stop.wait(HANG_POLL_S):
                raise DeviceError(f"simulated GPU {gpu.index}: hung read interrupted by shutdown")
            t = self.elapsed()

    def _release_due(self, now: float) -> None:
        """Move scheduled events that are due into the queue (caller holds the condition)."""
        sched = self._schedule
        i = 0
        while i < len(sched) and sched[i].at <= now:
            s = sched[i]
            i += 1
            ci = 0 if s.gi is not None else None
            self._queue.append(DeviceEvent(s.gpu_uuid, s.event_type, s.xid, s.gi, ci, timestamp=time.time()))
        if i:
            del sched[:i]

    def _wait_events(self, source: SimulatedEventSource, uuids: frozenset[str], timeout_s: float) -> list[DeviceEvent]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        real_clock = self._clock is time.monotonic
        with self._cond:
            while True:
                if self._stop.is_set():
                    raise BackendError("simulated backend is shut down")
                if source.closed:
                    return []
                now = self.elapsed()
                self._release_due(now)
                out: list[DeviceEvent] = []
                queue, self._queue = self._queue, []
                for i, e in enumerate(queue):
                    if e.gpu_uuid not in uuids:
                        continue  # not registered in this event set: dropped, as NVML would
                    if e.event_type == _LOST:
                        if out:  # deliver what came before first; raise on the next call
                            self._queue = queue[i:]
                            return out
                        self._queue = queue[i + 1:]
                        raise DeviceLostError(e.gpu_uuid)
                    out.append(e)
                if out:
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                chunk = remaining
                if self._schedule:
                    until = self._schedule[0].at - now
                    chunk = min(chunk, max(0.001, until) if real_clock else min(0.05, max(0.001, until)))
                self._cond.wait(chunk)

    def _close_events(self, source: SimulatedEventSource) -> None:
        with self._cond:
            source.closed = True
            self._cond.notify_all()

    def _nvlink_pairs(self) -> frozenset[tuple[str, str]]:
        topo = self.model.nvlink
        if topo == "none":
            return frozenset()
        pairs = set()
        for a in self._gpus:
            for b in self._gpus:
                if a.index >= b.index or a.index // 8 != b.index // 8:
                    continue
                i, j = a.index % 8, b.index % 8
                linked = topo == "all" or (i // 4 == j // 4) or (j == i + 4)
                if linked:
                    pairs.add((min(a.uuid, b.uuid), max(a.uuid, b.uuid)))
        return frozenset(pairs)

