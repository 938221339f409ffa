"""Deterministic hashing (splitmix64): cheap, no global state."""

from __future__ import annotations

M64 = (1 << 64) - 1
_INV64 = 1.0 / 18446744073709551616.0


def mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def hash_key(*parts: int) -> int:
    k = 0x5151_5EED
    for p in parts:
        k = mix64(k ^ (p & M64))
    return k


def uniform(key: int, n: int) -> float:
    """Uniform in [0, 1) for (key, n)."""
    return mix64(key ^ ((n * 0x100000001B3) & M64)) * _INV64


class Smooth:
    """Value noise in [0, 1): random knots every `period` steps, smoothstep between them (knots memoised)."""

    __slots__ = ("key", "knots", "period")

    def __init__(self, key: int, period: int) -> None:
        self.key, self.period = key, period
        self.knots = (-2, 0.0, 0.0)  # (k, value at k, value at k+1); replaced as a whole: thread-safe

    def at(self, n: int) -> float:
        k, r = divmod(n, self.period)
        knots = self.knots
        if knots[0] != k:
            a = knots[2] if knots[0] == k - 1 else uniform(self.key, k)
            knots = self.knots = (k, a, uniform(self.key, k + 1))
        f = r / self.period
        f = f * f * (3.0 - 2.0 * f)
        return knots[1] + (knots[2] - knots[1]) * f


def sim_uuid(key: int) -> str:
    a, b = mix64(key), mix64(key ^ 0xA5A5A5A5)
    h = f"{a:016x}{b:016x}"
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
