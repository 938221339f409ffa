"""basic_auth_users: 401 with WWW-Authenticate, bcrypt, an unknown user costs what a wrong password
does, the configured headers on every answer, rate_limit's 429, probes open only when configured."""

from __future__ import annotations

import base64
import http.client
import statistics
import time
from pathlib import Path

import bcrypt

from exporter.server import HttpServer
from tests.web.conftest import BODY, Pki, start

COST = 8  # low enough for a fast test, high enough to measure (about 15 ms)


def users_config(tmp_path: Path, extra: str = "") -> Path:
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(COST)).decode().replace("$2b$", "$2y$", 1)  # htpasswd's
    path = tmp_path / "web.yml"
    path.write_text(
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\n    X-Content-Type-Options: nosniff\n" + extra
    )
    return path


def get(srv: HttpServer, path: str, user: str | None = None, password: str = "") -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    headers = {}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    conn.request("GET", path, headers=headers)
    return conn.getresponse()


def test_basic_auth(tmp_path: Path, serve: list[HttpServer]) -> None:
    srv = start(users_config(tmp_path))
    serve.append(srv)
    for who in (None, ("prometheus", "wrong"), ("nobody", "s3cret")):
        r = get(srv, "/metrics", *(who or (None,)))
        assert r.status == 401 and r.getheader("WWW-Authenticate") == "Basic", who
        assert r.getheader("X-Frame-Options") == "deny"  # configured headers on refusals too
        assert BODY not in r.read()
    r = get(srv, "/metrics", "prometheus", "s3cret")
    assert r.status == 200 and r.read() == BODY
    assert r.getheader("X-Content-Type-Options") == "nosniff"
    # Probes follow the same rules unless configured otherwise.
    assert get(srv, "/health").status == 401
    garbage = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    garbage.request("GET", "/metrics", headers={"Authorization": "Basic !!!not-base64"})
    assert garbage.getresponse().status == 401


def test_probes_open_only_when_configured(tmp_path: Path, serve: list[HttpServer]) -> None:
    srv = start(users_config(tmp_path), probes=True)
    serve.append(srv)
    assert get(srv, "/health").status == 200 and get(srv, "/ready").status == 200
    assert get(srv, "/metrics").status == 401 and get(srv, "/gpus").status == 401


def timed(srv: HttpServer, user: str, password: str) -> float:
    started = time.perf_counter()
    assert get(srv, "/metrics", user, password).status == 401
    return time.perf_counter() - started


def test_an_unknown_user_costs_what_a_wrong_password_costs(tmp_path: Path, serve: list[HttpServer]) -> None:
    srv = start(users_config(tmp_path))
    serve.append(srv)
    # A fresh password each time: a cached answer would cost nothing. Interleaved, so both series see the
    # same noise from whatever else runs on the machine.
    wrong_times, unknown_times = [], []
    for i in range(15):
        wrong_times.append(timed(srv, "prometheus", f"wrong{i}"))
        unknown_times.append(timed(srv, f"nobody{i}", f"pw{i}"))
    wrong, unknown = statistics.median(wrong_times), statistics.median(unknown_times)
    assert wrong > 0.003, wrong  # bcrypt really ran
    assert 0.5 < unknown / wrong < 2.0, (unknown, wrong)


def test_a_scraper_costs_one_bcrypt_then_the_cache_answers(tmp_path: Path, serve: list[HttpServer]) -> None:
    srv = start(users_config(tmp_path))
    serve.append(srv)
    assert get(srv, "/metrics", "prometheus", "s3cret").status == 200
    started = time.perf_counter()
    for _ in range(20):
        assert get(srv, "/metrics", "prometheus", "s3cret").status == 200
    per_request = (time.perf_counter() - started) / 20
    first = timed(srv, "prometheus", "not-cached")
    assert per_request < first / 2, (per_request, first)


def test_scrapes_are_served_while_bcrypt_runs(tmp_path: Path, serve: list[HttpServer]) -> None:
    # Password guesses run in the auth thread: the event loop keeps answering.
    srv = start(users_config(tmp_path), probes=True)
    serve.append(srv)
    guesses = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30) for _ in range(40)]
    for i, conn in enumerate(guesses):
        token = base64.b64encode(f"prometheus:guess{i}".encode()).decode()
        conn.putrequest("GET", "/metrics")
        conn.putheader("Authorization", "Basic " + token)
        conn.endheaders()
    started = time.perf_counter()
    assert get(srv, "/health").status == 200
    answered_in = time.perf_counter() - started
    assert all(c.getresponse().status == 401 for c in guesses)
    all_checked_in = time.perf_counter() - started
    # 40 bcrypts one after another take ~0.6 s; the probe did not wait for them.
    assert answered_in < all_checked_in / 3, (answered_in, all_checked_in)


def test_rate_limit_answers_429(tmp_path: Path, serve: list[HttpServer]) -> None:
    path = tmp_path / "web.yml"
    path.write_text("rate_limit:\n  interval: 1h\n  burst: 2\n")
    srv = start(path)
    serve.append(srv)
    assert [get(srv, "/metrics").status for _ in range(3)] == [200, 200, 429]


def test_basic_auth_over_tls(pki: Pki, serve: list[HttpServer]) -> None:
    cfg = users_config(pki.dir, "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    srv = start(cfg)
    serve.append(srv)
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=pki.client_context(), timeout=10)
    token = base64.b64encode(b"prometheus:s3cret").decode()
    conn.request("GET", "/metrics", headers={"Authorization": "Basic " + token})
    r = conn.getresponse()
    assert r.status == 200 and r.read() == BODY


def test_scrapers_arriving_together_with_one_password_cost_one_bcrypt(tmp_path: Path, serve: list[HttpServer]) -> None:
    srv = start(users_config(tmp_path))
    serve.append(srv)
    one = statistics.median(timed(srv, "prometheus", f"single{i}") for i in range(5))
    token = base64.b64encode(b"prometheus:s3cret").decode()
    conns = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30) for _ in range(30)]
    started = time.perf_counter()
    for conn in conns:  # all asked before any answer: none of them is cached yet
        conn.putrequest("GET", "/metrics")
        conn.putheader("Authorization", "Basic " + token)
        conn.endheaders()
    assert all(c.getresponse().status == 200 for c in conns)
    together = time.perf_counter() - started
    assert together < 10 * one, (together, one)  # 30 bcrypts in a row would be 30 times one


def test_a_changed_password_applies_to_an_open_keep_alive_connection(tmp_path: Path, serve: list[HttpServer]) -> None:
    path = users_config(tmp_path)
    srv = start(path)
    serve.append(srv)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    token = base64.b64encode(b"prometheus:s3cret").decode()

    def status() -> int:
        conn.request("GET", "/metrics", headers={"Authorization": "Basic " + token})
        r = conn.getresponse()
        r.read()
        return r.status

    assert status() == 200
    new = bcrypt.hashpw(b"rotated", bcrypt.gensalt(4)).decode()
    path.write_text(f"basic_auth_users:\n  prometheus: '{new}'\n")
    deadline = time.monotonic() + 10
    while status() == 200:  # the same connection, re-checked against the file at most once a second
        assert time.monotonic() < deadline, "the old password still works"
        time.sleep(0.1)
    assert status() == 401
