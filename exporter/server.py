"""The HTTP server: a small asyncio HTTP/1.1 server in its own thread.

It only ever hands out bytes that were rendered in the collection loop, so a
scrape costs a dictionary lookup and a socket write: no NVML call, no
rendering, and any number of concurrent scrapes share one rendering.
http.server was measured far slower under concurrent scrapes (see
docs/benchmarks.md); this keeps keep-alive connections and pre-built
response headers.
"""

from __future__ import annotations

import asyncio
import html
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from exporter import __version__
from exporter.render import CONTENT_TYPE, Exposition

log = structlog.get_logger("exporter.server")

MAX_HEADER_BYTES = 16 * 1024
IDLE_TIMEOUT_S = 60.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def build_response(resp: Response, head_only: bool = False, close: bool = False) -> bytes:
    lines = [
        f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}",
        f"Content-Type: {resp.content_type}",
        f"Content-Length: {len(resp.body)}",
    ]
    lines += [f"{k}: {v}" for k, v in resp.headers]
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + resp.body


def text_response(status: int, text: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", (text + "\n").encode())


class Routes:
    """What the server serves; the app provides the callables."""

    def __init__(
        self,
        exposition: Callable[[], Exposition],
        health: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
        gpus_json: Callable[[], bytes] | None = None,
    ) -> None:
        self._exposition = exposition
        self._health = health
        self._ready = ready
        self._gpus_json = gpus_json
        self._cached: tuple[Exposition, dict[tuple[bool, bool, bool], bytes]] | None = None

    def metrics(self, gzip_ok: bool, head_only: bool, close: bool) -> bytes:
        expo = self._exposition()
        cached = self._cached
        if cached is None or cached[0] is not expo:
            cached = (expo, {})
            self._cached = cached
        key = (gzip_ok, head_only, close)
        raw = cached[1].get(key)
        if raw is None:
            headers: tuple[tuple[str, str], ...] = (("Vary", "Accept-Encoding"),)
            if gzip_ok:
                headers += (("Content-Encoding", "gzip"),)
            body = expo.gzipped if gzip_ok else expo.plain
            raw = build_response(Response(200, CONTENT_TYPE, body, headers), head_only, close)
            cached[1][key] = raw
        return raw

    def dispatch(self, path: str) -> Response:
        if path == "/health":
            ok, why = self._health()
            return text_response(200 if ok else 503, why)
        if path == "/ready":
            ok, why = self._ready()
            return text_response(200 if ok else 503, why)
        if path == "/gpus":
            if self._gpus_json is None:
                return text_response(404, "health engine not running")
            return Response(200, "application/json", self._gpus_json())
        if path == "/":
            return Response(200, "text/html; charset=utf-8", LANDING_PAGE)
        return text_response(404, f"not found: {path}")


LANDING_PAGE = f"""<!DOCTYPE html>
<html><head><title>gpu-health-exporter</title></head>
<body><h1>gpu-health-exporter {html.escape(__version__)}</h1>
<p>GPU health and DCGM-compatible metrics from NVML.</p>
<ul>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
<li><a href="/health">/health</a>: liveness</li>
<li><a href="/ready">/ready</a>: readiness</li>
<li><a href="/gpus">/gpus</a>: per-GPU health verdicts (JSON)</li>
</ul>
<p>Docs: <a href="https://github.com/gpu-health-exporter/gpu-health-exporter">project page</a></p>
</body></html>
""".encode()


class _HttpProtocol(asyncio.Protocol):
    def __init__(self, routes: Routes, loop: asyncio.AbstractEventLoop) -> None:
        self._routes = routes
        self._loop = loop
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(IDLE_TIMEOUT_S, self._close)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, status: int, why: str) -> None:
        if self._transport is not None:
            self._transport.write(build_response(text_response(status, why), close=True))
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._arm_idle()
        while self._transport is not None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEADER_BYTES:
                    self._fail(431, "request headers too large")
                return
            head, self._buf = self._buf[:end], self._buf[end + 4 :]
            self._handle(head)

    def _handle(self, head: bytes) -> None:
        transport = self._transport
        assert transport is not None
        try:
            text = head.decode("latin-1")
            request_line, *header_lines = text.split("\r\n")
            method, target, version = request_line.split(" ")
        except ValueError:
            self._fail(400, "malformed request line")
            return
        if not version.startswith("HTTP/1."):
            self._fail(400, f"unsupported protocol {version!r}")
            return
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                self._fail(400, "malformed header line")
                return
            headers[name.strip().lower()] = value.strip()
        conn = headers.get("connection", "").lower()
        close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            close = True  # we never read request bodies; don't misparse them as requests
        if method not in ("GET", "HEAD"):
            transport.write(
                build_response(
                    Response(405, "text/plain; charset=utf-8", b"only GET and HEAD\n", (("Allow", "GET, HEAD"),)),
                    close=True,
                )
            )
            transport.close()
            return
        path = target.split("?", 1)[0]
        head_only = method == "HEAD"
        try:
            if path == "/metrics":
                gzip_ok = "gzip" in headers.get("accept-encoding", "")
                transport.write(self._routes.metrics(gzip_ok, head_only, close))
            else:
                transport.write(build_response(self._routes.dispatch(path), head_only, close))
        except Exception:  # a bug in one handler answers 500, never kills the server
            log.exception("http_handler_failed", path=path)
            transport.write(build_response(text_response(500, "internal error"), close=True))
            close = True
        if close:
            transport.close()


class HttpServer:
    def __init__(self, host: str, port: int, routes: Routes) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind now (so a busy port fails at start-up), then serve in a thread."""
        host = self.host or None  # "" = every address, IPv4 and IPv6
        coro = self._loop.create_server(
            lambda: _HttpProtocol(self.routes, self._loop),
            host=host,
            port=self.port,
            reuse_address=True,
            backlog=1024,
        )
        self._server = self._loop.run_until_complete(coro)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        for s in self._server.sockets:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._thread = threading.Thread(target=self._loop.run_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        def _shutdown() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(_shutdown)
        if self._thread is not None:
            self._thread.join(timeout=5)
