"""The node-local control channel: a unix socket (mode 0600) in the state dir.

Protocol: the client sends one JSON object terminated by a newline; the server answers one JSON
object and a newline, then closes. Requests: {"op": "list"} and
{"op": "clear", "target": "<uuid|index|all>", "reason": "..."}. Answers carry "ok" and either the
result or "error". Access control is the file mode: only root (or the daemon's user) can connect.
Every clear is logged with the peer's uid and pid as the kernel reports them (SO_PEERCRED), not
as the client says: who cleared a fence is an audit fact.

{"op": "watch"} is the verdict stream (docs/verdict-stream.md, a public versioned interface): the
connection stays open and the server writes one line with every device's verdict at once, again
after every change, and a keepalive line every KEEPALIVE_S while nothing changes, until the client
disconnects. `WatchHub` subscribes to the engine once and wakes every watcher.

The requests are answered here (respond) from the engine's plain list() and clear(); the engine only
starts and stops the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

log = structlog.get_logger()

MAX_REQUEST = 64 * 1024
CONTROL_SOCKET = "control.sock"  # in the state dir
# Connections waiting to be accepted. socketserver's default of 5 made a burst of 20 CLI calls fail
# with EAGAIN; the kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 128
# How long a client keeps trying while the backlog is full (EAGAIN) before it gives up.
CONNECT_RETRY_S = 3.0


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a control connection, as the kernel says (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer | None:
    """The connecting process's credentials; None where the platform has no SO_PEERCRED."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    except OSError:
        return None
    return Peer(pid, uid, gid)


Handler = Callable[[dict[str, Any], "Peer | None"], dict[str, Any]]
NOT_LOADED = "starting: the health state is not loaded yet; retry"


WATCH_VERSION = 1
KEEPALIVE_S = 5.0  # a watcher that hears nothing for 3x this knows the daemon is hung


class Controlled(Protocol):
    """What the control socket drives (HealthEngine)."""

    def clear(self, target: str, reason: str, *, peer: Peer | None = None) -> list[str]: ...

    def list(self) -> list[dict[str, Any]]: ...  # last: a method named list shadows the type below it


class Watched(Protocol):
    """What the watch op streams (HealthEngine): the verdicts, and word when they change."""

    def subscribe(self, callback: Callable[[], None]) -> None: ...

    def list(self) -> list[dict[str, Any]]: ...


class WatchHub:
    """Fans the engine's change notifications out to every open watch connection.

    The engine has no unsubscribe; the hub subscribes once and keeps a generation number that
    each watcher compares with the last one it sent."""

    def __init__(self, target: Watched) -> None:
        self._cond = threading.Condition()
        self.generation = 0
        target.subscribe(self._changed)

    def _changed(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait_change(self, seen: int, timeout_s: float) -> int:
        """The generation once it differs from `seen`, or `seen` after `timeout_s`."""
        with self._cond:
            self._cond.wait_for(lambda: self.generation != seen, timeout_s)
            return self.generation


def watch_message(devices: list[dict[str, Any]], seq: int) -> dict[str, Any]:
    """One full verdict message of the stream (docs/verdict-stream.md)."""
    return {"ok": True, "version": WATCH_VERSION, "seq": seq, "devices": [_with_since(d) for d in devices]}


def _with_since(device: dict[str, Any]) -> dict[str, Any]:
    """`since`: when the device entered its current state (the first reason that makes it), None when healthy."""
    firsts = [r["first_seen"] for r in device.get("reasons", ()) if r.get("state") == device.get("state")]
    return {**device, "since": min(firsts) if firsts else None}


def respond(target: Controlled, req: dict[str, Any], peer: Peer | None = None) -> dict[str, Any]:
    """The answer to one request from `peer`; a bad one gets {"ok": False, "error": ...}."""
    op = req.get("op")
    if op == "list":
        return {"ok": True, "devices": target.list()}
    if op == "clear":
        what, reason = req.get("target"), req.get("reason")
        if not isinstance(what, str) or not isinstance(reason, str):
            return {"ok": False, "error": "clear needs string 'target' and 'reason'"}
        try:
            return {"ok": True, "cleared": target.clear(what, reason, peer=peer)}
        except ValueError as e:
            return {"ok": False, "error": str(e)}
    return {"ok": False, "error": f"unknown op {op!r}"}


def handler(target: Controlled, ready: Callable[[], bool]) -> Handler:
    """respond() once `ready()`; before that (the socket is up a moment before the state file is
    read) every request is told to retry."""

    def handle(req: dict[str, Any], peer: Peer | None = None) -> dict[str, Any]:
        if not ready():
            return {"ok": False, "error": NOT_LOADED}
        return respond(target, req, peer)

    return handle


class Watcher:
    """Serves the watch op: what a connection needs to stream verdicts."""

    def __init__(self, target: Watched, ready: Callable[[], bool]) -> None:
        self.target = target
        self.ready = ready
        self.hub = WatchHub(target)

    def stream(self, write: Callable[[dict[str, Any]], bool], stopping: Callable[[], bool]) -> None:
        """Write the full verdicts, again on each change, keepalives between; until `write` fails."""
        if not self.ready():
            write({"ok": False, "error": NOT_LOADED})
            return
        seq = 0
        seen = self.hub.generation
        while not stopping():
            seq += 1
            if not write(watch_message(self.target.list(), seq)):
                return
            while not stopping():
                now = self.hub.wait_change(seen, KEEPALIVE_S)
                if now != seen:
                    seen = now
                    break
                if not write({"ok": True, "version": WATCH_VERSION, "seq": seq, "keepalive": True}):
                    return


class ControlError(Exception):
    """The control channel cannot be served or reached."""


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG
    handler: Handler
    watcher: Watcher | None = None
    closing = False
    watching: set[socket.socket]  # open watch connections, cut at stop so watchers see the end at once

    def server_bind(self) -> None:
        super().server_bind()
        # Restrict before listen(): nobody can connect between bind and this chmod.
        os.chmod(str(self.server_address), 0o600)


class _RequestHandler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.connection.settimeout(10)
        try:
            line = self.rfile.readline(MAX_REQUEST)
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("request is not a JSON object")
            if req.get("op") == "watch" and self.server.watcher is not None:
                if req.get("version", WATCH_VERSION) != WATCH_VERSION:
                    self._send({"ok": False, "error": f"watch version {req.get('version')!r}: this daemon speaks 1"})
                    return
                self.server.watching.add(self.connection)
                try:
                    self.server.watcher.stream(self._send, lambda: self.server.closing)
                finally:
                    self.server.watching.discard(self.connection)
                return
            resp = self.server.handler(req, peer_credentials(self.connection))
        except (ValueError, OSError) as e:
            resp = {"ok": False, "error": f"bad request: {e}"}
        except Exception as e:  # never let a bad request kill the server thread silently
            log.exception("health_control_failed")
            resp = {"ok": False, "error": f"internal error: {e}"}
        self._send(resp)

    def _send(self, message: dict[str, Any]) -> bool:
        """Write one line; False once the client is gone (or too slow to read for 10 s)."""
        try:
            self.wfile.write(json.dumps(message).encode() + b"\n")
            self.wfile.flush()
        except OSError:
            return False
        return True


def _is_live(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlServer:
    def __init__(self, path: Path, handler: Handler, watcher: Watcher | None = None) -> None:
        self.path = path
        self._handler = handler
        self._watcher = watcher
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ControlError(f"{self.path} exists and is not a socket; refusing to replace it")
            if _is_live(self.path):
                raise ControlError(f"another daemon is serving {self.path}; two exporters must not share a state dir")
            self.path.unlink()  # left behind by a daemon that died
        try:
            server = _Server(str(self.path), _RequestHandler)
        except OSError as e:
            raise ControlError(f"cannot listen on {self.path}: {e}") from e
        server.handler = self._handler
        server.watcher = self._watcher
        server.watching = set()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="health-control", daemon=True)
        self._thread.start()
        log.info("health_control_listening", path=str(self.path))

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.closing = True
        for conn in list(self._server.watching):  # watchers hear the daemon go now, not at the next keepalive
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def _connect(path: Path, timeout_s: float) -> socket.socket:
    """A connected socket. A full backlog (EAGAIN: many clients at once) is retried for a while; no
    listener at all (ENOENT, ECONNREFUSED) is not, since waiting would not change that."""
    deadline = time.monotonic() + CONNECT_RETRY_S
    pause = 0.005
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout_s)
        try:
            s.connect(str(path))
            return s
        except BlockingIOError as e:  # EAGAIN
            s.close()
            if time.monotonic() + pause > deadline:
                raise ControlError(f"the daemon on {path} is too busy to accept ({e.strerror or e})") from e
        except OSError as e:
            s.close()
            raise ControlError(f"no daemon is listening on {path} ({e.strerror or e})") from e
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def request(path: Path, req: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request; raises ControlError when no daemon answers."""
    s = _connect(path, timeout_s)
    try:
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        raise ControlError(f"control request to {path} failed: {e}") from e
    finally:
        s.close()
    try:
        resp = json.loads(buf)
    except ValueError as e:
        raise ControlError(f"unreadable answer from {path}: {e}") from e
    if not isinstance(resp, dict):
        raise ControlError(f"unexpected answer from {path}: {resp!r}")
    return resp
