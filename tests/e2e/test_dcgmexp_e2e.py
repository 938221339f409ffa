"""The DCGM_EXP_* families through the real daemon on the fake NVML: served with the counters file's
HELP and TYPE when it lists them (and after a SIGHUP that adds them), absent when it does not."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.e2e.nvmlnode import NvmlNode
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

BASE = """\
DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature (in C).
DCGM_FI_DRIVER_VERSION, label, Driver Version
DCGM_FI_DEV_XID_ERRORS, gauge, Value of the last XID error encountered.
"""
EXP = """\
DCGM_EXP_XID_ERRORS_COUNT, gauge, XIDs within the window (test help).
DCGM_EXP_CLOCK_EVENTS_COUNT, gauge, Clock events within the window (test help).
DCGM_EXP_GPU_HEALTH_STATUS, gauge, Health per watch (test help).
DCGM_EXP_P2P_STATUS, gauge, P2P status (test help).
"""
HW_THERMAL_AND_IDLE = 0x41


def node(build: FakeNvmlBuild, tmp: Path, counters: str) -> NvmlNode:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:2]
    path = tmp / "counters.csv"
    path.write_text(counters)
    return NvmlNode(build, tmp, scenario, ["-c", "200", "-f", str(path)])


def lines(text: str, family: str, **labels: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if line.startswith(family + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
    ]


def test_listed_families_are_served_with_the_files_help(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    n = node(fakenvml_build, tmp_path, BASE + EXP)
    exp = n.exporter
    try:
        exp.wait_ready()
        text = exp.metrics()
        assert "# HELP DCGM_EXP_XID_ERRORS_COUNT XIDs within the window (test help).\n" in text
        assert "# TYPE DCGM_EXP_XID_ERRORS_COUNT gauge\n" in text
        # Before any XID: one zero series per GPU, without the xid label.
        zero = lines(text, "DCGM_EXP_XID_ERRORS_COUNT")
        assert len(zero) == 2 and all(re.search(r',window_size_in_ms="300000"\} 0$', z) for z in zero)
        assert all('DCGM_FI_DRIVER_VERSION="550.90.07",window_size_in_ms=' in z for z in zero)
        # Every watch passes on both GPUs.
        health = lines(text, "DCGM_EXP_GPU_HEALTH_STATUS")
        assert len(health) == 2 * 11
        assert all('health_error_code="DCGM_FR_OK",health_watch=' in h and h.endswith(" 0") for h in health)

        n.control("xid", gpu=0, xid=79)
        n.control("set", gpu=1, field="DCGM_FI_DEV_CLOCKS_EVENT_REASONS", value=HW_THERMAL_AND_IDLE)
        text = exp.wait_for(
            lambda t: (
                bool(lines(t, "DCGM_EXP_XID_ERRORS_COUNT", gpu="0", xid="79"))
                and bool(lines(t, "DCGM_EXP_CLOCK_EVENTS_COUNT", gpu="1", clock_event="hw_thermal"))
                and bool(
                    lines(
                        t,
                        "DCGM_EXP_GPU_HEALTH_STATUS",
                        gpu="0",
                        health_watch="ALL",
                        health_error_code="DCGM_FR_FALLEN_OFF_BUS",
                    )
                )
            )
        )
        assert lines(text, "DCGM_EXP_XID_ERRORS_COUNT", gpu="0", xid="79")[0].endswith(
            'window_size_in_ms="300000",xid="79"} 1'
        )
        assert lines(text, "DCGM_EXP_XID_ERRORS_COUNT", gpu="1")[0].endswith('window_size_in_ms="300000"} 0')
        assert lines(text, "DCGM_EXP_GPU_HEALTH_STATUS", gpu="0", health_watch="ALL")[0].endswith(" 20")
        clock = lines(text, "DCGM_EXP_CLOCK_EVENTS_COUNT", gpu="1")
        assert {re.search(r'clock_event="(\w+)"', c).group(1) for c in clock} == {"gpu_idle", "hw_thermal"}  # type: ignore[union-attr]
        assert all('window_size_in_ms="300000"' in c for c in clock)
        assert "# HELP DCGM_EXP_CLOCK_EVENTS_COUNT Clock events within the window (test help).\n" in text
        # GPU 0's reasons stay 0: sampled, nothing to count, no series (as upstream).
        assert lines(text, "DCGM_EXP_CLOCK_EVENTS_COUNT", gpu="0") == []
        # The field is read for the family but not exported: the file does not list it.
        assert "DCGM_FI_DEV_CLOCKS_EVENT_REASONS" not in text
        # P2P status per GPU pair, from nvmlDeviceGetP2PStatus(NVLINK) at discovery.
        p2p = lines(text, "DCGM_EXP_P2P_STATUS")
        assert len(p2p) == 2 and "counter_skipped" not in exp.logs()
        # h100x8 links every GPU pair by NVLink: OK both ways
        assert p2p[0].startswith('DCGM_EXP_P2P_STATUS{gpu="0"') and p2p[0].endswith('link_status="OK",peer_gpu="1"} 0')
        assert p2p[1].startswith('DCGM_EXP_P2P_STATUS{gpu="1"') and p2p[1].endswith('link_status="OK",peer_gpu="0"} 0')
        assert 'gpuhealth_render_success{part="dcgm_exp"} 1' in text
    finally:
        assert exp.stop() == 0


def test_unlisted_families_are_absent_until_a_reload_lists_them(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    n = node(fakenvml_build, tmp_path, BASE)
    exp = n.exporter
    try:
        exp.wait_ready()
        n.control("xid", gpu=0, xid=48)
        text = exp.wait_for(lambda t: bool(lines(t, "DCGM_FI_DEV_XID_ERRORS", gpu="0", err_code="48")))
        assert 'err_msg="Double Bit ECC Error"' in lines(text, "DCGM_FI_DEV_XID_ERRORS", gpu="0")[0]
        assert "DCGM_EXP_" not in text

        (tmp_path / "counters.csv").write_text(BASE + EXP)
        exp.proc.send_signal(signal.SIGHUP)
        text = exp.wait_for(lambda t: bool(lines(t, "DCGM_EXP_XID_ERRORS_COUNT", gpu="0", xid="48")))
        assert lines(text, "DCGM_EXP_XID_ERRORS_COUNT", gpu="0", xid="48")[0].endswith(" 1")
        assert lines(text, "DCGM_EXP_GPU_HEALTH_STATUS", gpu="0", health_watch="ALL")[0].endswith(
            'health_error_code="DCGM_FR_XID_ERROR",health_watch="ALL"} 20'
        )
    finally:
        assert exp.stop() == 0


@pytest.mark.parametrize("window", ["1000"])
def test_clock_events_window_flag_is_the_window_label(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, window: str
) -> None:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:1]
    path = tmp_path / "counters.csv"
    path.write_text(BASE + "DCGM_EXP_CLOCK_EVENTS_COUNT, gauge, Clock events.\n")
    n = NvmlNode(
        fakenvml_build, tmp_path, scenario, ["-c", "200", "-f", str(path), "--clock-events-count-window-size", window]
    )
    exp = n.exporter
    try:
        exp.wait_ready()
        n.control("set", gpu=0, field="DCGM_FI_DEV_CLOCKS_EVENT_REASONS", value=0x4)
        text = exp.wait_for(lambda t: bool(lines(t, "DCGM_EXP_CLOCK_EVENTS_COUNT", clock_event="power_cap")))
        assert f'clock_event="power_cap",window_size_in_ms="{window}"' in text
        # Back to no reason: the 1 s window empties of set bits, and the series goes (sampled, nothing set).
        n.control("set", gpu=0, field="DCGM_FI_DEV_CLOCKS_EVENT_REASONS", value=0)
        exp.wait_for(lambda t: not lines(t, "DCGM_EXP_CLOCK_EVENTS_COUNT"))
    finally:
        assert exp.stop() == 0
