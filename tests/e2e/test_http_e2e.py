"""The HTTP server as the daemon runs it: clients that go away in the middle of a response.

A scraper that times out, a curl interrupted with ^C, a load balancer's health check: the
connection is reset while the exposition is still being sent. That is the client's business,
not an error of the exporter: the daemon logs it at debug level, without a traceback, and keeps
serving. Hostile clients cost a bounded amount: a socket of unread pipelined scrapes leaves the
daemon's memory flat, slow and silent connections beyond the cap give way and never starve scrapes.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

from exporter.server import SEND_BUFFER_BYTES
from tests.e2e.harness import ExporterProcess

# 512 simulated GPUs: a ~5.5 MB exposition, more than the kernel buffers on both ends can hold
# (the server's send buffer is at most 2 * SEND_BUFFER_BYTES, the client's receive buffer is
# pinned small below), so a client that reads only the head resets the connection mid-response.
SPEC = "--simulate=gpus=512"
CLIENT_RCVBUF = 16 * 1024
# Both paths of the server: the scrape fast path (sendfile) and the general one (Connection header).
REQUESTS = (
    b"GET /metrics HTTP/1.1\r\nHost: exporter\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: exporter\r\nConnection: keep-alive\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: exporter\r\nConnection: close\r\n\r\n",
)
ROUNDS = 3


def connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)  # before connect: sets the window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER (on, 0 s): the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_head(sock: socket.socket) -> tuple[bytes, int]:
    """The response head and its Content-Length (the socket's timeout bounds the wait)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before the response head: {data!r}"
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 200 "), head
    lengths = [line.split(":", 1)[1] for line in head.split("\r\n") if line.lower().startswith("content-length:")]
    return data, int(lengths[0])


def log_lines(exp: ExporterProcess) -> list[str]:
    exp._log.flush()
    return exp.log_path.read_text(errors="replace").splitlines()


def events(lines: list[str], name: str) -> list[dict[str, object]]:
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == name:
            out.append(entry)
    return out


def test_client_reset_mid_response_is_a_debug_event_and_the_daemon_keeps_serving(tmp_path: Path) -> None:
    exp = ExporterProcess([SPEC, "-c", "1000", "--log-level", "debug"], tmp_path)
    try:
        exp.wait_ready(timeout=60)
        exp.wait_for(lambda t: "gpuhealth_collections_total" in t, timeout=60)
        resets = 0
        for _ in range(ROUNDS):
            for request in REQUESTS:
                sock = connect(exp.port)
                sock.sendall(request)
                got, length = read_head(sock)
                # What the kernels can hold is far less than the body: the server is still sending.
                assert length > 2 * SEND_BUFFER_BYTES + 4 * CLIENT_RCVBUF + len(got), length
                reset(sock)
                resets += 1
            # And a client that asks and resets at once, before any answer.
            sock = connect(exp.port)
            sock.sendall(REQUESTS[2])
            reset(sock)

        # The daemon noticed every mid-response reset (at debug level), and still serves.
        deadline = time.monotonic() + 15
        while len(events(log_lines(exp), "http_client_gone")) < resets and time.monotonic() < deadline:
            time.sleep(0.1)
        gone = events(log_lines(exp), "http_client_gone")
        assert len(gone) >= resets, f"{len(gone)} of {resets} resets logged:\n{exp.logs()}"
        assert {e["level"] for e in gone} == {"debug"}
        for _ in range(3):
            assert "gpuhealth_collections_total" in exp.metrics()
        lines = log_lines(exp)
        text = "\n".join(lines)
        assert "Traceback" not in text, text[-8000:]
        errors = [line for line in lines if '"level": "error"' in line]
        assert not errors, "\n".join(errors[:5])
        # Nothing outside structlog's JSON lines either (asyncio's own warnings go to stderr as text).
        stray = [line for line in lines if not line.startswith("{")]
        assert not stray, "\n".join(stray[:10])
    finally:
        assert exp.stop() == 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_unread_pipelined_scrapes_leave_the_daemon_flat(tmp_path: Path) -> None:
    # The reported attack: one socket of pipelined GET /metrics that never reads grew the daemon from
    # 42 MB to 310 MB. Now it stops reading that socket once one response cannot leave.
    exp = ExporterProcess(["--simulate", "-c", "1000"], tmp_path)
    try:
        exp.wait_ready(timeout=60)
        exp.metrics()
        before = rss_mb(exp.proc.pid)
        with connect(exp.port) as sock:
            requests = b"GET /metrics HTTP/1.1\r\nHost: exporter\r\n\r\n" * 3000
            sock.settimeout(3)
            sent = 0
            try:
                while sent < len(requests):
                    sent += sock.send(requests[sent : sent + 65536])
            except TimeoutError:
                pass  # the daemon stopped reading: the kernel buffers are full
            for _ in range(3):  # other clients are served meanwhile
                assert "DCGM_FI_DEV_GPU_TEMP" in exp.metrics()
            grown = rss_mb(exp.proc.pid) - before
            assert grown < 20, f"the daemon grew {grown:.0f} MB"
            reset(sock)
    finally:
        assert exp.stop() == 0


def test_slow_and_idle_connections_beyond_the_cap_do_not_starve_scrapes(tmp_path: Path) -> None:
    # More half-sent heads and silent connections than --http-max-connections: the oldest give way, and
    # each one is closed at the head deadline; scrapes keep succeeding throughout.
    exp = ExporterProcess(
        ["--simulate", "-c", "1000", "--http-max-connections", "32", "--http-header-timeout", "2"], tmp_path
    )
    try:
        exp.wait_ready(timeout=60)
        slow = []
        for i in range(60):
            sock = socket.create_connection(("127.0.0.1", exp.port), timeout=5)
            if i % 2:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            slow.append(sock)
        for _ in range(5):
            assert "DCGM_FI_DEV_GPU_TEMP" in exp.metrics()
        deadline = time.monotonic() + 10
        for sock in slow:  # every one of them is closed by the daemon: evicted or at the deadline
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while sock.recv(4096):
                    pass
            except ConnectionError:
                pass
            sock.close()
        assert "DCGM_FI_DEV_GPU_TEMP" in exp.metrics()
    finally:
        assert exp.stop() == 0
