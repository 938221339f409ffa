"""Workload patterns: utilisation and framebuffer use as a function of the second."""

from __future__ import annotations

from exporter.simulate.hashing import _Smooth, _u

PATTERNS = ("train", "infer", "batch", "hold", "idle")
# Default workload per GPU index (mod 8): some GPUs idle, so "allocated but idle" dashboards have data.
_DEFAULT_PATTERNS = ("train", "train", "infer", "hold", "train", "batch", "infer", "idle")
_MIG_PATTERNS = ("infer", "train", "batch", "hold", "infer", "idle", "train")


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

