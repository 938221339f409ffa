from __future__ import annotations

import contextlib
import gzip
import http.client
import socket
import struct
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from exporter.render import CONTENT_TYPE, Exposition
from exporter.server import WRITE_CHUNK_BYTES, HttpServer, Routes
from exporter.web.settings import HttpSettings

BODY = b'# TYPE x gauge\nx{a="1"} 1\n'


class State:
    expo = Exposition(BODY, gzip.compress(BODY), 1.0)
    ready = (False, "no GPUs found")
    calls = 0

    def exposition(self) -> Exposition:
        self.calls += 1
        return self.expo


@pytest.fixture
def server() -> Iterator[tuple[HttpServer, State]]:
    st = State()
    srv = HttpServer("127.0.0.1", 0, Routes(st.exposition, lambda: (True, "ok"), lambda: st.ready, lambda: b"[]"))
    srv.start()
    yield srv, st
    srv.stop()


def get(
    srv: HttpServer, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request(method, path, headers=headers or {})
    return conn.getresponse()


def test_metrics_content_type_and_body(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    r = get(srv, "/metrics")
    assert r.status == 200
    assert r.getheader("Content-Type") == CONTENT_TYPE
    assert r.read() == BODY


def test_gzip_when_accepted(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    r = get(srv, "/metrics", headers={"Accept-Encoding": "gzip, deflate"})
    assert r.getheader("Content-Encoding") == "gzip"
    assert gzip.decompress(r.read()) == BODY


def test_keep_alive_serves_many_requests_on_one_connection(server: tuple[HttpServer, State]) -> None:
    srv, st = server
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    for _ in range(20):
        conn.request("GET", "/metrics")
        assert conn.getresponse().read() == BODY
    # new bytes after a new rendering, without restarting anything
    st.expo = Exposition(b"y 2\n", gzip.compress(b"y 2\n"), 2.0)
    conn.request("GET", "/metrics")
    assert conn.getresponse().read() == b"y 2\n"


def test_head_has_no_body(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    r = get(srv, "/metrics", method="HEAD")
    assert r.status == 200 and r.getheader("Content-Length") == str(len(BODY)) and r.read() == b""


def test_probes_and_landing(server: tuple[HttpServer, State]) -> None:
    srv, st = server
    assert get(srv, "/health").status == 200
    r = get(srv, "/ready")
    assert (r.status, r.read()) == (503, b"no GPUs found\n")
    st.ready = (True, "ok")
    assert get(srv, "/ready").status == 200
    landing = get(srv, "/").read()
    assert b'href="/metrics"' in landing and b"gpu-health-exporter" in landing
    assert get(srv, "/gpus").read() == b"[]"
    assert get(srv, "/nope").status == 404


def test_other_methods_refused(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    r = get(srv, "/metrics", method="POST")
    assert r.status == 405 and r.getheader("Allow") == "GET, HEAD"


def raw(srv: HttpServer, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def test_malformed_requests_get_400_and_the_server_survives(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    assert raw(srv, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(srv, b"GET /metrics SPDY/9\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(srv, b"GET /metrics HTTP/1.1\r\nno-colon-here\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw(srv, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000).startswith(b"HTTP/1.1 431")
    assert get(srv, "/metrics").status == 200


def test_pipelined_requests(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    out = raw(srv, b"GET /health HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(BODY)


def test_busy_port_fails_at_start(server: tuple[HttpServer, State]) -> None:
    srv, st = server
    other = HttpServer("127.0.0.1", srv.port, Routes(st.exposition, lambda: (True, ""), lambda: (True, "")))
    with pytest.raises(OSError):
        other.start()


def test_large_bodies_pipelined_to_a_slow_reader_arrive_intact() -> None:
    # Bodies over one write slice, 30 requests pipelined before reading anything: the kernel
    # buffer fills, a slice waits for the peer, and the rest must follow in order.
    body = b"".join(b'DCGM_FI_DEV_GPU_TEMP{gpu="%d"} %d\n' % (i, i) for i in range(8000))
    assert len(body) > 200_000
    expo = Exposition(body, gzip.compress(body), 1.0)
    srv = HttpServer("127.0.0.1", 0, Routes(lambda: expo, lambda: (True, "ok"), lambda: (True, "ok")))
    srv.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            n = 30
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * (n - 1))
            s.sendall(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
            chunks = []
            while True:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        data = b"".join(chunks)
        assert data.count(b"HTTP/1.1 200 OK") == n
        assert data.count(body) == n
    finally:
        srv.stop()


def reset_after(srv: HttpServer, request: bytes) -> None:
    """Send `request` and close with SO_LINGER (on, 0 s) at once: the kernel sends RST, not FIN."""
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    s.sendall(request)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def wait_for_events(
    logs: list[MutableMapping[str, Any]], name: str, count: int, timeout: float = 5.0
) -> list[MutableMapping[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in logs if e["event"] == name]
        if len(found) >= count:
            return found
        time.sleep(0.01)
    raise AssertionError(f"{name}: fewer than {count} in {timeout}s: {logs}")


def test_client_reset_is_a_debug_event_not_a_handler_failure() -> None:
    # Keep-alive requests with a response larger than one write slice: the server never closes
    # first, so each reset reaches it, in a send (the RST arrived before the answer) or as the
    # connection's error afterwards. Either way one debug line.
    body = b"x 1\n" * (WRITE_CHUNK_BYTES // 2)
    expo = Exposition(body, gzip.compress(body), 1.0)
    srv = HttpServer("127.0.0.1", 0, Routes(lambda: expo, lambda: (True, "ok"), lambda: (True, "ok")))
    srv.start()
    requests = [
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    ]
    try:
        with capture_logs() as logs:
            for _ in range(5):
                for request in requests:
                    reset_after(srv, request)
            gone = wait_for_events(logs, "http_client_gone", 10)
            status = get(srv, "/metrics").status
        assert status == 200
        assert {e["log_level"] for e in gone} == {"debug"}
        assert all(e["error"].startswith(("ConnectionResetError", "BrokenPipeError")) for e in gone), gone
        assert not [e for e in logs if e["event"] == "http_handler_failed" or e["log_level"] == "error"]
    finally:
        srv.stop()


def test_nothing_is_answered_after_connection_close(
    server: tuple[HttpServer, State], caplog: pytest.LogCaptureFixture
) -> None:
    # Writes to a closing transport are dropped by asyncio, and from the fifth on it logs
    # "socket.send() raised exception." (plain text, outside our JSON logs) for each one.
    srv, _ = server
    out = raw(srv, b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n" + b"GET /metrics HTTP/1.1\r\n\r\n" * 8)
    assert out.count(b"HTTP/1.1 ") == 1 and out.startswith(b"HTTP/1.1 200 OK")
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


# --- limits (docs/security.md) ---------------------------------------------------------------


@contextlib.contextmanager
def serving(body: bytes = BODY, **limits: Any) -> Iterator[HttpServer]:
    expo = Exposition(body, gzip.compress(body), 1.0)
    srv = HttpServer(
        "127.0.0.1",
        0,
        Routes(lambda: expo, lambda: (True, "ok"), lambda: (True, "ok")),
        settings=HttpSettings(**limits),
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes; fails if it is still open after `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"still open after {seconds}s, got {data[:200]!r}") from None
    return data


def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_deadline() -> None:
    # Slowloris: every byte used to reset a 60 s idle timer. The deadline counts from the first byte.
    with serving(header_timeout_s=1.0) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        started = time.monotonic()
        s.settimeout(0.1)
        answer = b""
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 200:
            try:
                s.send(bytes([byte]))
                answer = s.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if answer or time.monotonic() - started > 5:
                break
        answer += closed_within(s, 3)
        elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.9 <= elapsed < 3.0, elapsed
        assert get(srv, "/metrics").status == 200


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline() -> None:
    with (
        serving(header_timeout_s=1.0, idle_timeout_s=30.0) as srv,
        socket.create_connection(("127.0.0.1", srv.port)) as s,
    ):
        started = time.monotonic()
        assert closed_within(s, 3) == b""
        assert time.monotonic() - started < 3


def test_idle_keep_alive_connections_are_closed_after_the_idle_timeout() -> None:
    with serving(idle_timeout_s=1.0) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        data = closed_within(s, 4)
        assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in data
        assert 0.9 <= time.monotonic() - started < 4


def test_beyond_the_connection_cap_the_oldest_idle_go_first_and_scrapes_succeed() -> None:
    with serving(max_connections=4) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
        try:
            for s in idle:  # each one idle after a request, oldest first
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                s.settimeout(5)
                assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
            scrapes = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5) for _ in range(3)]
            for conn in scrapes:  # each one stays open, so each needs a place of its own
                conn.request("GET", "/metrics")
                assert conn.getresponse().read() == BODY
            # Three scrapes, each a new connection: the three oldest idle ones were closed for them.
            assert [closed_within(s, 3) for s in idle[:3]] == [b"", b"", b""]
            idle[3].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert idle[3].recv(4096).startswith(b"HTTP/1.1 200 ")
        finally:
            for s in idle:
                s.close()


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_peer_that_never_reads_costs_one_response_not_thousands() -> None:
    # 3000 pipelined scrapes of ~120 KB each that are never read: ~360 MB if the server kept
    # answering. It stops reading once a response cannot leave; its memory stays flat.
    body = b"".join(b'DCGM_FI_DEV_GPU_TEMP{gpu="%d"} %d\n' % (i, i) for i in range(4000))
    with serving(body) as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        before = rss_kb()
        requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 3000
        s.settimeout(5)
        sent = 0
        try:
            while sent < len(requests):
                sent += s.send(requests[sent : sent + 65536])
        except TimeoutError:
            pass  # the server stopped reading: the kernel buffers filled up
        grown_mb = (rss_kb() - before) / 1024
        assert grown_mb < 40, f"server grew {grown_mb:.0f} MB"
        assert get(srv, "/metrics").status == 200  # the rest are served meanwhile


def test_a_100_kb_request_line_is_414_and_never_echoed() -> None:
    with serving() as srv:
        out = raw(srv, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 414 ") and b"aaaa" not in out
        out = raw(srv, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")  # complete but too long
        assert out.startswith(b"HTTP/1.1 414 ")
        out = raw(srv, b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n")
        assert out.startswith(b"HTTP/1.1 431 ")
        out = raw(srv, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 17000 + b"\r\n\r\n")  # complete, too large
        assert out.startswith(b"HTTP/1.1 431 ")
        assert b"not found\n" in raw(srv, b"GET /secret-path HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert b"secret-path" not in raw(srv, b"GET /secret-path HTTP/1.1\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize(
    "accept, gzipped",
    [
        ("gzip;q=0", False),
        ("gzip;q=0, deflate", False),
        ("br, gzip;q=0.5", True),
        ("GZIP", True),
        ("x-gzip", True),
        ("*", True),
        ("identity", False),
        ("gzip;q=0.5, identity", False),
        ("gzip;q=nonsense", False),
        ("zstd, br", False),
    ],
)
def test_accept_encoding_is_read_per_rfc_9110(accept: str, gzipped: bool) -> None:
    with serving() as srv:
        r = get(srv, "/metrics", headers={"Accept-Encoding": accept})
        assert (r.getheader("Content-Encoding") == "gzip") == gzipped
        body = r.read()
        assert (gzip.decompress(body) if gzipped else body) == BODY


def test_http_details() -> None:
    with serving() as srv:
        # LF-only line ends
        out = raw(srv, b"GET /metrics HTTP/1.1\nHost: x\nConnection: close\n\n")
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(BODY)
        # versions
        assert raw(srv, b"GET /metrics HTTP/1.x\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(srv, b"GET /metrics HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
        # Connection is a list: close among other options still closes
        out = raw(srv, b"GET /health HTTP/1.1\r\nConnection: close, TE\r\nTE: trailers\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ") and b"Connection: close\r\n" in out
        # absolute-form target
        out = raw(srv, b"GET http://node:9400/metrics?x=1 HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(BODY)
        # obsolete line folding, whitespace before the colon
        assert raw(srv, b"GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(srv, b"GET / HTTP/1.1\r\nHost : x\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        # a body is never read: the connection closes after the answer
        out = raw(srv, b"GET /health HTTP/1.1\r\nContent-Length: 5\r\n\r\nGET /")
        assert out.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in out


def test_http_1_0_keep_alive_is_echoed_and_kept() -> None:
    with serving() as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        for _ in range(2):
            s.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            data = b""
            while not data.endswith(b"ok\n"):
                chunk = s.recv(4096)
                assert chunk, data
                data += chunk
            assert b"Connection: keep-alive\r\n" in data
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")  # without it: closed after the answer
        assert b"Connection: close\r\n" in closed_within(s, 3)


def test_max_header_bytes_is_the_setting_not_a_constant() -> None:
    with serving(max_header_bytes=2048) as srv:
        head = b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * 2100 + b"\r\nConnection: close\r\n\r\n"
        assert raw(srv, head).startswith(b"HTTP/1.1 431 ")
        head = b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * 1900 + b"\r\nConnection: close\r\n\r\n"
        assert raw(srv, head).startswith(b"HTTP/1.1 200 ")
