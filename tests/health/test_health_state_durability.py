"""A fence is never lost: failed starts, failed writes, other schema versions, a hostile state dir."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from exporter.health.control import ControlError
from exporter.health.engine import CONTROL_SOCKET, HealthEngine
from exporter.health.policy import Policy
from exporter.health.state import SCHEMA_VERSION, STATE_FILE, StateError, validate
from exporter.health.store import RETRY_FIRST_S, RETRY_MAX_S, CoalescingWriter, StateStore
from exporter.health.verdict import HealthState
from exporter.labels import RenderContext
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


# ---- 2. a write that fails is retried until it is durable --------------------------------------------


def wait_until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


def fenced_on_disk(sd: Path) -> bool:
    try:
        doc = json.loads((sd / STATE_FILE).read_bytes())
    except (OSError, ValueError):
        return False
    return any(r["code"] == "79" for r in doc["devices"].get(GPU0, {}).get("reasons", []))


def block_state_file(sd: Path) -> None:
    """A non-empty directory where state.json goes: rename(2) over it fails with EISDIR (even as root)."""
    (sd / STATE_FILE).unlink(missing_ok=True)
    (sd / STATE_FILE).mkdir()
    (sd / STATE_FILE / "x").write_text("in the way")


def failures(eng: HealthEngine) -> int:
    text = eng.render_metrics(RenderContext(None, ""))
    (line,) = [x for x in text.splitlines() if x.startswith("gpuhealth_health_state_write_failures_total ")]
    return int(line.split()[1])


def test_a_failed_fence_write_is_retried_until_it_is_on_disk(
    make_engine: EngineFactory, tmp_path: Path, clock: Clock
) -> None:
    sd = tmp_path / "state"
    eng = make_engine(state_dir=sd)
    assert eng.durability_problem() is None
    block_state_file(sd)
    with capture_logs() as logs:
        eng.on_events([xid(79)])
        assert eng.verdict(GPU0).state is U  # served from memory even though the file is behind
        clock.t += 12
        problem = eng.durability_problem()
        assert problem is not None
        assert problem.startswith("health state not on disk since 12s: Is a directory"), problem
        wait_until("retries", lambda: failures(eng) >= 3)  # 0.25 s, then 0.5 s, ...
        assert not fenced_on_disk(sd)
        shutil.rmtree(sd / STATE_FILE)
        wait_until("the retry lands the fence", lambda: fenced_on_disk(sd))
        wait_until("durable again", lambda: eng.durability_problem() is None)
    failed = [e for e in logs if e["event"] == "health_state_write_failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error"  # once per streak, not per retry
    assert "Is a directory" in failed[0]["error"]
    recovered = [e for e in logs if e["event"] == "health_state_write_recovered"]
    assert len(recovered) == 1 and recovered[0]["failures"] >= 3
    assert failures(eng) >= 3  # a counter: it never goes back
    eng.stop()
    assert make_engine(state_dir=sd).verdict(GPU0).state is U


def test_retries_back_off_from_a_quarter_second_to_thirty(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.prepare()
    store.load()
    attempts: list[float] = []

    def failing_write(doc: dict[str, Any], generation: int) -> bool:
        attempts.append(time.monotonic())
        return False

    store.write = failing_write  # type: ignore[method-assign]
    writer = CoalescingWriter(store, lambda: ({}, len(attempts)), retry_first_s=0.005, retry_max_s=0.04)
    writer.start()
    writer.mark_dirty()
    wait_until("ten attempts", lambda: len(attempts) >= 10)
    with capture_logs() as logs:
        writer.stop()
    gaps = [b - a for a, b in itertools.pairwise(attempts[:10])]
    # 0.005, 0.01, 0.02, 0.04 (the cap), 0.04, ...: each at least its backoff; without the cap the
    # last would be 0.005 * 2**8 = 1.28 s
    for gap, want in zip(gaps, (0.005, 0.01, 0.02, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04), strict=True):
        assert gap >= want * 0.9, gaps
    assert gaps[-1] < 0.6, gaps
    assert [e for e in logs if e["event"] == "health_state_not_durable_at_exit"]
    assert (RETRY_FIRST_S, RETRY_MAX_S) == (0.25, 30.0)


def test_a_failed_count_write_is_retried_too(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    eng = make_engine(state_dir=sd)
    eng.on_events([xid(79)])
    block_state_file(sd)
    eng.on_events([xid(79)] * 5)  # counts only: the coalescing writer's job
    wait_until("a failure", lambda: eng.durability_problem() is not None)
    shutil.rmtree(sd / STATE_FILE)

    def count_on_disk() -> int:
        try:
            doc = json.loads((sd / STATE_FILE).read_bytes())
        except (OSError, ValueError):
            return 0
        return sum(c["count"] for c in doc["xid_counts"] if c["xid"] == 79)

    wait_until("the counts land", lambda: count_on_disk() == 6)
    # The file is visible a moment before the store records the success (it fsyncs the dir first).
    wait_until("durable again", lambda: eng.durability_problem() is None)


def test_the_write_failures_counter_is_rendered_next_to_the_file_errors(make_engine: EngineFactory) -> None:
    text = make_engine().render_metrics(RenderContext(None, ""))
    assert (
        "# HELP gpuhealth_health_state_file_errors_total Corrupt or unreadable health state files moved aside.\n"
        "# TYPE gpuhealth_health_state_file_errors_total counter\n"
        "gpuhealth_health_state_file_errors_total 0\n"
        "# HELP gpuhealth_health_state_write_failures_total Failed writes of the health state file; the newest "
        "verdicts are retried until they are on disk.\n"
        "# TYPE gpuhealth_health_state_write_failures_total counter\n"
        "gpuhealth_health_state_write_failures_total 0\n"
    ) in text


# ---- 3. a state file from another version is never discarded ----------------------------------------


def schema_1(sd: Path) -> bytes:
    """A version-1 file fencing GPU0 (XID 79, count 4), as the previous release wrote it."""
    reason = {
        "signal": "xid",
        "code": "79",
        "message": "GPU has fallen off the bus",
        "first_seen": 1.0,
        "last_seen": 2.0,
        "count": 4,
        "action": "reboot_node",
        "state": 2,
        "level": False,
        "class": "fence",
    }
    doc = {
        "schema": 1,
        "written_at": 2.0,
        "devices": {
            GPU0: {"meta": {"kind": "gpu", "parent": None, "index": 0, "gi": None}, "reasons": [reason], "baseline": {}}
        },
        "xid_counts": [{"gpu": GPU0, "xid": 79, "class": "fence", "count": 4}],
        "clears_total": 2,
    }
    sd.mkdir(mode=0o700, exist_ok=True)
    data = json.dumps(doc).encode()
    (sd / STATE_FILE).write_bytes(data)
    return data


def test_schema_1_is_migrated_with_every_fence_and_count(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    schema_1(sd)
    eng = make_engine(state_dir=sd)
    assert eng.state_file_errors == 0 and not list(sd.glob("*.corrupt-*"))
    v = eng.verdict(GPU0)
    assert v.state is U and v.reasons[0].count == 4
    assert eng.signals_seen == {}
    eng.on_events([xid(13)])  # counts only: the coalescing writer rewrites the file
    eng.stop()
    doc = validate(json.loads((sd / STATE_FILE).read_bytes()))
    assert doc["schema"] == SCHEMA_VERSION == 2
    assert doc["signals_seen"] == {}
    assert doc["clears_total"] == 2
    assert {(c["xid"], c["count"]) for c in doc["xid_counts"]} == {(79, 4), (13, 1)}


def test_validate_migrates_schema_1_without_changing_its_input() -> None:
    doc = {"schema": 1, "devices": {}, "xid_counts": []}
    assert validate(doc) == {"schema": 2, "devices": {}, "xid_counts": [], "signals_seen": {}}
    assert doc == {"schema": 1, "devices": {}, "xid_counts": []}


def test_signals_seen_round_trip_sorted(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    eng = make_engine(state_dir=sd)
    marks: list[None] = []
    real_mark = eng._writer.mark_dirty

    def counting_mark() -> None:
        marks.append(None)
        real_mark()

    eng._writer.mark_dirty = counting_mark  # type: ignore[method-assign]
    eng.note_signals_seen("NVIDIA H100 80GB HBM3", ["DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"])
    assert len(marks) == 1
    eng.note_signals_seen("NVIDIA H100 80GB HBM3", ["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"])  # nothing new
    eng.note_signals_seen("NVIDIA H100 80GB HBM3", [])
    assert len(marks) == 1
    eng.note_signals_seen("NVIDIA A100-SXM4-80GB", iter(["DCGM_FI_DEV_ROW_REMAP_FAILURE"]))
    assert len(marks) == 2
    eng.stop()
    doc = json.loads((sd / STATE_FILE).read_bytes())
    assert doc["signals_seen"] == {
        "NVIDIA A100-SXM4-80GB": ["DCGM_FI_DEV_ROW_REMAP_FAILURE"],
        "NVIDIA H100 80GB HBM3": ["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_XID_ERRORS"],
    }
    again = make_engine(state_dir=sd)
    assert again.signals_seen == {
        "NVIDIA A100-SXM4-80GB": {"DCGM_FI_DEV_ROW_REMAP_FAILURE"},
        "NVIDIA H100 80GB HBM3": {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_XID_ERRORS"},
    }


def test_a_malformed_signals_seen_costs_no_fence(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    schema_1(sd)
    doc = json.loads((sd / STATE_FILE).read_bytes())
    doc["schema"] = 2
    doc["signals_seen"] = {"NVIDIA H100 80GB HBM3": ["DCGM_FI_DEV_XID_ERRORS", 7], "bad": "x"}
    (sd / STATE_FILE).write_text(json.dumps(doc))
    with capture_logs() as logs:
        eng = make_engine(state_dir=sd)
    assert eng.verdict(GPU0).state is U and eng.state_file_errors == 0
    assert eng.signals_seen == {"NVIDIA H100 80GB HBM3": {"DCGM_FI_DEV_XID_ERRORS"}}
    assert [e for e in logs if e["event"] == "health_state_signals_seen_ignored"]


@pytest.mark.parametrize("schema", [3, 99])
def test_a_newer_schema_refuses_to_start_and_is_kept(tmp_path: Path, clock: Clock, schema: int) -> None:
    sd = tmp_path / "state"
    sd.mkdir(mode=0o700)
    (sd / STATE_FILE).write_text(json.dumps({"schema": schema, "whatever": ["comes", "next"]}))
    (sd / ".state.json.tmp-left-by-the-newer-one").write_text("x")
    before = fingerprint(sd / STATE_FILE)
    listing = sorted(p.name for p in sd.iterdir())
    eng = HealthEngine(Policy.build(), sd, clock)
    with pytest.raises(StateError) as err:
        eng.start()
    msg = str(err.value)
    assert msg.startswith(f"{sd / STATE_FILE} has schema {schema}, this version reads up to {SCHEMA_VERSION};"), msg
    eng.stop()
    assert fingerprint(sd / STATE_FILE) == before
    assert sorted(p.name for p in sd.iterdir()) == listing  # no socket left, nothing swept or moved aside


@pytest.mark.parametrize("content", [b'{"schema": 0}', b'{"schema": "2"}', b'{"schema": true}', b"{}"])
def test_an_unknowable_schema_is_moved_aside(make_engine: EngineFactory, tmp_path: Path, content: bytes) -> None:
    sd = tmp_path / "state"
    sd.mkdir(mode=0o700)
    (sd / STATE_FILE).write_bytes(content)
    eng = make_engine(state_dir=sd)
    assert eng.state_file_errors == 1
    (aside,) = sd.glob(f"{STATE_FILE}.corrupt-*")
    assert aside.read_bytes() == content


def test_a_fifo_in_place_of_the_state_file_is_moved_aside_not_waited_on(
    make_engine: EngineFactory, tmp_path: Path
) -> None:
    sd = tmp_path / "state"
    sd.mkdir(mode=0o700)
    os.mkfifo(sd / STATE_FILE)  # opening it for reading would wait for a writer: start-up would hang
    eng = make_engine(state_dir=sd)
    assert eng.state_file_errors == 1
    (aside,) = sd.glob(f"{STATE_FILE}.corrupt-*")
    assert stat.S_ISFIFO(aside.lstat().st_mode)


# ---- 4. the state directory is ours alone -----------------------------------------------------------


def test_an_existing_dir_is_made_private(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    sd.mkdir(mode=0o755)
    sd.chmod(0o755)
    with capture_logs() as logs:
        make_engine(state_dir=sd)
    assert stat.S_IMODE(sd.stat().st_mode) == 0o700
    (fixed,) = [e for e in logs if e["event"] == "health_state_dir_mode_fixed"]
    assert (fixed["log_level"], fixed["old_mode"], fixed["new_mode"]) == ("warning", "0755", "0700")
    with capture_logs() as logs:
        make_engine(state_dir=sd).stop()
    assert not [e for e in logs if e["event"] == "health_state_dir_mode_fixed"]  # said only when fixed


def test_a_dir_owned_by_another_user_is_refused_untouched(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    fenced_state_dir(make_engine, sd)
    sd.chmod(0o755)
    os.chown(sd, 65534, 65534)
    before = fingerprint(sd / STATE_FILE)
    eng = HealthEngine(Policy.build(), sd)
    with pytest.raises(StateError) as err:
        eng.start()
    eng.stop()
    assert str(sd) in str(err.value) and "uid 65534" in str(err.value)
    assert fingerprint(sd / STATE_FILE) == before
    assert stat.S_IMODE(sd.stat().st_mode) == 0o755  # not ours to chmod either
    assert sorted(p.name for p in sd.iterdir()) == [STATE_FILE]


def plant(link: Path, target: Path) -> None:
    link.symlink_to(target)
    assert link.is_symlink()


def test_a_symlink_at_the_old_predictable_temp_name_is_not_followed(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    eng = make_engine(state_dir=sd)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    # The name the writer used to pick: pid and thread id, both guessable by anyone on the node.
    plant(sd / f".state.json.tmp-{os.getpid()}-{threading.get_ident()}", victim)
    eng.on_events([xid(79)])  # written synchronously from this thread
    assert victim.read_text() == "precious"
    assert fenced_on_disk(sd) and not (sd / STATE_FILE).is_symlink()


def test_a_symlink_at_the_chosen_temp_name_is_skipped_for_a_new_name(
    make_engine: EngineFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = tmp_path / "state"
    eng = make_engine(state_dir=sd)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    names = iter(["guessed", "taken", "fresh"])
    monkeypatch.setattr(secrets, "token_hex", lambda n=None: next(names))  # what store names temp files with
    plant(sd / ".state.json.tmp-guessed", victim)
    plant(sd / ".state.json.tmp-taken", tmp_path / "dangling")  # a dangling link: O_CREAT would create it
    eng.on_events([xid(79)])
    assert victim.read_text() == "precious" and not (tmp_path / "dangling").exists()
    assert fenced_on_disk(sd) and eng.durability_problem() is None
    assert next(names, None) is None  # three tries: two names in use, the third free


def test_stale_temp_cleanup_unlinks_symlinks_without_following_them(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    fenced_state_dir(make_engine, sd)
    victim_file = tmp_path / "victim"
    victim_file.write_text("precious")
    victim_dir = tmp_path / "victim-dir"
    victim_dir.mkdir()
    (victim_dir / "inside").write_text("precious too")
    plant(sd / ".state.json.tmp-file-link", victim_file)
    plant(sd / ".state.json.tmp-dir-link", victim_dir)
    plant(sd / ".state.json.tmp-dangling", tmp_path / "nothing")
    (sd / ".state.json.tmp-left-by-kill-9").write_text("{")
    eng = make_engine(state_dir=sd)
    assert eng.verdict(GPU0).state is U
    assert sorted(p.name for p in sd.iterdir()) == [STATE_FILE]
    assert victim_file.read_text() == "precious"
    assert (victim_dir / "inside").read_text() == "precious too"
    assert not (tmp_path / "nothing").exists()


def test_the_state_file_is_private(make_engine: EngineFactory, tmp_path: Path) -> None:
    sd = tmp_path / "state"
    fenced_state_dir(make_engine, sd)
    assert stat.S_IMODE((sd / STATE_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(sd.stat().st_mode) == 0o700
