"""dcgm-exporter's shipped counters files, given to the daemon with -f: it starts, serves the families
under the files' names and logs one warning per line it cannot serve. Bad files exit 2, naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from exporter.counters import parse_counters
from tests.e2e.harness import ExporterProcess, run_exporter
from tests.upstreamcounters import all_enabled


def log_events(exp: ExporterProcess, event: str) -> list[dict[str, object]]:
    out = []
    for line in exp.logs().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == event:
            out.append(entry)
    return out


def _as_list(value: object) -> list[object]:
    assert isinstance(value, list), value
    return value


def served(text: str) -> set[str]:
    return {line.split(" ")[2] for line in text.splitlines() if line.startswith("# TYPE ")}


@pytest.mark.parametrize("name", ["default-counters.csv", "dcp-metrics-included.csv", "1.x-compatibility-metrics.csv"])
def test_upstream_file_with_every_line_enabled_starts_and_serves_its_names(tmp_path: Path, name: str) -> None:
    csv = tmp_path / name
    csv.write_text(all_enabled(name))
    expected = parse_counters(csv.read_text(), str(csv))
    metrics = {f.metric_name: f.name for f in expected.fields if f.type != "label"}
    exp = ExporterProcess(["--simulate", "-c", "200", "-f", str(csv)], tmp_path / "run")

    def all_served(text: str) -> bool:
        # Every family with a value, but the fields the simulated GPUs do not support (logged as such).
        unsupported = {str(f) for e in log_events(exp, "fields_unsupported") for f in _as_list(e["fields"])}
        return all(f"\n{m}{{" in text for m, field in metrics.items() if field not in unsupported)

    try:
        exp.wait_ready()
        text = exp.wait_for(all_served)
        if name.startswith("1.x"):
            assert "dcgm_sm_clock" in served(text)
            # no family under the catalogue's name when the file spells it otherwise
            assert not [m for m in served(text) if m.startswith("DCGM_FI_")]
        else:
            assert "DCGM_FI_DEV_SM_CLOCK" in served(text)
        skips = log_events(exp, "counters_field_skipped")
        assert len(skips) == len(expected.skipped) > 0  # each commented-out NVLink error line, at least
        assert [f"{s['file']}:{s['line']}: {s['field']}" for s in skips] == [
            m.split(" skipped: ")[0] for m in expected.skipped
        ]
    finally:
        assert exp.stop() == 0


def test_deprecated_name_is_served_under_that_name(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("DCGM_FI_DEV_GPU_TEMP, gauge, t\nDCGM_FI_DEV_CLOCK_THROTTLE_REASONS, gauge, reasons\n")
    exp = ExporterProcess(["--simulate", "-c", "200", "-f", str(csv)], tmp_path / "run")
    try:
        exp.wait_ready()
        text = exp.wait_for(lambda t: "\nDCGM_FI_DEV_CLOCK_THROTTLE_REASONS{" in t)
        assert "# HELP DCGM_FI_DEV_CLOCK_THROTTLE_REASONS reasons\n" in text
        assert "DCGM_FI_DEV_CLOCKS_EVENT_REASONS" not in text
    finally:
        assert exp.stop() == 0


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo.csv"
    os.mkfifo(path)
    return str(path)


def _bad_type(tmp_path: Path) -> str:
    path = tmp_path / "bad.csv"
    path.write_text("DCGM_FI_DEV_GPU_TEMP, gauge, t\n# c\nDCGM_FI_DEV_SM_CLOCK, gauges, s\n")
    return str(path)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda _tmp: "/dev/zero", "/dev/zero: cannot read counters file: not a regular file"),
        (_fifo, "fifo.csv: cannot read counters file: not a regular file (a FIFO)"),
        (lambda tmp: str(tmp), ": cannot read counters file: is a directory"),
        (_bad_type, "bad.csv:3: type 'gauges' of DCGM_FI_DEV_SM_CLOCK"),
    ],
    ids=["dev-zero", "fifo", "directory", "bad-type"],
)
def test_bad_counters_file_exits_2_naming_it(tmp_path: Path, make: object, needle: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    r = run_exporter(["--simulate", "-f", path, "--state-dir", str(tmp_path / "state")], timeout=20)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and path in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
