"""The loop every level-triggered consumer here runs: wake, reconcile, back off, resync.

`wake()` only sets an event, so it is safe from the health engine's callbacks (which must never
block a fence). The thread reconciles desired state to the API; a reconcile that fails is retried
after a backoff (1 s doubling to 60 s, so a broken API server is not hammered by every node), and
every `resync_s` it runs anyway: a missed write, a rule deleted by hand or a restart all converge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger("exporter.scheduling")


class ReconcileFailed(Exception):
    """A reconcile that could not finish (already logged and counted): retry after a backoff."""


class Reconciler:
    """Calls `reconcile()` (to be overridden) from its own thread on wake, on failure and at resync."""

    name = "reconciler"

    def __init__(
        self,
        *,
        resync_s: float = 60.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.resync_s = resync_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = 0.0
        self.passes = 0  # reconciles that finished (for tests and the benchmark)
        self._passes_cond = threading.Condition()

    def wake(self) -> None:
        """Ask for a reconcile soon; returns at once (safe from any callback)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"scheduling-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def wait_passes(self, n: int, timeout_s: float) -> bool:
        """Block until `n` reconciles have finished in all (tests)."""
        deadline = time.monotonic() + timeout_s
        with self._passes_cond:
            while self.passes < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._passes_cond.wait(left)
            return True

    def reconcile(self) -> None:
        """Make the API match what is wanted now; raise ReconcileFailed to be retried after a backoff."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.reconcile()
                self._backoff = 0.0
                with self._passes_cond:
                    self.passes += 1
                    self._passes_cond.notify_all()
                wait = self.resync_s
            except ReconcileFailed:
                self._backoff = min(self._backoff_max_s, max(self._backoff_initial_s, self._backoff * 2))
                wait = self._backoff
            except Exception:  # a bug of ours must not end the loop; it is not a GPU's fault either
                log.exception("scheduling_reconcile_failed", consumer=self.name)
                self._backoff = min(self._backoff_max_s, max(self._backoff_initial_s, self._backoff * 2))
                wait = self._backoff
            if self._backoff:
                # Backing off: wakes do not cut the wait short, or every verdict change would
                # hammer an API server that is already failing.
                self._stop.wait(wait)
            else:
                self._wake.wait(wait)
