"""A fence is never lost: the real daemon on the fake NVML, its state file across failures and restarts."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.harness import ExporterProcess, free_port, run_exporter
from tests.e2e.nvmlnode import NvmlNode
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

GPU1_FENCED = {"gpu": "1"}


def two_gpu_node(build: FakeNvmlBuild, tmp: Path, *args: str) -> NvmlNode:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:2]
    return NvmlNode(build, tmp, scenario, ["-c", "500", *args])


def state_file(node: NvmlNode) -> Path:
    return node.state_dir / "state.json"


def fingerprint(path: Path) -> tuple[bytes, int, int]:
    """Bytes, inode and mtime: even a rewrite with the same bytes changes the inode (write + rename)."""
    st = path.stat()
    return path.read_bytes(), st.st_ino, st.st_mtime_ns


def eventually(what: str, check: Callable[[], bool], timeout: float = 15.0, logs: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}\n{logs()}")


def fenced_on_disk(path: Path, reason: str = "xid") -> bool:
    """Does the file at `path` fence a device for `reason` (XID 79 for "xid")?"""
    try:
        doc: dict[str, Any] = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return any(
        r.get("signal") == reason and (reason != "xid" or r.get("code") == "79") and r.get("state") == 2
        for dev in doc.get("devices", {}).values()
        for r in dev.get("reasons", [])
    )


def fence_gpu1(node: NvmlNode) -> None:
    node.control("xid", gpu=1, xid=79)
    node.exporter.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 2)


def assert_fenced_after_restart(node: NvmlNode) -> ExporterProcess:
    exp = node.restart()
    exp.wait_ready()
    text = exp.metrics()
    assert node.value(text, "gpuhealth_health_state", gpu="1") == 2, exp.logs()
    assert node.value(text, "gpuhealth_health_state", gpu="0") == 0
    return exp


def broken_start(node: NvmlNode, *, env: dict[str, str] | None = None, lib: str | None = None) -> str:
    """Start the daemon on the node's state dir with a broken NVML; returns its output."""
    args = [
        "-a",
        f"127.0.0.1:{free_port()}",
        "--state-dir",
        str(node.state_dir),
        "--log-format",
        "json",
        "--nvml-library",
        lib or str(node.lib),
    ]
    proc = run_exporter(args, env={**node.env, **(env or {})})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


# ---- 1. a start that fails must not touch the state ------------------------------------------------


def test_failed_start_leaves_the_state_file_untouched(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = two_gpu_node(fakenvml_build, tmp_path)
    node.exporter.wait_ready()
    fence_gpu1(node)
    assert node.exporter.stop() == 0
    before = fingerprint(state_file(node))
    assert fenced_on_disk(state_file(node))
    listing = sorted(os.listdir(node.state_dir))

    out = broken_start(node, env={"FAKENVML_CONFIG": "/nonexistent"})  # driver not loaded
    assert "startup_failed" in out
    assert fingerprint(state_file(node)) == before
    out = broken_start(node, lib="/missing.so")
    assert "startup_failed" in out
    assert fingerprint(state_file(node)) == before
    assert sorted(os.listdir(node.state_dir)) == listing  # nothing moved aside, no temp left

    exp = assert_fenced_after_restart(node)
    assert exp.stop() == 0


# ---- 2. a write that fails is retried until it is durable --------------------------------------------


def metric(text: str, name: str) -> float | None:
    """The value of an unlabelled family."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ", 1)[1])
    return None


def log_lines(exp: ExporterProcess, event: str) -> list[dict[str, Any]]:
    out = []
    for line in exp.log_path.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def test_emfile_on_a_fence_write_is_retried_and_the_fence_survives_kill_9(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path
) -> None:
    # The fence comes from hung reads on GPU 1 outlasting the grace period, not from an XID: with
    # RLIMIT_NOFILE at 3 the fake NVML cannot open its control file, so an XID injected then would
    # never arrive. The hang is in place before the limit drops; the fence follows on its own.
    node = two_gpu_node(fakenvml_build, tmp_path, "--device-timeout", "300", "--health-nvml-timeout-grace", "4")
    exp = node.exporter
    exp.wait_ready()
    pid = exp.proc.pid
    node.control("hang", gpu=1, call="nvmlDeviceGetFieldValues", seconds=3600)
    eventually("GPU 1 reads hang", lambda: bool(log_lines(exp, "device_read_late")), logs=exp.logs)
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, old[1]))
    try:
        eventually(
            "health_state_write_failed with EMFILE",
            lambda: any("Too many open files" in e["error"] for e in log_lines(exp, "health_state_write_failed")),
            logs=exp.logs,
        )
        assert [e for e in log_lines(exp, "health_transition") if e["state"] == "unhealthy"]
        # Released as soon as the fake can read its control file again, so that no later count
        # change of the hang rewrites the file by chance: only a retry of the failed write can.
        node.control("clear", gpu=1)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, old)
    eventually(
        "the retry puts the fence on disk", lambda: fenced_on_disk(state_file(node), "nvml_timeout"), logs=exp.logs
    )
    eventually(
        "health_state_write_recovered", lambda: bool(log_lines(exp, "health_state_write_recovered")), logs=exp.logs
    )
    failures = metric(exp.metrics(), "gpuhealth_health_state_write_failures_total")
    assert failures is not None and failures >= 1
    exp.stop(signal.SIGKILL)
    exp = assert_fenced_after_restart(node)
    assert exp.stop() == 0


def test_a_directory_in_the_way_is_retried_until_the_fence_lands(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = two_gpu_node(fakenvml_build, tmp_path)
    exp = node.exporter
    exp.wait_ready()
    sf = state_file(node)
    sf.unlink(missing_ok=True)
    sf.mkdir()
    (sf / "keep").write_text("rename(2) cannot replace a non-empty directory")
    node.control("xid", gpu=1, xid=79)
    # The verdict is served from memory at once; only the file is behind.
    exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 2)
    text = exp.wait_for(lambda t: (metric(t, "gpuhealth_health_state_write_failures_total") or 0) >= 1)
    assert "# HELP gpuhealth_health_state_write_failures_total Failed writes of the health state file" in text
    failed = log_lines(exp, "health_state_write_failed")
    assert failed and failed[0]["path"] == str(sf), exp.logs()
    # Not ready while the newest verdict is not durable (HealthEngine.durability_problem).
    status, body = exp.get("/ready")
    assert status == 503 and b"health state not on disk since" in body and b"Is a directory" in body, body
    # Still failing a while later: retried, with backoff, and logged once per streak rather than per try.
    exp.wait_for(lambda t: (metric(t, "gpuhealth_health_state_write_failures_total") or 0) >= 3)
    assert len(log_lines(exp, "health_state_write_failed")) == 1
    assert not fenced_on_disk(sf)

    shutil.rmtree(sf)
    eventually("the retry puts the fence on disk", lambda: fenced_on_disk(sf), logs=exp.logs)
    eventually(
        "health_state_write_recovered", lambda: bool(log_lines(exp, "health_state_write_recovered")), logs=exp.logs
    )
    exp.wait_ready(timeout=10)
    exp.stop(signal.SIGKILL)
    exp = assert_fenced_after_restart(node)
    assert exp.stop() == 0


# ---- 3. a state file from another version is never discarded ----------------------------------------

GPU1_UUID = load_scenario("h100x8")["devices"][1]["uuid"]


def schema_1_doc() -> dict[str, Any]:
    """A state file as version 1 of the exporter wrote it: GPU 1 fenced by XID 79."""
    t = time.time() - 3600
    reason = {
        "signal": "xid",
        "code": "79",
        "message": "GPU has fallen off the bus",
        "first_seen": t,
        "last_seen": t,
        "count": 1,
        "action": "reboot_node",
        "state": 2,
        "level": False,
        "class": "fence",
    }
    return {
        "schema": 1,
        "written_at": t,
        "devices": {
            GPU1_UUID: {
                "meta": {"kind": "gpu", "parent": None, "index": 1, "gi": None},
                "reasons": [reason],
                "baseline": {},
            }
        },
        "xid_counts": [{"gpu": GPU1_UUID, "xid": 79, "class": "fence", "count": 1}],
        "clears_total": 0,
    }


def seeded_node(build: FakeNvmlBuild, tmp: Path, content: bytes) -> NvmlNode:
    """A node whose state dir holds `content` as state.json before the daemon (re)starts on it."""
    node = two_gpu_node(build, tmp)
    node.exporter.wait_ready()
    assert node.exporter.stop() == 0
    state_file(node).write_bytes(content)
    return node


def test_a_schema_1_file_is_migrated_and_keeps_its_fence(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = seeded_node(fakenvml_build, tmp_path, json.dumps(schema_1_doc()).encode())
    exp = node.restart()
    exp.wait_ready()
    text = exp.metrics()
    assert node.value(text, "gpuhealth_health_state", gpu="1") == 2, exp.logs()
    assert node.value(text, "gpuhealth_xid_errors_total", gpu="1", xid="79") == 1
    assert not list(node.state_dir.glob("state.json.corrupt-*"))
    node.control("xid", gpu=0, xid=13)  # an application XID: counted only, written by the coalescing writer

    def migrated() -> bool:
        doc = json.loads(state_file(node).read_bytes())
        return bool(doc["schema"] == 2 and doc["xid_counts"] != schema_1_doc()["xid_counts"])

    eventually("the file is rewritten as schema 2", migrated, logs=exp.logs)
    doc = json.loads(state_file(node).read_bytes())
    assert isinstance(doc["signals_seen"], dict)
    assert fenced_on_disk(state_file(node))
    assert {(c["xid"], c["count"]) for c in doc["xid_counts"]} == {(79, 1), (13, 1)}
    assert exp.stop() == 0


def test_a_newer_schema_refuses_to_start_and_keeps_the_file(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    newer = {**schema_1_doc(), "schema": 3, "something_new": {"we": "cannot judge"}}
    node = seeded_node(fakenvml_build, tmp_path, json.dumps(newer, indent=1).encode())
    before = fingerprint(state_file(node))
    listing = sorted(os.listdir(node.state_dir))
    args = ["-a", f"127.0.0.1:{free_port()}", "--state-dir", str(node.state_dir), *node.args]
    proc = run_exporter(args, env=node.env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = [line for line in proc.stderr.splitlines() if line.startswith("gpu-health-exporter: ")]
    assert message, proc.stderr
    assert str(state_file(node)) in message[0] and "schema 3" in message[0] and "up to 2" in message[0], message
    assert fingerprint(state_file(node)) == before
    assert sorted(os.listdir(node.state_dir)) == listing


# ---- 4. the state directory is ours alone -----------------------------------------------------------


def test_a_group_readable_state_dir_is_made_private(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = seeded_node(fakenvml_build, tmp_path, json.dumps(schema_1_doc()).encode())
    node.state_dir.chmod(0o755)
    exp = node.restart()
    exp.wait_ready()
    assert stat.S_IMODE(node.state_dir.stat().st_mode) == 0o700
    (fixed,) = log_lines(exp, "health_state_dir_mode_fixed")
    assert fixed["level"] == "warning"
    assert (fixed["path"], fixed["old_mode"], fixed["new_mode"]) == (str(node.state_dir), "0755", "0700")
    assert node.value(exp.metrics(), "gpuhealth_health_state", gpu="1") == 2
    assert exp.stop() == 0


def test_a_state_dir_owned_by_another_user_refuses_to_start(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = seeded_node(fakenvml_build, tmp_path, json.dumps(schema_1_doc()).encode())
    os.chown(node.state_dir, 65534, 65534)
    before = fingerprint(state_file(node))
    listing = sorted(os.listdir(node.state_dir))
    mode = node.state_dir.stat().st_mode
    args = ["-a", f"127.0.0.1:{free_port()}", "--state-dir", str(node.state_dir), *node.args]
    proc = run_exporter(args, env=node.env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = [line for line in proc.stderr.splitlines() if line.startswith("gpu-health-exporter: ")]
    assert message and str(node.state_dir) in message[0] and "uid 65534" in message[0], proc.stderr
    assert fingerprint(state_file(node)) == before
    assert sorted(os.listdir(node.state_dir)) == listing  # no control socket, nothing swept or written
    assert node.state_dir.stat().st_mode == mode and node.state_dir.stat().st_uid == 65534
