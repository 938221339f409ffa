"""rate_limit (exporter-toolkit): a token bucket over all requests, `burst` tokens refilled one per
`interval`; a request without a token gets 429. Go's rate.Limiter semantics: burst 0 refuses everything."""

from __future__ import annotations

import time


class RateLimiter:
    def __init__(self, interval_s: float, burst: int) -> None:
        self._interval = interval_s
        self._burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self._burst), self._tokens + (now - self._last) / self._interval)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
