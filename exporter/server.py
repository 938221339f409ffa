"""The HTTP server: one asyncio event loop in its own thread, one request parser (exporter/web/request.py),
optional TLS and basic auth from an exporter-toolkit web configuration (exporter/web/).

It only ever hands out bytes rendered in the collection loop, so a scrape costs a parse, a dictionary
lookup and a socket write: no NVML call, no rendering. Every client is bounded (docs/security.md):
- a deadline for a complete request head, from the connection's start or the request's first byte, that
  no trickle of bytes extends; an idle timeout between keep-alive requests;
- at most `max_connections` open; a new one beyond it closes the oldest idle one first;
- one response in flight per connection: the next pipelined request is read only once the previous
  response has left our buffers, so a peer that does not read costs one response, not thousands;
- the request head's size, line length and field count, checked on what was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, cast

import structlog

from exporter import __version__
from exporter.render import CONTENT_TYPE, Exposition
from exporter.web.request import HttpError, Request, check_incomplete, find_head_end, parse_head
from exporter.web.settings import HttpSettings

if TYPE_CHECKING:  # the web configuration's modules are imported only when a file is given
    from exporter.config import Config
    from exporter.web.source import ActiveWeb

log = structlog.get_logger("exporter.server")

# A whole exposition (~100 KB) fits the kernel buffer in one send(): no copy into asyncio's buffer.
SEND_BUFFER_BYTES = 1 << 20
# What one write hands to the transport: a large exposition leaves in slices as the peer reads, so a slow
# reader holds at most one slice in our memory, not a copy of the whole response.
WRITE_CHUNK_BYTES = 256 * 1024
PROBE_PATHS = ("/health", "/ready")
_HEAD_CACHE_SIZE = 128

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value (RFC 9110 section 6.6.1), formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def build_head(resp: Response, connection: str | None, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [
        f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Status')}",
        f"Date: {http_date()}",
        f"Content-Type: {resp.content_type}",
        f"Content-Length: {len(resp.body)}",
    ]
    lines += [f"{k}: {v}" for k, v in (*resp.headers, *extra)]
    if connection:
        lines.append(f"Connection: {connection}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def build_response(
    resp: Response, head_only: bool = False, connection: str | None = None, extra: tuple[tuple[str, str], ...] = ()
) -> bytes:
    head = build_head(resp, connection, extra)
    return head if head_only else head + resp.body


def text_response(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, "text/plain; charset=utf-8", (text + "\n").encode(), headers)


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
        # (exposition, date) -> variant -> (head + body, head length): built once per rendering, variant and
        # second (the Date header), then shared by every scrape.
        self._cached: tuple[Exposition, str, dict[Any, tuple[bytes, int]]] | None = None

    def metrics(
        self, gzip_ok: bool, connection: str | None, extra: tuple[tuple[str, str], ...] = ()
    ) -> tuple[bytes, int]:
        """(head + body, head length) of the response to GET /metrics."""
        expo = self._exposition()
        date = http_date()
        cached = self._cached
        if cached is None or cached[0] is not expo or cached[1] != date:
            cached = self._cached = (expo, date, {})
        key = (gzip_ok, connection, extra)
        found = cached[2].get(key)
        if found is None:
            headers: tuple[tuple[str, str], ...] = (("Vary", "Accept-Encoding"),)
            if gzip_ok:
                headers += (("Content-Encoding", "gzip"),)
            body = expo.gzipped if gzip_ok else expo.plain
            head = build_head(Response(200, CONTENT_TYPE, body, headers), connection, extra)
            found = cached[2][key] = (head + body, len(head))
        return found

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
        # The path is never echoed: it is the client's text, of any length.
        return text_response(404, "not found")


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


class _Table:
    """Every open connection, and the idle ones in the order they went idle (oldest first)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[_Connection, None] = {}
        self.idle: dict[_Connection, None] = {}
        self.heads: dict[_Connection, None] = {}  # a request head under way

    def admit(self, conn: _Connection) -> bool:
        """Make room for `conn`: the oldest idle connection goes first, then the oldest unfinished head."""
        while len(self.open) >= self.limit:
            victims = self.idle or self.heads
            if not victims:
                return False  # every connection is mid-response: refuse the new one
            victim = next(iter(victims))
            victim.evict()
        self.open[conn] = None
        self.idle[conn] = None
        return True

    def set_idle(self, conn: _Connection) -> None:
        self.heads.pop(conn, None)
        self.idle.pop(conn, None)
        self.idle[conn] = None  # to the end: most recently idle

    def set_head(self, conn: _Connection) -> None:
        self.idle.pop(conn, None)
        self.heads.pop(conn, None)
        self.heads[conn] = None

    def set_busy(self, conn: _Connection) -> None:
        self.idle.pop(conn, None)
        self.heads.pop(conn, None)

    def remove(self, conn: _Connection) -> None:
        self.open.pop(conn, None)
        self.set_busy(conn)


_IDLE, _HEAD, _BUSY, _CLOSED = range(4)


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._settings = server.settings
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._scan = 0
        self._phase = _IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline: float | None = None
        self._deadline_kind = _HEAD
        self._paused = False
        self._out: memoryview | None = None
        self._close_after = False
        self._peer = ""
        self._cert_refusal: str | None = None
        self._tls = False
        self._handshaking: asyncio.Transport | None = None
        self._gone_logged = False

    # --- life cycle ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""
        if not self._server.table.admit(self):
            log.debug("http_connection_refused", peer=self._peer, why="every connection is mid-response")
            raw.abort()
            self._phase = _CLOSED
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        # From the connection's start: a client that connects and sends nothing (or a handshake that never
        # ends) is closed at the head deadline, not after the idle timeout.
        self._set_deadline(self._settings.header_timeout_s, _HEAD)
        web = self._server.web_refresh()
        if web is not None and web.ssl_context is not None:
            raw.pause_reading()
            # No _transport until the handshake ends: a request that arrives with the last handshake
            # record is buffered, and answered through TLS (never in plain text on the raw socket).
            self._handshaking = raw  # eviction and stop close this one meanwhile
            self._server.spawn(self._start_tls(raw, web))
            return
        self._ready(raw)

    async def _start_tls(self, raw: asyncio.Transport, web: ActiveWeb) -> None:
        assert web.ssl_context is not None
        try:
            tls = await self._loop.start_tls(
                raw, self, web.ssl_context, server_side=True, ssl_handshake_timeout=self._settings.header_timeout_s
            )
        except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("http_tls_handshake_failed", peer=self._peer, error=f"{type(exc).__name__}: {exc}")
            self._gone()
            raw.abort()
            return
        if self._phase == _CLOSED or tls is None:
            if tls is not None:
                tls.abort()
            return
        self._cert_refusal = web.cert_rule.refusal(tls.get_extra_info("peercert"))
        if self._cert_refusal is not None and not self._settings.unauthenticated_probes:
            # Go refuses these in the handshake (VerifyPeerCertificate); right after it is the same here.
            log.debug("http_client_certificate_refused", peer=self._peer, why=self._cert_refusal)
            tls.abort()
            self._gone()
            return
        self._ready(tls)

    def _ready(self, transport: asyncio.Transport) -> None:
        self._handshaking = None
        self._transport = transport
        self._tls = transport.get_extra_info("sslcontext") is not None
        # pause_writing at any buffered byte, resume_writing when drained: the one-response-in-flight rule.
        transport.set_write_buffer_limits(high=0, low=0)
        if self._buf:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):
            self._client_gone(exc)
        self._gone()

    def _gone(self) -> None:
        self._phase = _CLOSED
        self._transport = None
        self._handshaking = None
        self._out = None
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._server.table.remove(self)

    def _client_gone(self, exc: OSError) -> None:
        """A reset or a broken pipe: a scraper's timeout, an interrupted curl. The client's business, not
        an error of ours: one debug line, no traceback."""
        if not self._gone_logged:
            self._gone_logged = True
            log.debug("http_client_gone", peer=self._peer, error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        transport = self._transport or self._handshaking
        if transport is not None:
            transport.close()
        self._gone()

    def evict(self) -> None:
        log.debug("http_connection_evicted", peer=self._peer, why="connection limit")
        self.close()

    # --- deadlines ---
    # One deadline per connection and one timer, re-armed only when the deadline moves earlier: a request
    # that arrives whole costs no timer operation.
    def _set_deadline(self, seconds: float, kind: int) -> None:
        at = self._loop.time() + seconds
        self._deadline, self._deadline_kind = at, kind
        if self._timer is None or self._timer_at > at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = self._loop.call_at(at, self._on_timer), at

    def _on_timer(self) -> None:
        self._timer = None
        if self._deadline is None or self._phase == _CLOSED:
            return
        if self._loop.time() < self._deadline:
            self._timer, self._timer_at = self._loop.call_at(self._deadline, self._on_timer), self._deadline
            return
        self._deadline = None
        if self._deadline_kind == _HEAD and self._buf.strip() and self._transport is not None:
            log.debug("http_request_head_timeout", peer=self._peer, received=len(self._buf))
            self._answer_error(HttpError(408, "request head not complete in time"))
            return
        if self._deadline_kind == _BUSY:
            log.debug("http_response_timeout", peer=self._peer, why="the client does not read")
            transport = self._transport
            if transport is not None:
                transport.abort()  # what is queued for it cannot leave: drop it
            self._gone()
            return
        self.close()

    def _pause(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    # --- reading ---
    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._phase in (_IDLE, _HEAD) and self._transport is not None:
            self._process()

    def eof_received(self) -> bool | None:
        # A half-close: answer what was asked if a response is under way, then close.
        self._close_after = True
        if self._phase != _BUSY:
            self.close()
        return None if self._tls else True  # asyncio's TLS transport cannot stay half-open

    def _process(self) -> None:
        """Serve the requests in the buffer, one at a time, until one is incomplete or a response waits."""
        while self._transport is not None and self._phase in (_IDLE, _HEAD):
            if self._phase == _IDLE:
                # An empty line before a request line is ignored (RFC 9112 section 2.2).
                while self._buf and self._buf[0] in (0x0D, 0x0A):
                    del self._buf[:1]
                if not self._buf:
                    if self._close_after:
                        self.close()
                        return
                    self._server.table.set_idle(self)
                    self._set_deadline(self._settings.idle_timeout_s, _IDLE)
                    self._resume()
                    return
                self._phase = _HEAD
            end, resume = find_head_end(self._buf, self._scan)
            try:
                if end < 0:
                    self._scan = resume
                    check_incomplete(self._buf, self._settings.max_header_bytes)
                    if self._deadline_kind != _HEAD or self._deadline is None:
                        # From the request's first byte; more bytes never move it.
                        self._server.table.set_head(self)
                        self._set_deadline(self._settings.header_timeout_s, _HEAD)
                    self._resume()
                    return
                head = bytes(self._buf[:end])
                del self._buf[:resume]
                self._scan = 0
                request = self._server.parse(head)
            except HttpError as err:
                self._answer_error(err)
                return
            self._phase = _BUSY
            self._server.table.set_busy(self)
            # Until this response has left: a peer that stops reading holds one response, then is closed.
            self._set_deadline(self._settings.idle_timeout_s, _BUSY)
            try:
                self._serve(request)
            except Exception:  # a bug in one handler answers 500, never kills the server
                log.exception("http_handler_failed", path=request.path)
                self._send(build_response(text_response(500, "internal error"), connection="close"), close=True)
            if self._phase == _BUSY:
                self._pause()  # the next request is read once this response has drained

    # --- answering ---
    def _serve(self, req: Request) -> None:
        web = self._server.web_for_request()
        extra = web.headers if web is not None else ()
        if req.method not in ("GET", "HEAD"):
            allow = (("Allow", "GET, HEAD"),)
            self._send(build_response(text_response(405, "only GET and HEAD", allow), False, "close", extra), True)
            return
        if web is not None:
            if web.limiter is not None and not web.limiter.take():
                self._reply(req, text_response(429, "too many requests"), extra)
                return
            if not (self._settings.unauthenticated_probes and req.path in PROBE_PATHS):
                if self._cert_refusal is not None:
                    self._reply(req, text_response(403, self._cert_refusal), extra)
                    return
                if web.auth.enabled and not self._authorized(req, web, extra):
                    return
        self._answer(req, extra)

    def _authorized(self, req: Request, web: ActiveWeb, extra: tuple[tuple[str, str], ...]) -> bool:
        """True to answer now; False when refused here or when bcrypt runs (the answer follows)."""
        from exporter.web.basicauth import parse_basic

        credentials = parse_basic(req.headers.get("authorization", ""))
        known = web.auth.cached(credentials) if credentials is not None else False
        if known is None:
            assert credentials is not None

            def checked(ok: bool) -> None:
                # RuntimeError: the server stopped while bcrypt ran, nobody is left to answer.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._after_auth, req, ok, extra)

            web.auth.check(credentials, checked)
            return False
        if not known:
            self._unauthorized(req, extra)
        return known

    def _after_auth(self, req: Request, ok: bool, extra: tuple[tuple[str, str], ...]) -> None:
        if self._transport is None:
            return
        if ok:
            self._answer(req, extra)
        else:
            self._unauthorized(req, extra)
        self._continue()

    def _unauthorized(self, req: Request, extra: tuple[tuple[str, str], ...]) -> None:
        self._reply(req, text_response(401, "Unauthorized", (("WWW-Authenticate", "Basic"),)), extra)

    def _answer(self, req: Request, extra: tuple[tuple[str, str], ...]) -> None:
        connection = _connection_header(req)
        if req.path == "/metrics":
            data, head_len = self._server.routes.metrics(req.gzip, connection, extra)
            self._send(data[:head_len] if req.method == "HEAD" else data, not req.keep_alive)
            return
        self._reply(req, self._server.routes.dispatch(req.path), extra)

    def _reply(self, req: Request, resp: Response, extra: tuple[tuple[str, str], ...]) -> None:
        data = build_response(resp, req.method == "HEAD", _connection_header(req), extra)
        self._send(data, not req.keep_alive)

    def _answer_error(self, err: HttpError) -> None:
        web = self._server.web
        extra = web.headers if web is not None else ()
        self._phase = _BUSY
        self._server.table.set_busy(self)
        self._set_deadline(self._settings.idle_timeout_s, _BUSY)
        self._buf.clear()  # nothing after a malformed request can be trusted to be a request
        self._pause()
        self._send(build_response(text_response(err.status, err.reason), False, "close", extra), close=True)

    def _send(self, data: bytes, close: bool) -> None:
        self._out = memoryview(data)
        self._close_after = self._close_after or close
        self._pump()

    def _pump(self) -> None:
        """Hand the response to the transport a slice at a time, each once the previous one has drained."""
        transport = self._transport
        while transport is not None and self._out is not None:
            if transport.is_closing():
                return  # the peer reset: connection_lost follows, and nothing more may be written
            if transport.get_write_buffer_size() > 0:
                return  # resume_writing continues
            if not self._out:
                self._out = None
                break
            chunk, self._out = self._out[:WRITE_CHUNK_BYTES], self._out[WRITE_CHUNK_BYTES:]
            transport.write(chunk)
        if transport is None or self._phase == _CLOSED:
            return
        if self._close_after:
            self.close()
            return
        self._phase = _IDLE

    def pause_writing(self) -> None:
        pass  # _pump looks at the buffer itself; this only says resume_writing will come

    def resume_writing(self) -> None:
        if self._phase == _BUSY and self._out is not None:
            self._pump()
            self._continue()

    def _continue(self) -> None:
        if self._phase == _IDLE:
            self._process()


def _connection_header(req: Request) -> str | None:
    if not req.keep_alive:
        return "close"
    return "keep-alive" if req.http10 else None  # HTTP/1.0 keep-alive is echoed, 1.1 is the default


class HttpServer:
    """Serves on one event loop in its own thread."""

    def __init__(self, host: str, port: int, routes: Routes, *, settings: HttpSettings | None = None) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        self.settings = settings or HttpSettings()
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_loop_exception)
        self.table = _Table(self.settings.max_connections)
        self._servers: list[asyncio.base_events.Server] = []
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._heads: dict[bytes, Request] = {}
        self.web: ActiveWeb | None = self.settings.web.active if self.settings.web is not None else None
        self._web_checked = 0.0

    @classmethod
    def for_config(cls, cfg: Config, routes: Routes) -> HttpServer:
        """The server the flags ask for; ConfigError (exit 2) for a bad web configuration."""
        return cls(*cfg.address, routes, settings=HttpSettings.from_config(cfg))

    def web_refresh(self) -> ActiveWeb | None:
        """The web configuration for a new connection, re-read if its files changed."""
        if self.settings.web is not None:
            self._web_checked = self.loop.time()
            self.web = self.settings.web.refresh()
        return self.web

    def web_for_request(self) -> ActiveWeb | None:
        """The web configuration for a request on an open connection: users and headers changed in the
        file apply to keep-alive connections too (exporter-toolkit reads them per request), looked at
        at most once a second."""
        if self.settings.web is not None:
            now = self.loop.time()
            if now - self._web_checked >= 1.0:
                self._web_checked = now
                self.web = self.settings.web.refresh()
        return self.web

    def parse(self, head: bytes) -> Request:
        """parse_head, remembered per distinct head: a scraper sends the same bytes every time."""
        found = self._heads.get(head)
        if found is not None:
            return found
        request = parse_head(head, self.settings.max_header_bytes)
        if len(head) <= 2048 and b"uthorization" not in head:  # credentials are not kept
            if len(self._heads) >= _HEAD_CACHE_SIZE:
                self._heads.clear()
            self._heads[head] = request
        return request

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        """Bind now (so a busy port fails at start-up), then serve in a thread."""
        host = self.host or None  # "" = every address, IPv4 and IPv6
        server = self.loop.run_until_complete(
            self.loop.create_server(
                lambda: _Connection(self), host=host, port=self.port, reuse_address=True, backlog=1024
            )
        )
        self._servers.append(server)
        listening = list(server.sockets)
        self.port = listening[0].getsockname()[1]
        for sock in listening:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._thread = threading.Thread(target=self.loop.run_forever, name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self._shutdown)
            self._thread.join(timeout=5)
        if self._thread is None or not self._thread.is_alive():
            # Closed here, not left to the garbage collector: collected in a cycle with its transports, a
            # loop may find its self-pipe already closed and raise from __del__.
            self.loop.close()
        if self.settings.web is not None:
            self.settings.web.close()

    def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self.table.open):
            conn.close()
        for task in self._tasks:
            task.cancel()
        self.loop.call_soon(self.loop.stop)


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own reports, in our log: a client's TLS or socket error is debug, anything else a warning."""
    exc = context.get("exception")
    if isinstance(exc, (OSError, asyncio.CancelledError)):  # ssl.SSLError is an OSError
        log.debug("http_connection_error", message=context.get("message"), error=f"{type(exc).__name__}: {exc}")
        return
    log.warning("http_loop_error", message=context.get("message"), error=repr(exc) if exc else None)
