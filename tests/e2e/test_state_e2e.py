"""A fence is never lost: the real daemon on the fake NVML, its state file across failures and restarts."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import FakeNvmlBuild, load_scenario
from tests.e2e.harness import ExporterProcess, free_port, run_exporter
from tests.e2e.nvmlnode import NvmlNode

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


def fenced_on_disk(path: Path, xid: str = "79") -> bool:
    try:
        doc: dict[str, Any] = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return any(
        r.get("signal") == "xid" and r.get("code") == xid and r.get("state") == 2
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
