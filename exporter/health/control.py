"""The node-local control channel: a unix socket (mode 0600) in the state dir.

Protocol: the client sends one JSON object terminated by a newline; the server answers one JSON
object and a newline, then closes. Requests: {"op": "list"} and
{"op": "clear", "target": "<uuid|index|all>", "reason": "..."}. Answers carry "ok" and either the
result or "error". Access control is the file mode: only root (or the daemon's user) can connect.

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
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import structlog

log = structlog.get_logger()

MAX_REQUEST = 64 * 1024
CONTROL_SOCKET = "control.sock"  # in the state dir
Handler = Callable[[dict[str, Any]], dict[str, Any]]
NOT_LOADED = "starting: the health state is not loaded yet; retry"


class Controlled(Protocol):
    """What the control socket drives (HealthEngine)."""

    def clear(self, target: str, reason: str) -> list[str]: ...

    def list(self) -> list[dict[str, Any]]: ...  # last: a method named list shadows the type below it


def respond(target: Controlled, req: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request; a bad one gets {"ok": False, "error": ...}."""
    op = req.get("op")
    if op == "list":
        return {"ok": True, "devices": target.list()}
    if op == "clear":
        what, reason = req.get("target"), req.get("reason")
        if not isinstance(what, str) or not isinstance(reason, str):
            return {"ok": False, "error": "clear needs string 'target' and 'reason'"}
        try:
            return {"ok": True, "cleared": target.clear(what, reason)}
        except ValueError as e:
            return {"ok": False, "error": str(e)}
    return {"ok": False, "error": f"unknown op {op!r}"}


def handler(target: Controlled, ready: Callable[[], bool]) -> Handler:
    """respond() once `ready()`; before that (the socket is up a moment before the state file is
    read) every request is told to retry."""

    def handle(req: dict[str, Any]) -> dict[str, Any]:
        if not ready():
            return {"ok": False, "error": NOT_LOADED}
        return respond(target, req)

    return handle


class ControlError(Exception):
    """The control channel cannot be served or reached."""


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handler: Handler

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
            resp = self.server.handler(req)
        except (ValueError, OSError) as e:
            resp = {"ok": False, "error": f"bad request: {e}"}
        except Exception as e:  # never let a bad request kill the server thread silently
            log.exception("health_control_failed")
            resp = {"ok": False, "error": f"internal error: {e}"}
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(resp).encode() + b"\n")


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
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
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
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="health-control", daemon=True)
        self._thread.start()
        log.info("health_control_listening", path=str(self.path))

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()


def request(path: Path, req: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """Send one request; raises ControlError when no daemon answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise ControlError(f"no daemon is listening on {path} ({e.strerror or e})") from e
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
