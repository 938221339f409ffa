"""The daemon as a user runs it: start-up errors, probes, signals (simulated GPUs)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import ExporterProcess, own_families, run_exporter


def cycles(text: str) -> float:
    """Collection cycles so far, from an exposition."""
    m = re.search(r"^gpuhealth_collections_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_bad_flag_exits_2_naming_the_flag() -> None:
    r = run_exporter(["--simulate", "-c", "ten"])
    assert r.returncode == 2
    assert "--collect-interval: 'ten' is not a whole number" in r.stderr


def test_bad_counters_file_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("DCGM_FI_DEV_GPU_TEMP, gauge, t\nDCGM_FI_DEV_BOGUS, gauge, x\n")
    r = run_exporter(["--simulate", "-f", str(csv), "--state-dir", str(tmp_path)])
    assert r.returncode == 2
    assert f"{csv}:2: unknown field 'DCGM_FI_DEV_BOGUS'" in r.stderr


def test_bad_simulate_spec_exits_2() -> None:
    r = run_exporter(["--simulate=gpus=banana"])
    assert r.returncode == 2 and "--simulate" in r.stderr


def test_bad_env_value_exits_2() -> None:
    r = run_exporter(["--simulate"], env={"GPU_HEALTH_EXPORTER_REPLICAS": "0"})
    assert r.returncode == 2 and "--replicas" in r.stderr


def test_missing_nvml_library_exits_1_with_reason(tmp_path: Path) -> None:
    r = run_exporter(["--nvml-library", str(tmp_path / "nope.so"), "--state-dir", str(tmp_path)])
    assert r.returncode == 1
    assert "nope.so" in r.stderr


def test_busy_port_exits_1(tmp_path: Path) -> None:
    first = ExporterProcess(["--simulate"], tmp_path / "a")
    try:
        first.wait_ready()
        r = run_exporter(["--simulate", "-a", f"127.0.0.1:{first.port}", "--state-dir", str(tmp_path / "b")])
        assert r.returncode == 1 and "cannot listen" in r.stderr
    finally:
        first.stop()


def test_serves_simulated_node_and_stops_cleanly(tmp_path: Path) -> None:
    exp = ExporterProcess(["--simulate", "-c", "200"], tmp_path)
    try:
        exp.wait_ready()
        assert exp.get("/health")[0] == 200
        text = exp.metrics()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        temps = families["DCGM_FI_DEV_GPU_TEMP"].samples
        assert len(temps) == 8
        assert temps[0].labels["Hostname"] == "test-node"
        # the exposition changes from cycle to cycle without any scrape-time work
        first = families["gpuhealth_collections"].samples[0].value

        later = exp.wait_for(lambda t: cycles(t) > first + 2)
        assert "DCGM_FI_DEV_POWER_USAGE" in later
    finally:
        assert exp.stop() == 0
    assert '"event": "stopping"' in exp.logs()


def test_sighup_reloads_counters_and_keeps_old_set_on_error(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("DCGM_FI_DEV_GPU_TEMP, gauge, t\n")
    exp = ExporterProcess(["--simulate", "-c", "200", "-f", str(csv)], tmp_path)
    try:
        exp.wait_ready()
        assert "DCGM_FI_DEV_POWER_USAGE" not in exp.metrics()
        csv.write_text("DCGM_FI_DEV_GPU_TEMP, gauge, t\nDCGM_FI_DEV_POWER_USAGE, gauge, p\n")
        exp.proc.send_signal(signal.SIGHUP)
        exp.wait_for(lambda t: "DCGM_FI_DEV_POWER_USAGE{" in t)
        csv.write_text("this is not a counters file\n")
        exp.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "counters_reload_failed" not in exp.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "counters_reload_failed" in exp.logs()
        after = cycles(exp.metrics())
        exp.wait_for(lambda t: cycles(t) > after)  # a cycle after the failed reload
        assert "DCGM_FI_DEV_POWER_USAGE{" in exp.metrics()  # the last good counters file is kept
    finally:
        assert exp.stop() == 0


def test_promtool_accepts_our_own_families(tmp_path: Path) -> None:
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: install Debian's prometheus package (make deps does)"
    exp = ExporterProcess(["--simulate", "-c", "200"], tmp_path)
    try:
        exp.wait_ready()
        text = own_families(exp.metrics())
    finally:
        exp.stop()
    assert "gpuhealth_device_up" in text
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
