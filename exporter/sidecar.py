"""What the side processes share (`gpu-health-exporter device-plugin` and `device-plugin-proxy`,
containers beside the daemon): a listen address of their own unless told otherwise, and one run loop.

Exit codes are the daemon's (exporter/cli.py): 2 for bad flags or a bad web configuration, 1 when
the environment fails us at start (a port, a directory); SIGTERM and SIGINT stop cleanly.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Protocol

import structlog

from exporter.config import ConfigError

log = structlog.get_logger("exporter.sidecar")

EXIT_USAGE, EXIT_STARTUP = 2, 1


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
