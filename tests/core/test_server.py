from __future__ import annotations

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
from exporter.server import SENDFILE_MIN_BYTES, HttpServer, Routes

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
    # Bodies over the sendfile threshold, 30 requests pipelined before reading anything:
    # the kernel buffer fills, sendfile sends part, and the rest must follow in order.
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
    # Keep-alive requests over the sendfile threshold, on both paths (fast and general): the
    # server never closes first, so each reset reaches it, either in sendfile (the RST arrived
    # before the answer) or as the connection's error afterwards. Either way one debug line.
    body = b"x 1\n" * (SENDFILE_MIN_BYTES // 2)
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
