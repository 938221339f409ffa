"""structlog set-up: JSON lines by default, console format on a terminal."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Hashable

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class Reminder:
    """Says a lasting condition once when it starts, then at most once per `every_s` while it lasts.

    Conditions that hold for many cycles (a lost GPU, a failing call) must not log every cycle:
    `due(key)` is True the first time and then once per interval; `clear(key)` ends the condition
    and returns True when it was active, so the caller can log the recovery once.
    """

    def __init__(self, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._said: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def due(self, key: Hashable) -> bool:
        now = self._clock()
        with self._lock:
            last = self._said.get(key)
            if last is not None and now - last < self.every_s:
                return False
            self._said[key] = now
            return True

    def clear(self, key: Hashable) -> bool:
        with self._lock:
            return self._said.pop(key, None) is not None
