"""Simulated GPUs and MIG devices: identity, stepped state (one-second segments) and values."""

from __future__ import annotations

import math
import threading

from exporter.model import MigDevice, dcgm_profile_name
from exporter.simulate.faults import Fault
from exporter.simulate.fieldnames import (
    BAR1_USED,
    BOARD_LIMIT_VIOLATION,
    CLOCK_REASONS,
    COR_REMAPPED,
    DBE_AGG,
    DBE_VOL,
    DEC_UTIL,
    ENC_UTIL,
    ENERGY,
    FAN_SPEED,
    FB_FREE,
    FB_RESERVED,
    FB_TOTAL,
    FB_USED,
    GPU_TEMP,
    GPU_UTIL,
    LOW_UTIL_VIOLATION,
    MEM_CLOCK,
    MEM_COPY_UTIL,
    MEMORY_TEMP,
    NOT_ON_MIG_PARENT,
    NVLINK_RX_BYTES,
    NVLINK_TOTAL,
    NVLINK_TX_BYTES,
    PCIE_REPLAY,
    PCIE_RX,
    PCIE_TX,
    POWER_LIMIT,
    POWER_USAGE,
    POWER_VIOLATION,
    PROF_PCIE_RX,
    PROF_PCIE_TX,
    PSTATE,
    REASON_HW_SLOWDOWN,
    REASON_HW_THERMAL,
    REASON_IDLE,
    REASON_SW_POWER_CAP,
    RECOVERY_ACTION,
    RELIABILITY_VIOLATION,
    REMAP_FAILURE,
    REMAP_PENDING,
    RETIRED_DBE,
    RETIRED_PENDING,
    RETIRED_SBE,
    SBE_AGG,
    SBE_VOL,
    SM_CLOCK,
    SYNC_BOOST_VIOLATION,
    THERMAL_VIOLATION,
    UNC_REMAPPED,
    VGPU_LICENSE,
)
from exporter.simulate.hashing import M64, Smooth, hash_key, mix64, sim_uuid, uniform
from exporter.simulate.models import GpuModel, MigProfile
from exporter.simulate.workload import activity, framebuffer_used, utilisation

# HGX-style PCI bus numbers for the 8 GPUs of one board.
_PCI_BUSES = (0x18, 0x2A, 0x3A, 0x5D, 0x9A, 0xAB, 0xBA, 0xDB)

_ALPHA_TEMP = 1.0 - math.exp(-1.0 / 45.0)  # thermal time constant ~45 s
_NS_PER_S = 1_000_000_000.0  # violation counters count nanoseconds, as NVML and DCGM do


class SimMig:
    def __init__(self, parent: SimGpu, profile: MigProfile, gi: int, slot: int, key: int, pattern: str) -> None:
        self.parent = parent
        self.profile = profile
        self.gi = gi
        self.key = key
        self.pattern = pattern
        self.uuid = "MIG-" + sim_uuid(key)
        dcgm_name = dcgm_profile_name(profile.compute_slices, profile.memory_mib)
        self.device = MigDevice(self.uuid, parent.uuid, parent.index, gi, 0, dcgm_name, slot)
        self.mem_frac = 0.25 + 0.6 * uniform(key, 7)
        self.bar1 = 2 + int(20 * uniform(key, 8))
        self.period = 600 + int(uniform(key, 3) * 1200)
        self.noise = Smooth(key, 31 if pattern == "infer" else 13)
        self.mem_noise = Smooth(key ^ 4, 17)
        self._cache: tuple[int, dict[str, float]] = (-1, {})

    def util(self, n: int) -> float:
        return utilisation(self.pattern, self.key, n, self.period, self.noise, uniform(self.key ^ 1, n))

    def values(self, t: float) -> dict[str, float]:
        n = int(t)
        cache = self._cache
        if cache[0] != n:
            total = self.profile.memory_mib
            used = framebuffer_used(self.pattern, n, total, self.mem_frac, self.util(n), self.mem_noise)
            vals = {
                FB_TOTAL: float(total),
                FB_USED: float(used),
                FB_RESERVED: 0.0,
                FB_FREE: float(total - used),
                BAR1_USED: float(self.bar1 if used else 1),
            }
            if self.parent.model.gpm:  # GPM samples per GPU instance
                vals.update(activity(self.pattern, self.util(n)))
            cache = self._cache = (n, vals)
        return cache[1]


class SimGpu:
    """One simulated GPU: its identity, its workload and its stepped state."""

    def __init__(self, index: int, n_gpus: int, model: GpuModel, seed: int, pattern: str) -> None:
        self.index = index
        self.model = model
        self.key = hash_key(seed, index, 0x6B9)
        self.pattern = pattern
        self.uuid = "GPU-" + sim_uuid(self.key)
        bus = _PCI_BUSES[index % 8]
        self.pci_bus_id = f"{index // 8:08X}:{bus:02X}:00.0"
        self.numa = 0 if n_gpus == 1 else (index * 2) // n_gpus
        self.supported = model.supported()
        self.migs: list[SimMig] = []
        self.mig_enabled = False
        self.faults: list[Fault] = []  # value-affecting and availability faults, by time
        self.lock = threading.Lock()
        k = self.key
        # Per-GPU constants.
        self.period = 600 + int(uniform(k, 1) * 1200)
        self.intensity = {"train": 1.06, "infer": 0.8, "batch": 0.95}.get(pattern, 0.0)
        self.intensity *= 0.97 + 0.06 * uniform(k, 2)
        self.ambient = -2.0 + 5.0 * uniform(k, 3)
        self.mem_frac = {"train": 0.86, "infer": 0.32, "batch": 0.55, "hold": 0.5}.get(pattern, 0.0)
        self.mem_frac += 0.08 * uniform(k, 4)
        self.bar1_busy = 4 + int(uniform(k, 5) * 36)
        self.noise = Smooth(k, 31 if pattern == "infer" else 13)
        self.mem_noise = Smooth(k ^ 4, 17)
        self.jitter = 0.0
        self.cor_remapped = float(int(uniform(k, 6) * 3) if uniform(k, 7) < 0.3 else 0)
        self.sbe_per_s = 1.0 / 600.0 if uniform(k, 8) < 0.15 else 1.0 / 86400.0
        self.replay_per_s = 1.0 / 7200.0
        uptime = 86400.0 * (1 + 29 * uniform(k, 9))
        avg_w = model.idle_power_w + 0.3 * (model.power_limit_w - model.idle_power_w)
        self.base = (
            float(int(uptime * avg_w * 1000.0)),  # energy, mJ
            float(int(uptime * model.nvlink_kib_s * 0.05)) if model.nvlink != "none" else 0.0,  # KiB
            float(int(uptime * 0.002 * _NS_PER_S * uniform(k, 10))),  # power violation, ns
            0.0,  # thermal violation, ns
            float(int(uniform(k, 11) * 3)),  # PCIe replays
            0.0,  # SBE volatile (reset at driver load)
        )
        self.sbe_agg_base = float(int(uniform(k, 12) * 12))
        self.low_util_v = 0.0
        self.reset()

    # -- stepping ---------------------------------------------------------

    def reset(self) -> None:
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
        return utilisation(self.pattern, self.key, n, self.period, self.noise, self.jitter)

    def _thermal_at(self, n: int) -> bool:
        return any(f.kind == "thermal" and f.active(float(n)) for f in self.faults)

    def _enter(self, n: int) -> None:
        """Compute the instantaneous state of segment n (temperature carries over from n-1)."""
        m = self.model
        k = self.key
        # One 64-bit hash per second feeds every random draw of the step.
        h = mix64(k ^ ((n * 0x100000001B3) & M64))
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
        self.rates = [power * 1000.0, link, capped * _NS_PER_S, _NS_PER_S if thermal else 0.0]
        if r_replay < self.replay_per_s:
            self.cum[4] += 1
        if m.ecc and r_sbe < self.sbe_per_s:
            self.cum[5] += 1
        self.util, self.power, self.capped, self.thermal = u, power, capped, thermal
        self.seg = n

    def _advance(self, n: int) -> None:
        if n < self.seg:
            self.reset()
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
        reasons = 0 if busy else REASON_IDLE
        if self.capped:
            sm = float(int(sm * (1.0 - 0.12 * self.capped) / 15) * 15)
            reasons |= REASON_SW_POWER_CAP
        if self.thermal:
            sm = float(int(sm * 0.6 / 15) * 15)
            reasons |= REASON_HW_SLOWDOWN | REASON_HW_THERMAL
        total, reserved = m.fb_total_mib, m.fb_reserved_mib
        if self.migs:
            used = sum(int(mig.values(float(n))[FB_USED]) for mig in self.migs)
        elif self.mig_enabled:
            used = 0
        else:
            used = framebuffer_used(self.pattern, n, total - reserved, self.mem_frac, u, self.mem_noise)
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
        if m.gpm:
            g.update(activity(self.pattern if not (self.migs or self.mig_enabled) else "train", u))
            half = float(int(self.rates[1] * 512.0))  # KiB/s TX + RX -> bytes/s each way
            g[NVLINK_TX_BYTES] = half
            g[NVLINK_RX_BYTES] = half
        if self.mig_enabled:
            for name in NOT_ON_MIG_PARENT:
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
            # DCGM's NVLink throughput: KiB/s / 1000, whole; 0 while the counters read 0.
            out[NVLINK_TOTAL] = float(int(r[1] / 1000.0)) if c[1] + r[1] * frac > 0 else 0.0
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
