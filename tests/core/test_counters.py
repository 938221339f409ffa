from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import structlog

from exporter import dcgmfields
from exporter.counters import (
    CountersError,
    CounterSet,
    ExporterCounter,
    default_counters,
    load_counters,
    parse_counters,
)
from exporter.countersfile import MAX_BYTES, read_counters_file, records
from exporter.fields import CATALOGUE, DCGM_DEFAULT_SET, DCP, HEALTH_SET, FieldSpec, lookup
from tests.upstreamcounters import UPSTREAM, UPSTREAM_FILES, commented_lines, uncomment


def spec(counters: CounterSet, metric: str) -> FieldSpec:
    return next(f for f in counters.fields if f.metric_name == metric)


# --- rule 1: dcgm-exporter's own files start unchanged ---


@pytest.mark.parametrize("name", UPSTREAM_FILES)
def test_upstream_file_parses(name: str) -> None:
    counters = parse_counters((UPSTREAM / name).read_text(), name)
    assert counters.fields


def _commented_cases() -> list[tuple[str, int]]:
    return [(name, i) for name in UPSTREAM_FILES for i in commented_lines((UPSTREAM / name).read_text())]


@pytest.mark.parametrize(("name", "index"), _commented_cases())
def test_each_commented_upstream_line_enabled_alone(name: str, index: int) -> None:
    text = uncomment((UPSTREAM / name).read_text(), [index])
    counters = parse_counters(text, name)
    field = text.split("\n")[index].split(",")[0].strip()
    line = index + 1
    kept = any(f.metric_name == field for f in counters.fields)
    exp = counters.exporter_counter(field) is not None
    skipped = [m for m in counters.skipped if m.startswith(f"{name}:{line}: {field}")]
    assert kept or exp or skipped, (field, counters.skipped)


@pytest.mark.parametrize("name", UPSTREAM_FILES)
def test_upstream_file_with_every_commented_line_enabled(name: str) -> None:
    text = (UPSTREAM / name).read_text()
    counters = parse_counters(uncomment(text, commented_lines(text)), name)
    assert counters.fields


def test_1x_names_are_the_metric_names_values_stay_keyed_by_the_field() -> None:
    counters = parse_counters((UPSTREAM / "1.x-compatibility-metrics.csv").read_text(), "1.x.csv")
    sm = spec(counters, "dcgm_sm_clock")
    assert sm.name == "DCGM_FI_DEV_SM_CLOCK" and sm.metric == "dcgm_sm_clock"
    assert spec(counters, "dcgm_fi_prof_pcie_tx_bytes").name == "DCGM_FI_PROF_PCIE_TX_BYTES"
    assert spec(counters, "dcgm_xid_errors").name == "DCGM_FI_DEV_XID_ERRORS"
    # dcgm-exporter's file lists dcgm_fi_prof_pcie_tx_bytes twice: one family, the first line's.
    assert [f.metric_name for f in counters.fields].count("dcgm_fi_prof_pcie_tx_bytes") == 1
    assert spec(counters, "dcgm_fi_prof_pcie_tx_bytes").help.startswith("Total number of bytes transmitted")
    assert any("dcgm_fi_prof_pcie_tx_bytes" in m and "listed again" in m for m in counters.skipped)


def test_default_counters_file_keeps_the_catalogue_names() -> None:
    counters = parse_counters((UPSTREAM / "default-counters.csv").read_text(), "d.csv")
    assert all(f.metric == "" for f in counters.fields)
    assert "DCGM_FI_DEV_SM_CLOCK" in counters.names
    assert "DCGM_FI_DRIVER_VERSION" in counters.names


# --- names: every DCGM field, legacy names, aliases, DCGM_EXP_* ---


def test_deprecated_alias_is_exported_under_its_own_name() -> None:
    counters = parse_counters("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS, gauge, old name\n", "x.csv")
    (f,) = counters.fields
    assert f.name == "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"
    assert f.metric_name == "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"
    assert f.help == "old name"


def test_current_dcgm_spelling_of_a_catalogue_field_resolves_by_id() -> None:
    # DCGM 4.6 renamed DCGM_FI_DEV_GPU_TEMP (150) to DCGM_FI_DEV_GPU_TEMP_CELSIUS.
    (f,) = parse_counters("DCGM_FI_DEV_GPU_TEMP_CELSIUS, gauge, t\n", "x.csv").fields
    assert f.name == "DCGM_FI_DEV_GPU_TEMP" and f.metric_name == "DCGM_FI_DEV_GPU_TEMP_CELSIUS"


def test_catalogue_name_has_no_metric_override() -> None:
    (f,) = parse_counters("DCGM_FI_DEV_SM_CLOCK, gauge, s\n", "x.csv").fields
    assert f.metric == "" and f.metric_name == "DCGM_FI_DEV_SM_CLOCK"


def test_exporter_counters_are_parsed_not_fields() -> None:
    text = "".join(f"{name}, counter, help {name}\n" for name in dcgmfields.EXPORTER_COUNTERS)
    text += "DCGM_FI_DEV_SM_CLOCK, gauge, s\n"
    counters = parse_counters(text, "x.csv")
    assert counters.names == ("DCGM_FI_DEV_SM_CLOCK",)
    assert counters.exporter_counters == tuple(
        ExporterCounter(name, "counter", f"help {name}") for name in dcgmfields.EXPORTER_COUNTERS
    )


def test_only_exporter_counters_is_a_valid_file() -> None:
    counters = parse_counters("DCGM_EXP_XID_ERRORS_COUNT, gauge, xids\n", "x.csv")
    assert counters.fields == () and counters.exporter_counter("DCGM_EXP_XID_ERRORS_COUNT") is not None


def test_default_set_lists_no_exporter_counters() -> None:
    assert default_counters().exporter_counters == ()


def test_every_catalogue_name_is_a_dcgm_field_and_ids_are_distinct() -> None:
    ids = [dcgmfields.field_id(s.name) for s in CATALOGUE]
    assert None not in ids, [s.name for s in CATALOGUE if dcgmfields.field_id(s.name) is None]
    assert len(set(ids)) == len(ids)


def test_field_table_resolves_legacy_and_deprecated_names() -> None:
    assert dcgmfields.field_id("dcgm_sm_clock") == 100
    assert dcgmfields.field_id("dcgm_fi_prof_pcie_tx_bytes") == 1009
    assert dcgmfields.field_id("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS") == 112
    assert dcgmfields.field_id("DCGM_FI_DEV_CLOCKS_EVENT_REASONS") == 112
    assert dcgmfields.field_id("DCGM_FI_DEV_FAN_SPEED_RATIO") == 1612  # go-dcgm only
    assert dcgmfields.field_id("DCGM_FI_MAX_FIELDS") is None  # a bound, not a field
    assert dcgmfields.field_id("dcgm_SM_CLOCK") is None  # case matters, as in go-dcgm


# --- rule 2: what we cannot read is skipped, with one message per line ---


def test_dcgm_field_missing_from_the_catalogue_is_skipped_naming_file_line_and_reason() -> None:
    text = "DCGM_FI_DEV_SM_CLOCK, gauge, s\n# c\nDCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL, counter, crc\n"
    counters = parse_counters(text, "x.csv")
    assert counters.names == ("DCGM_FI_DEV_SM_CLOCK",)
    (msg,) = counters.skipped
    assert msg.startswith("x.csv:3: DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL")
    assert "not in our catalogue" in msg


def test_dcp_only_field_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import exporter.fields as fields

    gr = fields.BY_NAME["DCGM_FI_PROF_GR_ENGINE_ACTIVE"]
    monkeypatch.setitem(fields.BY_NAME, gr.name, dataclasses.replace(gr, reader=DCP))
    counters = parse_counters("DCGM_FI_DEV_SM_CLOCK, gauge, s\nDCGM_FI_PROF_GR_ENGINE_ACTIVE, gauge, g\n", "x.csv")
    assert counters.names == ("DCGM_FI_DEV_SM_CLOCK",)
    assert counters.skipped[0].startswith("x.csv:2: DCGM_FI_PROF_GR_ENGINE_ACTIVE")
    assert "profiling" in counters.skipped[0]


def test_label_lines_kept_when_catalogued_else_skipped() -> None:
    text = "DCGM_FI_DRIVER_VERSION, label, Driver Version\nDCGM_FI_DEV_SERIAL, label, Device Serial Number\n"
    counters = parse_counters(text, "x.csv")
    assert "DCGM_FI_DRIVER_VERSION" in counters.names
    if lookup("DCGM_FI_DEV_SERIAL") is None:  # until the catalogue has it
        assert counters.skipped[0].startswith("x.csv:2: DCGM_FI_DEV_SERIAL")
    else:
        assert "DCGM_FI_DEV_SERIAL" in counters.names


def test_label_type_on_a_value_field_is_skipped() -> None:
    counters = parse_counters("DCGM_FI_DEV_GPU_TEMP, gauge, t\nDCGM_FI_DEV_SM_CLOCK, label, x\n", "x.csv")
    assert counters.names == ("DCGM_FI_DEV_GPU_TEMP",)
    assert counters.skipped[0].startswith("x.csv:2: DCGM_FI_DEV_SM_CLOCK")


def test_two_spellings_of_one_field_keep_the_first() -> None:
    text = "DCGM_FI_DEV_CLOCKS_EVENT_REASONS, gauge, a\nDCGM_FI_DEV_CLOCK_THROTTLE_REASONS, gauge, b\n"
    counters = parse_counters(text, "x.csv")
    assert [f.metric_name for f in counters.fields] == ["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"]
    assert counters.skipped[0].startswith("x.csv:2: DCGM_FI_DEV_CLOCK_THROTTLE_REASONS")
    assert "line 1" in counters.skipped[0]


def test_skips_are_logged_once_each_when_the_file_is_loaded(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("DCGM_FI_DEV_SM_CLOCK, gauge, s\nDCGM_FI_DEV_NVLINK_BANDWIDTH_L0, counter, l0\n")
    with structlog.testing.capture_logs() as logs:
        counters = load_counters(str(csv))
    skips = [e for e in logs if e["event"] == "counters_field_skipped"]
    assert len(skips) == 1 == len(counters.skipped)
    assert skips[0]["file"] == str(csv) and skips[0]["line"] == 2
    assert skips[0]["field"] == "DCGM_FI_DEV_NVLINK_BANDWIDTH_L0" and skips[0]["reason"]
    assert skips[0]["log_level"] == "warning"


# --- types ---


def test_user_type_wins() -> None:
    counters = parse_counters("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION, gauge, energy\n", "x.csv")
    assert counters.fields[0].type == "gauge"


@pytest.mark.parametrize("kind", ["histogram", "summary"])
def test_histogram_and_summary_render_as_gauge(kind: str) -> None:
    # One value per series has no buckets or quantiles; dcgm-exporter writes `# TYPE x histogram` over a
    # bare sample, which the text format does not allow. The value is a gauge.
    (f,) = parse_counters(f"DCGM_FI_DEV_SM_CLOCK, {kind}, s\n", "x.csv").fields
    assert f.type == "gauge"


def test_empty_help_takes_the_catalogue_help() -> None:
    (f,) = parse_counters("DCGM_FI_DEV_SM_CLOCK, gauge,\n", "x.csv").fields
    assert f.help == lookup("DCGM_FI_DEV_SM_CLOCK").help  # type: ignore[union-attr]


# --- what exits 2 ---


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("DCGM_FI_DEV_SM_CLOCK\n", "x.csv:1: expected 'DCGM field, type, help'"),
        ("DCGM_FI_DEV_SM_CLOCK, gauge\n", "x.csv:1: expected 'DCGM field, type, help'"),
        ("# c\nDCGM_FI_DEV_GPU_UTIL, gauge, GPU utilization (in %), as seen by NVML.\n", "x.csv:2: expected"),
        ("# c\nDCGM_FI_DEV_NOPE, gauge, x\n", "x.csv:2: unknown field 'DCGM_FI_DEV_NOPE'"),
        ("DCGM_EXP_NOPE, gauge, x\n", "x.csv:1: unknown field 'DCGM_EXP_NOPE'"),
        ("DCGM_FI_DEV_SM_CLOCK, gauges, x\n", "x.csv:1: type 'gauges'"),
        ("DCGM_FI_DEV_SM_CLOCK,\tgauge, x\n", "x.csv:1: type '\\tgauge'"),  # upstream trims spaces only
        ("DCGM_FI_DEV_NVLINK_BANDWIDTH_L0, untyped, x\n", "x.csv:1: type 'untyped'"),
        ("DCGM_EXP_XID_ERRORS_COUNT, gauges, x\n", "x.csv:1: type 'gauges'"),
        ("# only comments\n", "no field in x.csv can be collected"),
        ("DCGM_FI_DEV_NVLINK_BANDWIDTH_L0, counter, x\n", "no field in x.csv can be collected"),
        ('DCGM_FI_DEV_SM_CLOCK, gauge, "unterminated\n', "x.csv:1: unterminated quoted field"),
        ('DCGM_FI_DEV_SM_CLOCK, gauge, "a"b\n', "x.csv:1: "),
    ],
)
def test_bad_lines_name_file_and_line(text: str, needle: str) -> None:
    with pytest.raises(CountersError) as info:
        parse_counters(text, "x.csv")
    assert needle in str(info.value)


# --- rule 6: reading as Go's encoding/csv does (and a little more) ---


def test_bom_crlf_quotes_and_trimming() -> None:
    text = '\ufeff# c\r\nDCGM_FI_DEV_SM_CLOCK ,  gauge ,"SM clock, in MHz"\r\nDCGM_FI_DEV_GPU_TEMP, gauge, " t "\r\n'
    counters = parse_counters(text, "x.csv")
    assert counters.names == ("DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_GPU_TEMP")
    assert counters.fields[0].help == "SM clock, in MHz"
    assert counters.fields[1].help == "t"  # quoted content trimmed of spaces too, as upstream trims fields


def test_quoted_field_escapes_and_spans_lines() -> None:
    text = 'DCGM_FI_DEV_SM_CLOCK, gauge, "say ""hi""\nnext line"\nDCGM_FI_DEV_BOGUS, gauge, x\n'
    with pytest.raises(CountersError, match=r"x\.csv:3: unknown field"):
        parse_counters(text, "x.csv")
    first = records(text.split("DCGM_FI_DEV_BOGUS")[0], "x.csv")
    assert first[0].fields[2] == 'say "hi"\nnext line'


def test_bare_quote_inside_a_field_is_text() -> None:
    (f,) = parse_counters('DCGM_FI_DEV_SM_CLOCK, gauge, the "SM" clock\n', "x.csv").fields
    assert f.help == 'the "SM" clock'


@pytest.mark.parametrize("odd", ["\r", "\x0b", "\x0c", "\u2028", "\x1c", "\x85"])
def test_line_numbers_count_newlines_only(odd: str) -> None:
    text = f"DCGM_FI_DEV_SM_CLOCK, gauge, a{odd}b\n\nDCGM_FI_DEV_BOGUS, gauge, x\n"
    with pytest.raises(CountersError, match=r"x\.csv:3: unknown field"):
        parse_counters(text, "x.csv")


def test_blank_and_comment_lines_may_be_indented_but_fields_are_trimmed_of_spaces_only() -> None:
    counters = parse_counters("   \n  # DCGM_FI_DEV_BOGUS, gauge, x\nDCGM_FI_DEV_SM_CLOCK, gauge, s\n", "x.csv")
    assert counters.names == ("DCGM_FI_DEV_SM_CLOCK",)
    # As upstream (strings.Trim(r, " ")), a tab stays part of the name, which is then no field.
    with pytest.raises(CountersError, match=r"x\.csv:1: unknown field '\\tDCGM_FI_DEV_SM_CLOCK'"):
        parse_counters("\tDCGM_FI_DEV_SM_CLOCK, gauge, s\n", "x.csv")


def test_missing_final_newline() -> None:
    assert parse_counters("DCGM_FI_DEV_SM_CLOCK, gauge, s", "x.csv").names == ("DCGM_FI_DEV_SM_CLOCK",)


# --- reading the file ---


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CountersError, match="cannot read counters file"):
        load_counters(str(tmp_path / "absent.csv"))


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CountersError, match=rf"{re.escape(str(tmp_path))}: .*directory"):
        read_counters_file(str(tmp_path))


def test_device_is_refused() -> None:
    with pytest.raises(CountersError, match=r"/dev/zero: .*not a regular file"):
        read_counters_file("/dev/zero")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CountersError, match=rf"{re.escape(str(fifo))}: .*FIFO"):
        read_counters_file(str(fifo))


def test_large_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.csv"
    big.write_bytes(b"# x\n" * (MAX_BYTES // 4 + 1))
    with pytest.raises(CountersError, match=rf"{re.escape(str(big))}: .*1 MiB"):
        read_counters_file(str(big))
    exact = tmp_path / "exact.csv"
    exact.write_bytes(b"#" * (MAX_BYTES - 1) + b"\n")
    assert len(read_counters_file(str(exact))) == MAX_BYTES


def test_symlink_to_a_regular_file_is_read(tmp_path: Path) -> None:
    # ConfigMap volumes mount files as symlinks.
    real = tmp_path / "real.csv"
    real.write_text("DCGM_FI_DEV_SM_CLOCK, gauge, s\n")
    (tmp_path / "link.csv").symlink_to(real)
    assert load_counters(str(tmp_path / "link.csv")).names == ("DCGM_FI_DEV_SM_CLOCK",)


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"DCGM_FI_DEV_SM_CLOCK, gauge, s\n# caf\xe9\n")
    with pytest.raises(CountersError, match=rf"{re.escape(str(bad))}:2: not UTF-8"):
        load_counters(str(bad))


# --- the built-in set ---


def test_default_set_is_dcgm_defaults_plus_health() -> None:
    names = default_counters().names
    assert names == DCGM_DEFAULT_SET + HEALTH_SET
    assert len([n for n in DCGM_DEFAULT_SET if "PROF" not in n and n != "DCGM_FI_DRIVER_VERSION"]) == 20


def test_histogram_is_logged_as_exported_as_gauge(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("DCGM_FI_DEV_SM_CLOCK, histogram, s\n")
    with structlog.testing.capture_logs() as logs:
        load_counters(str(csv))
    (event,) = [e for e in logs if e["event"] == "counters_type_exported_as_gauge"]
    assert event["line"] == 1 and event["field"] == "DCGM_FI_DEV_SM_CLOCK"


def test_exporter_counter_listed_twice_keeps_the_first() -> None:
    text = "DCGM_EXP_XID_ERRORS_COUNT, gauge, a\nDCGM_EXP_XID_ERRORS_COUNT, counter, b\n"
    counters = parse_counters(text, "x.csv")
    assert counters.exporter_counters == (ExporterCounter("DCGM_EXP_XID_ERRORS_COUNT", "gauge", "a"),)
    assert counters.skipped[0].startswith("x.csv:2: DCGM_EXP_XID_ERRORS_COUNT skipped: listed again")


def test_nothing_collectable_is_refused_but_skips_are_logged_first(tmp_path: Path) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("DCGM_FI_DEV_NVLINK_BANDWIDTH_L0, counter, l0\n")
    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(CountersError, match=r"no field in .* can be collected"),
    ):
        load_counters(str(csv))
    assert [e["line"] for e in logs if e["event"] == "counters_field_skipped"] == [1]
