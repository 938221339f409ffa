"""A fence is never lost: failed starts, failed writes, other schema versions, a hostile state dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.health.control import ControlError
from exporter.health.engine import CONTROL_SOCKET, HealthEngine
from exporter.health.policy import Policy
from exporter.health.state import STATE_FILE
from exporter.health.verdict import HealthState
from exporter.model import EVENT_XID, DeviceEvent

from .conftest import GPU0, Clock, EngineFactory

U = HealthState.UNHEALTHY


def xid(code: int, gpu: str = GPU0) -> DeviceEvent:
    return DeviceEvent(gpu, EVENT_XID, code)


def fenced_state_dir(make_engine: EngineFactory, sd: Path) -> bytes:
    """A state dir whose file fences GPU0 (XID 79); returns the file's bytes."""
    eng = make_engine(state_dir=sd)
    eng.on_events([xid(79)])
    eng.stop()
    data = (sd / STATE_FILE).read_bytes()
    assert json.loads(data)["devices"][GPU0]["reasons"]
    return data


def fingerprint(path: Path) -> tuple[bytes, int, int]:
    """Bytes, inode and mtime: a rewrite with the same bytes still changes the inode (rename)."""
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


# ---- 1. a start that fails must not touch the state ------------------------------------------------


def test_engine_never_started_writes_nothing_on_stop(make_engine: EngineFactory, tmp_path: Path, clock: Clock) -> None:
    sd = tmp_path / "state"
    fenced_state_dir(make_engine, sd)
    before = fingerprint(sd / STATE_FILE)
    # What App.stop does after NVML failed to start: the engine was built but never started.
    eng = HealthEngine(Policy.build(), sd, clock, control_socket=False)
    eng.stop()
    assert fingerprint(sd / STATE_FILE) == before


def test_engine_whose_control_socket_fails_writes_nothing(
    make_engine: EngineFactory, tmp_path: Path, clock: Clock
) -> None:
    sd = tmp_path / "state"
    fenced_state_dir(make_engine, sd)
    (sd / CONTROL_SOCKET).write_text("not a socket")  # ControlError: refusing to replace it
    before = fingerprint(sd / STATE_FILE)
    eng = HealthEngine(Policy.build(), sd, clock)
    with pytest.raises(ControlError, match="not a socket"):
        eng.start()
    eng.stop()
    assert fingerprint(sd / STATE_FILE) == before
    assert sorted(p.name for p in sd.iterdir()) == [CONTROL_SOCKET, STATE_FILE]


def test_engine_started_then_stopped_keeps_the_fence(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    fenced_state_dir(make_engine, sd)
    again = make_engine(state_dir=sd)
    again.stop()
    assert make_engine(state_dir=sd).verdict(GPU0).state is U
