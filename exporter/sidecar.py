"""What the side processes share (`gpu-health-exporter device-plugin` and `device-plugin-proxy`,
containers beside the daemon): a listen address of their own unless told otherwise, one run loop, and
their two background loops (inventory discovery, rendering their own /metrics).

Exit codes are the daemon's (exporter/cli.py): 2 for bad flags or a bad web configuration, 1 when
the environment fails us at start (a port, a directory); SIGTERM and SIGINT stop cleanly.
"""

from __future__ import annotations

import gzip
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import Protocol

import structlog

from exporter.config import ConfigError
from exporter.render import Exposition

log = structlog.get_logger("exporter.sidecar")

EXIT_USAGE, EXIT_STARTUP = 2, 1
DISCOVER_EVERY_S = 30.0  # and at once on rediscover()
RENDER_EVERY_S = 2.0


class SidecarLoops:
    """Discovery every DISCOVER_EVERY_S (at once after `rediscover()`) and the /metrics bytes rendered
    every RENDER_EVERY_S, each in its own thread named `<prefix>-discover` / `<prefix>-render`."""

    def __init__(self, prefix: str, discover: Callable[[], None], render_body: Callable[[], str]) -> None:
        self._prefix = prefix
        self._discover = discover
        self._render_body = render_body
        self.exposition = Exposition(b"", gzip.compress(b""), 0.0)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def rediscover(self) -> None:
        self._wake.set()

    def render(self) -> None:
        body = self._render_body().encode()
        self.exposition = Exposition(body, gzip.compress(body, compresslevel=6), time.time())

    def start(self) -> None:
        """Render once (the first scrape has bytes), then start both loops."""
        self.render()
        for name, target in (("discover", self._discover_loop), ("render", self._render_loop)):
            thread = threading.Thread(target=target, name=f"{self._prefix}-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def liveness(self, others: Iterable[threading.Thread] = ()) -> tuple[bool, str]:
        """Alive while these loops (and `others`) run."""
        dead = [t.name for t in [*self.threads, *others] if not t.is_alive()]
        return (False, f"threads stopped: {', '.join(dead)}") if dead else (True, "ok")

    def _discover_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(DISCOVER_EVERY_S)
            self._wake.clear()
            if not self._stop.is_set():
                self._discover()

    def _render_loop(self) -> None:
        while not self._stop.wait(RENDER_EVERY_S):
            self.render()


class Sidecar(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


def with_default_address(argv: Sequence[str], address: str) -> list[str]:
    """`argv` listening on `address` unless -a/--address (or its environment variable) says otherwise:
    the containers of one pod share its network, so each needs its own port."""
    args = list(argv)
    given = any(a in ("-a", "--address") or a.startswith(("--address=", "-a=")) for a in args)
    if given or os.environ.get("GPU_HEALTH_EXPORTER_ADDRESS"):
        return args
    return ["--address", address, *args]


def run_sidecar(
    name: str, build: Callable[[], Sidecar], startup_errors: tuple[type[Exception], ...] = (OSError,)
) -> int:
    """Build (ConfigError: exit 2), start (one of `startup_errors`: exit 1), run until a signal, stop."""
    try:
        process = build()
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()

    def _terminate(signum: int, _frame: FrameType | None) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        process.start()
    except startup_errors as exc:
        log.error("startup_failed", error=str(exc))
        print(f"{name}: {exc}", file=sys.stderr)
        process.stop()
        return EXIT_STARTUP
    while not stop.wait(1.0):
        pass
    process.stop()
    return 0
