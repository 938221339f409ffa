"""Workload patterns: utilisation and framebuffer use as a function of the second."""

from __future__ import annotations

from exporter.simulate.hashing import Smooth, uniform

PATTERNS = ("train", "infer", "batch", "hold", "idle")
# Default workload per GPU index (mod 8): some GPUs idle, so "allocated but idle" dashboards have data.
DEFAULT_PATTERNS = ("train", "train", "infer", "hold", "train", "batch", "infer", "idle")
MIG_PATTERNS = ("infer", "train", "batch", "hold", "infer", "idle", "train")


def utilisation(pattern: str, key: int, n: int, period: int, noise: Smooth, jitter: float) -> float:
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
        if uniform(key ^ 2, block) >= 0.6:
            return 0.0
        return float(int(60 + 30 * uniform(key ^ 3, block) + 10 * jitter))
    return 0.0


# Per pattern: SM active per graphics-active, occupancy / tensor / fp64 / fp32 / fp16 per SM active,
# DRAM active per utilisation.
_PROFILE = {
    "train": (0.92, 0.45, 0.62, 0.0, 0.18, 0.08, 0.0065),
    "infer": (0.7, 0.3, 0.4, 0.0, 0.12, 0.1, 0.0045),
    "batch": (0.85, 0.5, 0.05, 0.35, 0.4, 0.02, 0.0055),
}


def activity(pattern: str, util: float) -> dict[str, float]:
    """The GPM activity ratios (0-1, DCGM field name -> value) of a pattern at utilisation `util` (0-100)."""
    sm_per_gr, occ, tensor, fp64, fp32, fp16, dram = _PROFILE.get(pattern, _PROFILE["train"])
    gr = util * 0.01
    sm = gr * sm_per_gr
    return {
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE": round(gr, 4),
        "DCGM_FI_PROF_SM_ACTIVE": round(sm, 4),
        "DCGM_FI_PROF_SM_OCCUPANCY": round(sm * occ, 4),
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": round(sm * tensor, 4),
        "DCGM_FI_PROF_DRAM_ACTIVE": round(min(1.0, util * dram), 4),
        "DCGM_FI_PROF_PIPE_FP64_ACTIVE": round(sm * fp64, 4),
        "DCGM_FI_PROF_PIPE_FP32_ACTIVE": round(sm * fp32, 4),
        "DCGM_FI_PROF_PIPE_FP16_ACTIVE": round(sm * fp16, 4),
    }


def framebuffer_used(pattern: str, n: int, usable: int, frac: float, util: float, noise: Smooth) -> int:
    if pattern == "idle" or (pattern == "batch" and util == 0.0):
        return 0
    if pattern == "hold":
        return int(usable * frac * 0.6)
    wobble = 0.02 * noise.at(n) if pattern != "train" else 0.004 * noise.at(n // 10)
    return min(usable, int(usable * (frac + wobble)))
