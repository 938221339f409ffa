"""The verdict stream: the control socket's watch op and VerdictStream, its client, over a real socket."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from exporter.health.control import WATCH_VERSION
from exporter.health.engine import CONTROL_SOCKET
from exporter.health.stream import (
    SOURCE_DAEMON,
    SOURCE_LAST,
    SOURCE_NONE,
    SOURCE_STATE_FILE,
    StreamError,
    VerdictStream,
    parse_message,
)
from exporter.health.verdict import HealthState

from .conftest import GPU0, GPU1, MIG_A, Clock, EngineFactory, inventory, snapshot, xid


def wait(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        done.wait(0.02)
    return predicate()


def read_lines(path: Path, n: int, timeout: float = 5.0) -> list[dict[str, object]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    s.sendall(b'{"op": "watch"}\n')
    f = s.makefile("rb")
    try:
        return [json.loads(f.readline()) for _ in range(n)]
    finally:
        s.close()


def test_watch_sends_every_verdict_then_again_on_change(
    make_engine: EngineFactory, tmp_path: Path, clock: Clock
) -> None:
    eng = make_engine(control_socket=True)
    eng.on_snapshot(snapshot(inventory(mig=True), clock()))
    sock = tmp_path / "state" / CONTROL_SOCKET
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(sock))
    s.sendall(b'{"op": "watch"}\n')
    f = s.makefile("rb")
    try:
        first = json.loads(f.readline())
        assert first["version"] == WATCH_VERSION and first["seq"] == 1
        by_uuid = {d["uuid"]: d for d in first["devices"]}
        assert set(by_uuid) >= {GPU0, GPU1, MIG_A}
        assert by_uuid[MIG_A]["kind"] == "mig" and by_uuid[MIG_A]["parent"] == GPU0
        assert by_uuid[GPU1]["state"] == "healthy" and by_uuid[GPU1]["since"] is None
        eng.on_events([xid(79, GPU1, t=clock())])  # fence: the next line says so, unasked
        second = json.loads(f.readline())
        while second.get("keepalive"):
            second = json.loads(f.readline())
        fenced = {d["uuid"]: d for d in second["devices"]}[GPU1]
        assert second["seq"] == 2 and fenced["state"] == "unhealthy" and fenced["action"] == "reboot_node"
        assert fenced["since"] == clock() and fenced["reasons"][0]["code"] == "79"
    finally:
        s.close()


def test_stream_client_follows_the_daemon_and_keeps_verdicts_when_it_goes(
    make_engine: EngineFactory, tmp_path: Path, clock: Clock
) -> None:
    state_dir = tmp_path / "state"
    eng = make_engine(control_socket=True)
    eng.on_snapshot(snapshot(inventory(), clock()))
    stream = VerdictStream(state_dir)
    changes = threading.Event()
    stream.subscribe(changes.set)
    stream.start()
    try:
        assert wait(lambda: stream.source == SOURCE_DAEMON)
        assert stream.verdict(GPU1).state is HealthState.HEALTHY and stream.problem() is None
        changes.clear()
        eng.on_events([xid(79, GPU1, t=clock())])
        assert changes.wait(2)  # pushed, not polled: the plugin hears a fence at once
        assert stream.verdict(GPU1).state is HealthState.UNHEALTHY
        eng.stop()  # the daemon restarts: the consumer keeps what it knew
        assert wait(lambda: stream.source == SOURCE_LAST)
        assert stream.verdict(GPU1).state is HealthState.UNHEALTHY
        assert "last verdicts" in (stream.problem() or "")
        eng2 = make_engine(control_socket=True)  # back (same state dir): reconnected, fence still there
        assert wait(lambda: stream.source == SOURCE_DAEMON, 10)
        assert stream.verdict(GPU1).state is HealthState.UNHEALTHY
        eng2.clear(GPU1, "repaired")
        assert wait(lambda: stream.verdict(GPU1).state is HealthState.HEALTHY)
    finally:
        stream.stop()


def test_without_a_daemon_fences_come_from_the_state_file(
    make_engine: EngineFactory, tmp_path: Path, clock: Clock
) -> None:
    state_dir = tmp_path / "state"
    eng = make_engine(control_socket=True)
    eng.on_snapshot(snapshot(inventory(mig=True), clock()))
    eng.on_events([xid(79, GPU0, t=clock())])
    eng.stop()
    before = (state_dir / "state.json").read_bytes()
    stream = VerdictStream(state_dir, parent_of=lambda u: GPU0 if u.startswith("MIG-") else None)
    stream.start()
    try:
        assert stream.source == SOURCE_STATE_FILE
        assert stream.verdict(GPU0).state is HealthState.UNHEALTHY
        assert stream.verdict(MIG_A).state is HealthState.UNHEALTHY  # recorded MIG device: inherits
        assert stream.verdict("MIG-new").state is HealthState.UNHEALTHY  # unknown MIG of the fenced GPU
        assert stream.verdict(GPU1).state is HealthState.HEALTHY
        assert "state file" in (stream.problem() or "")
    finally:
        stream.stop()
    assert (state_dir / "state.json").read_bytes() == before  # read-only


def test_without_daemon_or_state_file_nothing_is_fenced(tmp_path: Path) -> None:
    stream = VerdictStream(tmp_path)
    assert stream.source == SOURCE_NONE and stream.verdict(GPU0).state is HealthState.HEALTHY


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ([], "not a JSON object"),
        ({"ok": False, "error": "starting"}, "refused the watch: starting"),
        ({"ok": True, "version": 99, "devices": []}, "version 99"),
        ({"ok": True, "version": 1}, "without a 'devices' list"),
        ({"ok": True, "version": 1, "devices": [{"uuid": "GPU-x", "state": "purple"}]}, "not a verdict"),
    ],
)
def test_bad_stream_lines_are_errors_naming_what(line: object, error: str) -> None:
    with pytest.raises(StreamError, match=error):
        parse_message(line)


def test_keepalive_is_no_verdict_change() -> None:
    assert parse_message({"ok": True, "version": 1, "seq": 4, "keepalive": True}) is None


def test_many_watchers_at_once(make_engine: EngineFactory, tmp_path: Path, clock: Clock) -> None:
    eng = make_engine(control_socket=True)
    eng.on_snapshot(snapshot(inventory(), clock()))
    results: list[list[dict[str, object]]] = []
    threads = [
        threading.Thread(target=lambda: results.append(read_lines(tmp_path / "state" / CONTROL_SOCKET, 1)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 8 and all(r[0]["seq"] == 1 for r in results)


def test_a_watch_of_an_unknown_version_is_refused(make_engine: EngineFactory, tmp_path: Path) -> None:
    make_engine(control_socket=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(tmp_path / "state" / CONTROL_SOCKET))
    try:
        s.sendall(b'{"op": "watch", "version": 2}\n')
        answer = json.loads(s.makefile("rb").readline())
    finally:
        s.close()
    assert answer == {"ok": False, "error": "watch version 2: this daemon speaks 1"}
