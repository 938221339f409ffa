from __future__ import annotations

from pathlib import Path

import pytest

from exporter.counters import CountersError, default_counters, load_counters, parse_counters
from exporter.fields import DCGM_DEFAULT_SET, HEALTH_SET

# dcgm-exporter's own default-counters.csv layout: comments, blanks, commas in help.
DCGM_STYLE = """\
# Format
# If line starts with a '#' it is considered a comment
# DCGM FIELD, Prometheus metric type, help message

# Clocks
DCGM_FI_DEV_SM_CLOCK,  gauge, SM clock frequency (in MHz).
DCGM_FI_DEV_MEM_CLOCK, gauge, Memory clock frequency (in MHz).
DCGM_FI_DEV_GPU_UTIL,      gauge, GPU utilization (in %), as seen by NVML.
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION, counter, Total energy consumption since boot (in mJ).
DCGM_FI_DEV_CLOCK_THROTTLE_REASONS, gauge, old name still works
DCGM_FI_DRIVER_VERSION,        label, Driver Version
"""


def test_dcgm_exporter_file_parses() -> None:
    counters = parse_counters(DCGM_STYLE, "default-counters.csv")
    assert counters.names == (
        "DCGM_FI_DEV_SM_CLOCK",
        "DCGM_FI_DEV_MEM_CLOCK",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
        "DCGM_FI_DRIVER_VERSION",
    )
    assert counters.fields[2].help == "GPU utilization (in %), as seen by NVML."


def test_user_type_wins() -> None:
    counters = parse_counters("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION, gauge, energy\n", "x.csv")
    assert counters.fields[0].type == "gauge"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("DCGM_FI_DEV_SM_CLOCK\n", "x.csv:1: expected 'DCGM field, type, help'"),
        ("# c\nDCGM_FI_DEV_NOPE, gauge, x\n", "x.csv:2: unknown field 'DCGM_FI_DEV_NOPE'"),
        ("DCGM_FI_DEV_SM_CLOCK, histogram, x\n", "x.csv:1: type 'histogram'"),
        ("DCGM_FI_DEV_SM_CLOCK, label, x\n", "cannot be of type 'label'"),
        (
            "DCGM_FI_DEV_SM_CLOCK, gauge, x\nDCGM_FI_DEV_SM_CLOCK, gauge, y\n",
            "x.csv:2: DCGM_FI_DEV_SM_CLOCK is listed twice",
        ),
        ("# only comments\n", "x.csv: no fields listed"),
    ],
)
def test_bad_lines_name_file_and_line(text: str, needle: str) -> None:
    with pytest.raises(CountersError) as info:
        parse_counters(text, "x.csv")
    assert needle in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CountersError, match="cannot read counters file"):
        load_counters(str(tmp_path / "absent.csv"))


def test_default_set_is_dcgm_defaults_plus_health() -> None:
    names = default_counters().names
    assert names == DCGM_DEFAULT_SET + HEALTH_SET
    assert len([n for n in DCGM_DEFAULT_SET if "PROF" not in n and n != "DCGM_FI_DRIVER_VERSION"]) == 20
