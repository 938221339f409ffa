"""The request parser on its own: targets, versions, fields, Accept-Encoding."""

from __future__ import annotations

import pytest

from exporter.web.request import HttpError, Request, find_head_end, parse_head, wants_gzip


def parse(raw: bytes) -> Request:
    end, _ = find_head_end(raw)
    assert end >= 0
    return parse_head(raw[:end], 16384)


def test_find_head_end_takes_crlf_and_lf_alone() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest") == (22, 24)
    assert find_head_end(b"GET / HTTP/1.1\nA: b\n\nrest") == (20, 21)
    end, resume = find_head_end(b"GET / HTTP/1.1\r\nA: b")
    assert end == -1 and resume == 16  # the next search starts at the unfinished line


@pytest.mark.parametrize(
    "target, path",
    [
        ("/metrics", "/metrics"),
        ("/metrics?name[]=x", "/metrics"),
        ("http://node:9400/metrics", "/metrics"),
        ("HTTPS://node/metrics?x#y", "/metrics"),
        ("http://node:9400", "/"),
        ("http://node?x", "/"),
    ],
)
def test_targets(target: str, path: str) -> None:
    req = parse(f"GET {target} HTTP/1.1\r\nHost: n\r\n\r\n".encode())
    assert req.path == path


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET /metrics HTTP/1.x\r\n\r\n", 400),
        (b"GET /metrics HTTP/3.0\r\n\r\n", 505),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /m HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /m HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
        (b"GET /m HTTP/1.1\r\nX\0: y\r\n\r\n", 400),
    ],
)
def test_refused(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as err:
        parse(raw)
    assert err.value.status == status


def test_connection_options_and_bodies() -> None:
    def req(raw: bytes) -> tuple[bool, bool]:
        r = parse(raw)
        return r.keep_alive, r.has_body

    assert req(b"GET / HTTP/1.1\r\n\r\n") == (True, False)
    assert req(b"GET / HTTP/1.1\r\nConnection: TE, close\r\n\r\n") == (False, False)
    assert req(b"GET / HTTP/1.1\r\nConnection: TE\r\nConnection: Close\r\n\r\n") == (False, False)
    assert req(b"GET / HTTP/1.0\r\n\r\n") == (False, False)
    assert req(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n") == (True, False)
    assert req(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n") == (True, False)
    assert req(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n") == (False, True)


@pytest.mark.parametrize(
    "header, gzipped",
    [
        (None, False),
        ("", False),
        ("gzip", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("gzip;q=0.001", True),
        ("deflate, gzip;q=1.0", True),
        ("*;q=0.1", True),
        ("*;q=0", False),
        ("gzip;q=0, *", False),
        ("identity;q=1, gzip;q=0.9", False),
        ("gzip;q=1.5", False),
        ("br;q=1, compress", False),
    ],
)
def test_accept_encoding(header: str | None, gzipped: bool) -> None:
    assert wants_gzip(header) is gzipped
