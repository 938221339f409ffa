"""End to end through the real pynvml binding and our C fake of libnvidia-ml.so.1.

Golden expositions per shipped scenario (node_exporter style: regenerate with
UPDATE_GOLDEN=1 and review the diff), then one test per fault.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import own_families
from tests.e2e.nvmlnode import GOLDEN, SCENARIOS, NvmlNode, frozen, normalise
from tests.fakenvmllib import FakeNvmlBuild, load_scenario
from tests.upstreamcounters import all_enabled


def cycles(text: str) -> float:
    m = re.search(r"^gpuhealth_collections_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_golden_exposition(scenario: str, fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = NvmlNode(
        fakenvml_build, tmp_path, frozen(load_scenario(scenario)), ["-c", "200"], old_driver=SCENARIOS[scenario]
    )
    exp = node.exporter
    try:
        exp.wait_ready()
        text = exp.wait_for(lambda t: cycles(t) >= 3)  # rates need two reads
    finally:
        assert exp.stop() == 0
    list(text_string_to_metric_families(text))  # parses as a whole
    lint = subprocess.run(["promtool", "check", "metrics"], input=own_families(text), capture_output=True, text=True)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr
    got = normalise(text)
    path = GOLDEN / f"{scenario}.prom"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(got)
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1 and review it"
    assert got == path.read_text(), f"exposition differs from {path} (UPDATE_GOLDEN=1 regenerates)"


def test_golden_exposition_with_every_upstream_counters_line(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    """dcgm-exporter's default-counters.csv with every commented line enabled (label fields, violations,
    ECC, NVLink, DCGM_EXP_* families) on the MIG scenario: the whole drop-in exposition, held as a golden."""
    counters = tmp_path / "default-counters.csv"
    counters.write_text(all_enabled("default-counters.csv"))
    node = NvmlNode(fakenvml_build, tmp_path, frozen(load_scenario("mig")), ["-c", "200", "-f", str(counters)])
    exp = node.exporter
    try:
        exp.wait_ready()
        text = exp.wait_for(lambda t: cycles(t) >= 3)
    finally:
        assert exp.stop() == 0
    list(text_string_to_metric_families(text))
    # A clock-event count is the number of cycles in the window that had the reason: it grows with uptime.
    got = re.sub(r"^(DCGM_EXP_CLOCK_EVENTS_COUNT\{[^}]*clock_event=[^}]*\}) \d+$", r"\1 N", normalise(text), flags=re.M)
    path = GOLDEN / "mig-upstream-counters.prom"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(got)
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1 and review it"
    assert got == path.read_text(), f"exposition differs from {path} (UPDATE_GOLDEN=1 regenerates)"


def small_node(build: FakeNvmlBuild, tmp: Path, *args: str) -> NvmlNode:
    """Two H100s from the 8-GPU scenario: faster, same behaviour."""
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:2]
    return NvmlNode(build, tmp, scenario, ["-c", "200", *args])


def test_lost_gpu_goes_down_others_keep_serving(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = small_node(fakenvml_build, tmp_path)
    exp = node.exporter
    try:
        exp.wait_ready()
        node.control("lost", gpu=1)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_device_up", gpu="1") == 0)
        assert node.value(text, "gpuhealth_device_up", gpu="0") == 1
        assert node.value(text, "DCGM_FI_DEV_GPU_TEMP", gpu="0") is not None
        assert node.value(text, "DCGM_FI_DEV_GPU_TEMP", gpu="1") is None
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 2)
        assert 'signal="gpu_lost"' in text
        assert exp.get("/ready")[0] == 200  # one lost GPU degrades one part, not the exporter
        # the GPU comes back (e.g. after a reset): collected again, but still fenced until an operator clears it
        node.control("recover", gpu=1)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_device_up", gpu="1") == 1, timeout=30)
        assert node.value(text, "DCGM_FI_DEV_GPU_TEMP", gpu="1") is not None
        assert node.value(text, "gpuhealth_health_state", gpu="1") == 2
    finally:
        assert exp.stop() == 0


def test_hung_nvml_call_never_blocks_scrapes_or_other_gpus(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = small_node(fakenvml_build, tmp_path, "--device-timeout", "300", "--health-nvml-timeout-grace", "2")
    exp = node.exporter
    try:
        exp.wait_ready()
        node.control("hang", gpu=0, call="nvmlDeviceGetPowerUsage", seconds=60)
        text = exp.wait_for(lambda t: (node.value(t, "gpuhealth_device_data_age_seconds", gpu="0") or 0) > 1.0)
        # the hung GPU is served stale; the other one stays fresh, and scrapes stay fast
        assert node.value(text, "gpuhealth_device_data_age_seconds", gpu="1") == 0
        assert node.value(text, "DCGM_FI_DEV_GPU_TEMP", gpu="0") is not None
        t0 = time.monotonic()
        for _ in range(20):
            exp.metrics()
        assert time.monotonic() - t0 < 2.0
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="0") == 2, timeout=20)
        assert 'signal="nvml_timeout"' in text
        assert node.value(text, "gpuhealth_health_state", gpu="1") == 0
        assert "device_read_late" in exp.logs()
    finally:
        node.control("clear", gpu=0)
        assert exp.stop() == 0


def test_error_op_counts_nvml_errors_and_recovers(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = small_node(fakenvml_build, tmp_path)
    exp = node.exporter
    try:
        exp.wait_ready()
        node.control("error", gpu=0, call="nvmlDeviceGetClockInfo", code=999, count=3)
        text = exp.wait_for(lambda t: 'gpuhealth_nvml_errors_total{field="DCGM_FI_DEV_SM_CLOCK",error="' in t)
        assert node.value(text, "gpuhealth_device_up", gpu="0") == 1
        exp.wait_for(lambda t: node.value(t, "DCGM_FI_DEV_SM_CLOCK", gpu="0") is not None)
    finally:
        assert exp.stop() == 0


@pytest.mark.parametrize(
    ("field", "value", "signal"),
    [
        ("DCGM_FI_DEV_ROW_REMAP_FAILURE", 1, "row_remap_failure"),
        ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", 3, "dbe"),
        ("DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", 2, "recovery_action"),
    ],
)
def test_polled_health_signals_fence(
    field: str, value: int, signal: str, fakenvml_build: FakeNvmlBuild, tmp_path: Path
) -> None:
    node = small_node(fakenvml_build, tmp_path)
    exp = node.exporter
    try:
        exp.wait_ready()
        node.control("set", gpu=1, field=field, value=value)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", gpu="1") == 2)
        assert f'signal="{signal}"' in text
        assert node.value(text, "gpuhealth_health_state", gpu="0") == 0
    finally:
        assert exp.stop() == 0


def test_xid_13_counts_but_stays_healthy_unless_configured(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    for args, expected in (((), 0), (("--health-fence-xids", "13"), 2)):
        node = small_node(fakenvml_build, tmp_path / str(expected), *args)
        exp = node.exporter
        try:
            exp.wait_ready()
            node.control("xid", gpu=0, xid=13)
            text = exp.wait_for(lambda t: 'xid="13"' in t and "gpuhealth_xid_errors_total{" in t)
            assert node.value(text, "DCGM_FI_DEV_XID_ERRORS", gpu="0") == 13
            assert 'err_code="13"' in text
            assert node.value(text, "gpuhealth_health_state", gpu="0") == expected
        finally:
            assert exp.stop() == 0


def test_xid_storm_does_not_stall_collection_or_grow_memory(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = small_node(fakenvml_build, tmp_path)
    exp = node.exporter
    try:
        exp.wait_ready()
        rss0 = _rss_mb(exp.proc.pid)
        with open(node.control_path, "a") as fh:
            for i in range(20000):
                fh.write(json.dumps({"op": "xid", "gpu": i % 2, "xid": 13 if i % 3 else 31}) + "\n")
        before = cycles(exp.metrics())
        # collection keeps turning during the storm
        exp.wait_for(lambda t: cycles(t) >= before + 10, timeout=30)

        def xid_total(t: str) -> float:
            return sum(
                float(x.rsplit(" ", 1)[1]) for x in t.splitlines() if x.startswith("gpuhealth_xid_errors_total{")
            )

        # NVML (and the fake) drop events when their queue is full: what arrives is counted exactly once
        counted = xid_total(exp.metrics())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = xid_total(exp.metrics())
            if now == counted:
                break
            counted = now
        assert 200 <= counted <= 20000
        assert _rss_mb(exp.proc.pid) - rss0 < 40
        assert exp.get("/ready")[0] == 200
    finally:
        assert exp.stop() == 0


def _rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert m
    return int(m.group(1)) / 1024


def test_mig_reconfiguration_is_rediscovered(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = NvmlNode(fakenvml_build, tmp_path, "mig", ["-c", "200"])
    exp = node.exporter
    try:
        exp.wait_ready()
        text = exp.metrics()
        assert node.value(text, "DCGM_FI_DEV_FB_USED", gpu="1", GPU_I_ID="1") is None
        assert node.value(text, "DCGM_FI_DEV_GPU_UTIL", gpu="1") is not None  # no MIG yet: utilisation works
        node.control(
            "mig",
            gpu=1,
            enabled=True,
            instances=[
                {
                    "gi": 1,
                    "ci": 0,
                    "profile": "7g.80gb",
                    "uuid": "MIG-77777777-7777-4777-8777-777777777777",
                    "memory": {"total": 84825604096, "reserved": 0, "used": 2 << 30},
                    "bar1": {"total": 34359738368, "used": 1 << 20},
                }
            ],
        )
        # the MigConfigChange event triggers re-enumeration: the new instance is served, the GPU's
        # utilisation (unsupported with MIG on) is gone
        text = exp.wait_for(lambda t: node.value(t, "DCGM_FI_DEV_FB_USED", gpu="1", GPU_I_ID="1") == 2048)
        # DCGM names the profile from its memory, rounded up to GiB: 80896 MiB is "7g.79gb" (the NVML name
        # says 7g.80gb), as dcgm-exporter shows it on such H100s
        assert 'GPU_I_PROFILE="7g.79gb"' in text
        exp.wait_for(lambda t: node.value(t, "DCGM_FI_DEV_GPU_UTIL", gpu="1") is None)
        # and back: with MIG off, utilisation (learned as NOT_SUPPORTED meanwhile) is asked for again
        node.control("mig", gpu=1, enabled=False, instances=[])
        text = exp.wait_for(lambda t: node.value(t, "DCGM_FI_DEV_GPU_UTIL", gpu="1") is not None)
        assert node.value(text, "DCGM_FI_DEV_FB_USED", gpu="1", GPU_I_ID="1") is None
    finally:
        assert exp.stop() == 0


def test_vanished_gpu_is_fenced_and_stays_visible(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    node = small_node(fakenvml_build, tmp_path)
    exp = node.exporter
    try:
        exp.wait_ready()
        devices = json.loads(exp.get("/gpus")[1])["devices"]
        uuid1 = next(d["uuid"] for d in devices if d.get("index") == 1 and "parent" not in d)
        node.control("vanish", gpu=1)
        text = exp.wait_for(lambda t: node.value(t, "gpuhealth_health_state", uuid=uuid1) == 2, timeout=90)
        assert 'signal="vanished"' in text or 'signal="gpu_lost"' in text
        assert node.value(text, "gpuhealth_gpus") is None or "gpuhealth_gpus 1" in text
    finally:
        assert exp.stop() == 0
