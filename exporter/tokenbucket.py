"""A token bucket: `rate_per_s` tokens a second, at most `burst` saved up; one taken per event.

Shared by the web configuration's `rate_limit` (exporter-toolkit refills one token per `interval`,
Go's rate.Limiter: burst 0 refuses everything) and the pod Events' node-wide limit."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._at = clock()

    def take(self) -> bool:
        """True (and one token spent) when a token is there, else False."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
