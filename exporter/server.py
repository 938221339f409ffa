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
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import structlog

from exporter import __version__
from exporter.render import CONTENT_TYPE, Exposition

log = structlog.get_logger("exporter.server")

MAX_HEADER_BYTES = 16 * 1024
IDLE_TIMEOUT_S = 60.0
SEND_BUFFER_BYTES = 1 << 20
# Below this, a plain send() is as cheap as sendfile() and needs no memfd round trip.
SENDFILE_MIN_BYTES = 32 * 1024

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


class _Response:
    """A whole /metrics response (head + body), in memory and in a memfd.

    One sendfile(2) per scrape sends it: the kernel references the pages
    instead of copying ~100 KB, and head and body leave as one stream instead
    of a small head segment followed by the body (which cost a full extra trip
    through the loopback TCP path per scrape; see docs/benchmarks.md)."""

    def __init__(self, data: bytes, head_len: int) -> None:
        self.data = data
        self.head_len = head_len
        self.fd = -1
        if hasattr(os, "memfd_create") and len(data) >= SENDFILE_MIN_BYTES:
            try:
                fd = os.memfd_create("gpu-health-exporter-metrics", os.MFD_CLOEXEC)
            except OSError:  # out of file descriptors: plain send() still works
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                os.close(fd)
                return
            self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
        self._cached: tuple[Exposition, dict[tuple[bool, bool], _Response]] | None = None
        self._retired: list[dict[tuple[bool, bool], _Response]] = []

    def metrics(self, gzip_ok: bool, head_only: bool, close: bool) -> bytes:
        """The response to GET (or HEAD) /metrics as bytes."""
        resp = self.metrics_response(gzip_ok, close)
        return resp.data[: resp.head_len] if head_only else resp.data

    def metrics_response(self, gzip_ok: bool, close: bool) -> _Response:
        """Head + body for the current exposition, built once per rendering and variant."""
        expo = self._exposition()
        cached = self._cached
        if cached is None or cached[0] is not expo:
            if cached is not None:
                # Keep the previous generations' files open a while: another loop
                # thread may be in the middle of a sendfile from them.
                self._retired.append(cached[1])
                while len(self._retired) > 2:
                    for old in self._retired.pop(0).values():
                        old.close()
            cached = (expo, {})
            self._cached = cached
        key = (gzip_ok, close)
        resp = cached[1].get(key)
        if resp is None:
            headers: tuple[tuple[str, str], ...] = (("Vary", "Accept-Encoding"),)
            if gzip_ok:
                headers += (("Content-Encoding", "gzip"),)
            body = expo.gzipped if gzip_ok else expo.plain
            head = build_response(Response(200, CONTENT_TYPE, body, headers), True, close)
            resp = cached[1][key] = _Response(head + body, len(head))
        return resp

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
        self._last_activity = 0.0
        self._peer = ""
        self._gone_logged = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A whole exposition (~100 KB) fits the kernel buffer in one send(), so asyncio
            # never has to copy the remainder into its own buffer and wait for writability.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""
        self._last_activity = self._loop.time()
        self._idle = self._loop.call_later(IDLE_TIMEOUT_S, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None
        # asyncio hands over the socket error that ended the connection (a reset seen by recv,
        # or by a send of the rest of a response); it logs nothing itself for OSErrors.
        if isinstance(exc, OSError):
            self._client_gone(exc)

    def _client_gone(self, exc: OSError) -> None:
        """The client reset or half-closed the connection mid-response: a scraper's timeout, an
        interrupted curl. Its business, not an error of ours: one debug line, no traceback."""
        transport, self._transport = self._transport, None  # no more answers for pipelined requests
        if transport is not None:
            transport.abort()  # drop whatever is still queued for it
        if not self._gone_logged:
            self._gone_logged = True
            log.debug("http_client_gone", peer=self._peer, error=f"{type(exc).__name__}: {exc}")

    def _check_idle(self) -> None:
        # One timer per connection, re-armed lazily: cheaper than re-arming per request.
        idle_for = self._loop.time() - self._last_activity
        if idle_for >= IDLE_TIMEOUT_S:
            self._close()
        else:
            self._idle = self._loop.call_later(IDLE_TIMEOUT_S - idle_for, self._check_idle)

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, status: int, why: str) -> None:
        if self._transport is not None:
            self._transport.write(build_response(text_response(status, why), close=True))
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        self._last_activity = self._loop.time()
        # Nothing more once closing (Connection: close, an error answer): asyncio would drop the
        # answers to pipelined requests anyway, and log a plain-text warning for each from the fifth.
        while self._transport is not None and not self._transport.is_closing():
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEADER_BYTES:
                    self._fail(431, "request headers too large")
                return
            head, self._buf = self._buf[:end], self._buf[end + 4 :]
            if not self._fast_metrics(head):
                self._handle(head)

    def _fast_metrics(self, head: bytes) -> bool:
        """The scrape path without full header parsing: a plain HTTP/1.1 GET of
        /metrics with no body. Anything unusual takes the general path."""
        if not head.startswith(b"GET /metrics HTTP/1.1\r\n"):
            return False
        low = head.lower()
        if b"content-length:" in low or b"transfer-encoding:" in low or b"\nconnection:" in low:
            return False
        if not all(b":" in line for line in low.split(b"\r\n")[1:]):
            return False  # malformed header line: the general path answers 400
        pos = low.find(b"\naccept-encoding:")
        gzip_ok = pos >= 0 and b"gzip" in low[pos : low.find(b"\n", pos + 1) if low.find(b"\n", pos + 1) > 0 else None]
        self._send(self._routes.metrics_response(gzip_ok, False))
        return True

    def _send(self, resp: _Response) -> None:
        """One sendfile() straight from the memfd when asyncio has nothing queued
        for this connection (ordering); what the kernel does not take at once
        goes through the transport."""
        transport = self._transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        size = len(resp.data)
        if sock is None or resp.fd < 0 or size < SENDFILE_MIN_BYTES or transport.get_write_buffer_size():
            transport.write(resp.data)
            return
        try:
            sent = os.sendfile(sock.fileno(), resp.fd, 0, size)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except ConnectionError as exc:  # reset (or shut down) before we could answer
            self._client_gone(exc)
            return
        if sent < size:
            transport.write(memoryview(resp.data)[sent:])

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
                if head_only:
                    transport.write(self._routes.metrics(gzip_ok, True, close))
                else:
                    self._send(self._routes.metrics_response(gzip_ok, close))
            else:
                transport.write(build_response(self._routes.dispatch(path), head_only, close))
        except Exception:  # a bug in one handler answers 500, never kills the server
            log.exception("http_handler_failed", path=path)
            transport.write(build_response(text_response(500, "internal error"), close=True))
            close = True
        if close:
            transport.close()


class HttpServer:
    """Serves on `loops` event loops, each in its own thread, sharing the listening sockets.

    The per-request work is tiny; what costs is copying ~100 KB into the kernel per
    scrape, and socket sends release the GIL, so a second loop lets two copies overlap.
    """

    def __init__(self, host: str, port: int, routes: Routes, loops: int = 2) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self._loops = [asyncio.new_event_loop() for _ in range(max(1, loops))]
        self._servers: list[asyncio.base_events.Server] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Bind now (so a busy port fails at start-up), then serve in threads."""
        first = self._loops[0]
        host = self.host or None  # "" = every address, IPv4 and IPv6
        server = first.run_until_complete(
            first.create_server(
                lambda: _HttpProtocol(self.routes, first),
                host=host,
                port=self.port,
                reuse_address=True,
                backlog=1024,
            )
        )
        self._servers.append(server)
        listening = list(server.sockets)
        self.port = listening[0].getsockname()[1]
        for sock in listening:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for loop in self._loops[1:]:
            for sock in listening:
                # Same listening socket, another loop: the kernel hands each new
                # connection to whichever loop accepts first.
                shared = socket.socket(fileno=os.dup(sock.fileno()))
                self._servers.append(
                    loop.run_until_complete(loop.create_server(self._factory(loop), sock=shared, backlog=1024))
                )
        for i, loop in enumerate(self._loops):
            t = threading.Thread(target=loop.run_forever, name=f"http-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _factory(self, loop: asyncio.AbstractEventLoop) -> Callable[[], _HttpProtocol]:
        return lambda: _HttpProtocol(self.routes, loop)

    def stop(self) -> None:
        for server in self._servers:
            server.get_loop().call_soon_threadsafe(server.close)
        for loop in self._loops:
            loop.call_soon_threadsafe(loop.stop)
        for t in self._threads:
            t.join(timeout=5)
        for loop, t in zip(self._loops, self._threads, strict=False):  # no threads if start() failed
            # Closed here, not left to the garbage collector: collected in a cycle with its
            # transports, a loop may find its self-pipe already closed and raise from __del__.
            if not t.is_alive():
                loop.close()
