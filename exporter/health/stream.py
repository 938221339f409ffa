"""A `HealthView` fed by the daemon's verdict stream (the control socket's watch op).

What a consumer in another process (the device plugin container, a remediation tool) uses to act on
the daemon's verdicts. It keeps the last verdicts when the daemon goes away (a restart, an upgrade)
and reconnects with backoff; until it has heard the daemon once, it takes the fences from the
persisted state file, read-only, so a fenced GPU is never treated as healthy because the daemon is
not up yet. The stream is docs/verdict-stream.md; this module speaks only JSON over a unix socket.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from exporter.health.control import KEEPALIVE_S, MAX_REQUEST, WATCH_VERSION
from exporter.health.state import STATE_FILE, read_state_file
from exporter.health.verdict import HealthState, Reason, Verdict, combine
from exporter.logs import Reminder

log = structlog.get_logger("exporter.health.stream")

SOURCE_DAEMON = "daemon"  # verdicts as the daemon streams them
SOURCE_LAST = "last_known"  # the daemon went away: its last verdicts are kept
SOURCE_STATE_FILE = "state_file"  # never heard the daemon: fences from the persisted state
SOURCE_NONE = "none"  # neither: nothing is fenced that we know of
SOURCES = (SOURCE_DAEMON, SOURCE_LAST, SOURCE_STATE_FILE, SOURCE_NONE)

_BACKOFF_FIRST_S = 0.25
_BACKOFF_MAX_S = 5.0
_STATES = {s.name.lower(): s for s in HealthState}


class StreamError(Exception):
    """A message of the stream that does not follow docs/verdict-stream.md."""


def parse_message(message: Any) -> dict[str, Verdict] | None:
    """The verdicts of one stream line; None for a keepalive. Raises StreamError on a bad line."""
    if not isinstance(message, dict):
        raise StreamError("a stream line is not a JSON object")
    if message.get("ok") is not True:
        raise StreamError(f"daemon refused the watch: {message.get('error', 'no reason given')}")
    if message.get("version") != WATCH_VERSION:
        raise StreamError(f"stream version {message.get('version')!r}, this client reads {WATCH_VERSION}")
    if message.get("keepalive") is True:
        return None
    devices = message.get("devices")
    if not isinstance(devices, list):
        raise StreamError("a stream line without a 'devices' list")
    out: dict[str, Verdict] = {}
    for d in devices:
        try:
            uuid, state = d["uuid"], _STATES[d["state"]]
            reasons = tuple(_reason(r) for r in d.get("reasons", ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise StreamError(f"a device entry that is not a verdict: {exc!r}") from None
        if not isinstance(uuid, str):
            raise StreamError("a device uuid that is not a string")
        out[uuid] = Verdict(uuid, state, reasons)
    return out


def _reason(r: dict[str, Any]) -> Reason:
    return Reason(
        signal=str(r["signal"]),
        code=str(r.get("code", "")),
        message=str(r.get("message", "")),
        first_seen=float(r.get("first_seen", 0.0)),
        last_seen=float(r.get("last_seen", 0.0)),
        count=int(r.get("count", 1)),
        action=str(r.get("action", "none")),
        state=_STATES[r["state"]],
    )


def verdicts_from_state_file(state_dir: Path) -> dict[str, Verdict]:
    """The persisted verdicts (read-only): each device's own reasons, a MIG device with its GPU's."""
    doc = read_state_file(state_dir)
    own = {u: tuple(r.freeze() for r in rec.reasons.values()) for u, rec in doc.devices.items()}
    out: dict[str, Verdict] = {}
    for uuid, rec in doc.devices.items():
        reasons = own[uuid] + (own.get(rec.parent, ()) if rec.parent else ())
        out[uuid] = Verdict(uuid, combine(r.state for r in reasons), reasons)
    return out


class VerdictStream:
    """`HealthView` over the verdict stream; start() connects in a thread, stop() ends it.

    `parent_of(uuid)` names a MIG device's GPU for devices the stream does not list yet (a MIG
    instance the consumer discovered before the daemon did): it inherits a fenced parent."""

    def __init__(
        self,
        state_dir: Path,
        parent_of: Callable[[str], str | None] = lambda _uuid: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_dir = state_dir
        self.socket_path = state_dir / "control.sock"
        self._parent_of = parent_of
        self._clock = clock
        self._lock = threading.Lock()
        self._verdicts: dict[str, Verdict] = {}
        self._subscribers: list[Callable[[], None]] = []
        self.source = SOURCE_NONE
        self.connected = False
        self.last_message = 0.0  # clock() when the daemon last said anything
        self.messages = 0
        self.reconnects = 0
        self._said = Reminder()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._load_state_file()

    # --- HealthView ---
    def verdict(self, uuid: str) -> Verdict:
        with self._lock:
            v = self._verdicts.get(uuid)
            if v is not None:
                return v
            parent = self._parent_of(uuid)
            pv = self._verdicts.get(parent) if parent else None
        if pv is not None and pv.state is HealthState.UNHEALTHY:
            return Verdict(uuid, pv.state, pv.reasons)
        return Verdict(uuid, HealthState.HEALTHY)

    def verdicts(self) -> Mapping[str, Verdict]:
        with self._lock:
            return dict(self._verdicts)

    def subscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers.append(callback)

    # --- lifecycle ---
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="verdict-stream", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def problem(self) -> str | None:
        """Why the verdicts may be old (for readiness and logs), or None while the daemon streams."""
        if self.connected:
            return None
        if self.source == SOURCE_LAST:
            return "health daemon not reachable: keeping its last verdicts"
        if self.source == SOURCE_STATE_FILE:
            return "health daemon not reachable yet: fences from the state file"
        return "health daemon not reachable yet and no state file: nothing known to be fenced"

    # --- inside ---
    def _load_state_file(self) -> None:
        try:
            verdicts = verdicts_from_state_file(self.state_dir)
        except FileNotFoundError:
            return
        except Exception as exc:  # unreadable: the daemon will say; nothing is invented meanwhile
            log.warning("verdict_state_file_unreadable", path=str(self.state_dir / STATE_FILE), error=str(exc))
            return
        self._set(verdicts, SOURCE_STATE_FILE)

    def _set(self, verdicts: dict[str, Verdict], source: str) -> None:
        with self._lock:
            changed = verdicts != self._verdicts
            self._verdicts = verdicts
            self.source = source
            subscribers = list(self._subscribers)
        if changed:
            for cb in subscribers:
                try:
                    cb()
                except Exception:
                    log.exception("verdict_subscriber_failed")

    def _run(self) -> None:
        backoff = _BACKOFF_FIRST_S
        while not self._stop.is_set():
            try:
                self._session()
                backoff = _BACKOFF_FIRST_S  # it was up: retry soon
            except (OSError, StreamError, ValueError) as exc:
                if self._said.due("down"):
                    log.warning("verdict_stream_down", path=str(self.socket_path), error=str(exc), source=self.source)
            if self.connected:
                self.connected = False
            with self._lock:
                if self.source == SOURCE_DAEMON:
                    self.source = SOURCE_LAST
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, _BACKOFF_MAX_S)
            self.reconnects += 1

    def _session(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = sock
        try:
            sock.settimeout(3 * KEEPALIVE_S)  # silence this long: the daemon is hung; reconnect
            sock.connect(str(self.socket_path))
            sock.sendall(json.dumps({"op": "watch", "version": WATCH_VERSION}).encode() + b"\n")
            reader = sock.makefile("rb")
            while not self._stop.is_set():
                line = reader.readline(64 * MAX_REQUEST)
                if not line:
                    raise OSError("the daemon closed the stream")
                verdicts = parse_message(json.loads(line))
                self.last_message = self._clock()
                self.messages += 1
                if not self.connected:
                    self.connected = True
                    if self._said.clear("down"):
                        log.info("verdict_stream_up", path=str(self.socket_path))
                if verdicts is not None:
                    self._set(verdicts, SOURCE_DAEMON)
        finally:
            self._sock = None
            sock.close()
