"""The control socket, driven through the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from exporter.health.control import ControlError, ControlServer, request
from exporter.health.engine import CONTROL_SOCKET
from exporter.health.verdict import HealthState
from exporter.model import EVENT_XID, DeviceEvent

from .conftest import GPU0, GPU1, Clock, EngineFactory, inventory, snapshot

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "exporter.health.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )


def test_list_and_clear_through_the_cli(make_engine: EngineFactory, tmp_path: Path, clock: Clock) -> None:
    sd = tmp_path / "state"
    eng = make_engine(control_socket=True)
    sock = sd / CONTROL_SOCKET
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    eng.on_snapshot(snapshot(inventory(), clock()))
    eng.on_events([DeviceEvent(GPU1, EVENT_XID, 79)])

    out = cli("list", "--state-dir", str(sd), "--json")
    assert out.returncode == 0, out.stderr
    by_uuid = {d["uuid"]: d for d in json.loads(out.stdout)}
    assert by_uuid[GPU1]["state"] == "unhealthy" and by_uuid[GPU0]["state"] == "healthy"
    table = cli("list", "--state-dir", str(sd))
    assert table.returncode == 0 and GPU1 in table.stdout and "xid:79 x1" in table.stdout

    with capture_logs() as logs:
        out = cli("clear", "--gpu", GPU1, "--reason", "reseated the card", "--state-dir", str(sd))
    assert out.returncode == 0, out.stderr
    assert f"cleared {GPU1}" in out.stdout
    assert eng.verdict(GPU1).state is HealthState.HEALTHY
    cleared = [e for e in logs if e["event"] == "health_cleared"]
    assert cleared and cleared[0]["reason"] == "reseated the card" and cleared[0]["uuids"] == [GPU1]

    bad = cli("clear", "--gpu", "7", "--reason", "x", "--state-dir", str(sd))
    assert bad.returncode == 1 and "no GPU or MIG device matches '7'" in bad.stderr


def test_clear_without_a_daemon_explains(tmp_path: Path) -> None:
    out = cli("clear", "--gpu", "all", "--reason", "x", "--state-dir", str(tmp_path))
    assert out.returncode == 1
    assert "no daemon is listening" in out.stderr and "start it" in out.stderr


def test_list_without_a_daemon_reads_the_file(make_engine: EngineFactory, tmp_path: Path) -> None:
    eng = make_engine()
    eng.on_events([DeviceEvent(GPU0, EVENT_XID, 48)])
    eng.stop()
    out = cli("list", "--state-dir", str(tmp_path / "state"), "--json")
    assert out.returncode == 0, out.stderr
    assert "showing the state file" in out.stderr
    assert json.loads(out.stdout)[0]["state"] == "unhealthy"


def test_a_second_daemon_is_refused_and_a_stale_socket_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    first = ControlServer(path, lambda req, peer: {"ok": True})
    first.start()
    try:
        with pytest.raises(ControlError, match="another daemon"):
            ControlServer(path, lambda req, peer: {"ok": True}).start()
        assert request(path, {"op": "x"}) == {"ok": True}
    finally:
        first.stop()
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: what a killed daemon leaves
    stale.close()
    again = ControlServer(path, lambda req, peer: {"ok": True, "again": True})
    again.start()
    try:
        assert request(path, {"op": "x"})["again"] is True
    finally:
        again.stop()


def test_bad_requests_get_errors(make_engine: EngineFactory) -> None:
    eng = make_engine(control_socket=True)
    path = eng.state_dir / CONTROL_SOCKET
    assert request(path, {"op": "nope"}) == {"ok": False, "error": "unknown op 'nope'"}
    assert request(path, {"op": "clear", "target": 1})["ok"] is False
    assert request(path, {"op": "clear", "target": "all", "reason": " "})["error"].startswith("a reason")


def test_a_hundred_clients_at_once_are_all_answered(tmp_path: Path) -> None:
    """A burst of CLI calls (a fleet script, a remediation tool) used to fail with EAGAIN past a backlog of 5."""
    import threading
    import time

    def slow_answer(req: dict[str, object], peer: object) -> dict[str, object]:
        time.sleep(0.005)  # a handler that takes a moment, so connections queue up behind it
        return {"ok": True, "op": req["op"]}

    path = tmp_path / "c.sock"
    server = ControlServer(path, slow_answer)
    server.start()
    clients = 100
    start = threading.Barrier(clients)
    answers: list[dict[str, object]] = []
    errors: list[str] = []

    def client() -> None:
        start.wait()
        try:
            answers.append(request(path, {"op": "list"}))
        except ControlError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.stop()
    assert errors == []
    assert answers == [{"ok": True, "op": "list"}] * clients


def test_a_clear_names_who_asked_for_it(make_engine: EngineFactory, tmp_path: Path, clock: Clock) -> None:
    """The audit line carries the peer's uid and pid from SO_PEERCRED, not what the client claims."""
    sd = tmp_path / "state"
    eng = make_engine(control_socket=True)
    eng.on_snapshot(snapshot(inventory(), clock()))
    eng.on_events([DeviceEvent(GPU1, EVENT_XID, 79)])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "exporter.health.cli", "clear", "--gpu", GPU1, "--reason", "RMA done"]
    with capture_logs() as logs:
        proc = subprocess.Popen([*args, "--state-dir", str(sd)], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and f"cleared {GPU1}" in out
    [cleared] = [e for e in logs if e["event"] == "health_cleared"]
    assert cleared["uuids"] == [GPU1] and cleared["reason"] == "RMA done"
    assert cleared["peer_uid"] == os.getuid() and cleared["peer_pid"] == proc.pid
    assert cleared["source"] == "control"


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 200_000,  # nesting past the JSON parser's recursion limit
        b'{"schema": 2, "devices": {"GPU-x": {"reasons": [{"signal": 5}]}}}',
        b"\xff\xfe not text",
    ],
)
def test_list_on_a_hostile_state_file_is_an_error_not_a_traceback(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    out = cli("list", "--state-dir", str(tmp_path))
    assert "Traceback" not in out.stderr
    assert out.returncode == 1, out.stdout
    assert f"error: cannot read {tmp_path / 'state.json'}" in out.stderr


def test_list_refuses_a_state_file_that_is_not_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "state.json")  # reading it would wait for a writer forever
    out = cli("list", "--state-dir", str(tmp_path))
    assert out.returncode == 1 and "not a regular file" in out.stderr
