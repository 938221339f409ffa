"""dcgm-exporter's counters CSV (`-f/--collectors`): `field, type, help` per line.

Every line of dcgm-exporter's shipped files (etc/default-counters.csv, dcp-metrics-included.csv,
1.x-compatibility-metrics.csv), commented or not, starts us unchanged. A name is any DCGM field name
(exporter/dcgmfields.py: dcgm_fields.h, its deprecated names, go-dcgm's legacy names such as
`dcgm_sm_clock`) or a `DCGM_EXP_*` name. Reading the file (size, file type, CSV) is
exporter/countersfile.py.

Per line, as dcgm-exporter decides (internal/pkg/counters/counter_config.go ExtractCounters):
- not exactly 3 fields, a type other than gauge|counter|histogram|summary|label, a name that is no
  DCGM field: CountersError (exit 2), naming file and line.
- a DCGM field we cannot read (not in exporter/fields.py's catalogue, or DCGM profiling only): skipped
  with one warning, as upstream skips the DCP fields it cannot watch.
Where we differ, and why:
- histogram and summary are exported as gauge: one value per series has no buckets or quantiles
  (upstream writes `# TYPE x histogram` over a bare sample, which the text format does not allow).
- a field listed twice (the same name, as the 1.x file does, or two spellings of it) keeps its first
  line; the later one is skipped with a warning (upstream emits the family twice).
- `label` on a value field, or a label field typed as a value: skipped with a warning.
- a file with nothing left to collect is refused (upstream starts and exports nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import structlog

from exporter import dcgmfields
from exporter.countersfile import CountersError, Record, read_counters_file, records
from exporter.fields import CATALOGUE, DEFAULT_FIELDS, Dcp, FieldSpec, MetricType, lookup

__all__ = ["CounterSet", "CountersError", "ExporterCounter", "default_counters", "load_counters", "parse_counters"]

log = structlog.get_logger("exporter.counters")


@dataclass(frozen=True)
class ExporterCounter:
    """A `DCGM_EXP_*` line: a family dcgm-exporter computes itself (XID and clock-event
    counts in a window, health status, P2P status), emitted only when listed."""

    name: str
    type: str
    help: str


@dataclass(frozen=True)
class CounterSet:
    fields: tuple[FieldSpec, ...]
    source: str  # file path, or "built-in"
    exporter_counters: tuple[ExporterCounter, ...] = ()
    # One message per line skipped (file:line, field, why); logged once when the file is loaded.
    skipped: tuple[str, ...] = ()

    def exporter_counter(self, name: str) -> ExporterCounter | None:
        return next((c for c in self.exporter_counters if c.name == name), None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


# dcgm-exporter's promMetricType (internal/pkg/counters/variables.go).
_TYPES = ("gauge", "counter", "histogram", "summary", "label")
_EXPORTED_AS: dict[str, MetricType] = {"gauge": "gauge", "counter": "counter", "label": "label"}


def default_counters() -> CounterSet:
    specs = []
    for name in DEFAULT_FIELDS:
        spec = lookup(name)
        assert spec is not None, name  # the default set is made of catalogue names
        specs.append(spec)
    return CounterSet(tuple(specs), "built-in")


@dataclass(frozen=True)
class _Skip:
    line: int
    name: str  # as the file spells it
    reason: str


@dataclass
class _Parse:
    source: str
    by_id: dict[int, FieldSpec]
    fields: list[FieldSpec] = field(default_factory=list)
    exp: list[ExporterCounter] = field(default_factory=list)
    skips: list[_Skip] = field(default_factory=list)
    retyped: list[_Skip] = field(default_factory=list)  # histogram, summary: exported as gauge
    first_line: dict[str, tuple[int, str]] = field(default_factory=dict)  # field or EXP name -> (line, CSV name)

    def line(self, rec: Record) -> None:
        where = f"{self.source}:{rec.line}"
        if len(rec.fields) != 3:
            hint = "; quote a help text that holds commas" if len(rec.fields) > 3 else ""
            raise CountersError(
                f"{where}: expected 'DCGM field, type, help' (3 fields), got {len(rec.fields)}{hint}: "
                f"{', '.join(rec.fields)!r}"
            )
        name, type_, help_text = rec.fields
        spec = self.resolve(name)
        if spec is None and name not in dcgmfields.EXPORTER_COUNTERS:
            raise CountersError(
                f"{where}: unknown field {name!r}: no DCGM field name (dcgm_fields.h, go-dcgm) nor DCGM_EXP_*"
            )
        if type_ not in _TYPES:
            raise CountersError(f"{where}: type {type_!r} of {name} is not one of {', '.join(_TYPES)}")
        if spec is None:
            if self.first(rec.line, name, name):
                self.exp.append(ExporterCounter(name, type_, help_text))
            return
        if isinstance(spec, int):  # a DCGM field the catalogue lacks
            self.skip(rec.line, name, "not in our catalogue: NVML gives no reading for it (docs/metrics.md)")
            return
        if isinstance(spec.reader, Dcp):
            self.skip(rec.line, name, "DCGM profiling field: NVML cannot provide it without DCGM")
            return
        if (type_ == "label") != (spec.type == "label"):
            what = "a label field: list it as label" if spec.type == "label" else f"a {spec.type}, not a label"
            self.skip(rec.line, name, f"{spec.name} is {what}")
            return
        if not self.first(rec.line, spec.name, name):
            return
        if type_ not in _EXPORTED_AS:
            self.retyped.append(
                _Skip(rec.line, name, f"{type_} exported as gauge: one value per series has no buckets or quantiles")
            )
        metric = name if name != spec.name else ""
        exported = _EXPORTED_AS.get(type_, "gauge")
        self.fields.append(replace(spec, metric=metric, type=exported, help=help_text or spec.help))

    def resolve(self, name: str) -> FieldSpec | int | None:
        """The catalogue spec for a name; the field id of a DCGM field the catalogue lacks; None for no field."""
        spec = lookup(name)  # the catalogue's own names and aliases
        if spec is not None:
            return spec
        fid = dcgmfields.field_id(name)
        if fid is None:
            return None
        return self.by_id.get(fid, fid)

    def first(self, line: int, key: str, name: str) -> bool:
        """Whether this is the first line for `key`; else skips it, naming the first."""
        seen = self.first_line.setdefault(key, (line, name))
        if seen[0] == line:
            return True
        again = "listed again" if seen[1] == name else f"the same DCGM field as {seen[1]}"
        self.skip(line, name, f"{again} (first at line {seen[0]}); one family per field")
        return False

    def skip(self, line: int, name: str, reason: str) -> None:
        self.skips.append(_Skip(line, name, reason))

    def result(self) -> CounterSet:
        skipped = tuple(f"{self.source}:{s.line}: {s.name} skipped: {s.reason}" for s in self.skips)
        return CounterSet(tuple(self.fields), self.source, tuple(self.exp), skipped)


def _by_id() -> dict[int, FieldSpec]:
    """Catalogue specs by DCGM field id, so that every spelling of a field finds it."""
    out: dict[int, FieldSpec] = {}
    for spec in CATALOGUE:
        fid = dcgmfields.field_id(spec.name)
        if fid is not None:
            out.setdefault(fid, spec)
    return out


def _parse(text: str, source: str) -> _Parse:
    state = _Parse(source, _by_id())
    for rec in records(text, source):
        state.line(rec)
    return state


def _require_some(counters: CounterSet) -> None:
    if not counters.fields and not counters.exporter_counters:
        why = f" ({len(counters.skipped)} lines skipped)" if counters.skipped else " (it lists none)"
        raise CountersError(f"no field in {counters.source} can be collected{why}")


def parse_counters(text: str, source: str) -> CounterSet:
    counters = _parse(text, source).result()
    _require_some(counters)
    return counters


def load_counters(path: str | None) -> CounterSet:
    """The counters file at `path` (None: the built-in set); each skipped line logged once."""
    if path is None:
        return default_counters()
    state = _parse(read_counters_file(path), path)
    for s in state.skips:
        log.warning("counters_field_skipped", file=path, line=s.line, field=s.name, reason=s.reason)
    for s in state.retyped:
        log.info("counters_type_exported_as_gauge", file=path, line=s.line, field=s.name, reason=s.reason)
    counters = state.result()
    _require_some(counters)
    return counters
