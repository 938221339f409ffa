"""dcgm-exporter's counters CSV (`-f/--collectors`): `field, type, help` per line.

Users' existing files must work unchanged: `#` comments, blank lines, the
types gauge|counter|label, and help text that may itself contain commas.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from exporter.fields import DEFAULT_FIELDS, FieldSpec, lookup


class CountersError(Exception):
    """A bad counters file; the message names file and line."""


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


_TYPES = ("gauge", "counter", "label")


def default_counters() -> CounterSet:
    specs = []
    for name in DEFAULT_FIELDS:
        spec = lookup(name)
        assert spec is not None, name  # the default set is made of catalogue names
        specs.append(spec)
    return CounterSet(tuple(specs), "built-in")


def parse_counters(text: str, source: str) -> CounterSet:
    specs: list[FieldSpec] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",", 2)]
        where = f"{source}:{lineno}"
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise CountersError(f"{where}: expected 'DCGM field, type, help', got {line!r}")
        name, type_ = parts[0], parts[1]
        help_text = parts[2] if len(parts) == 3 else ""
        if type_ not in _TYPES:
            raise CountersError(f"{where}: type {type_!r} of {name} is not one of {', '.join(_TYPES)}")
        spec = lookup(name)
        if spec is None:
            raise CountersError(f"{where}: unknown field {name!r} (see docs/metrics.md for supported fields)")
        if (type_ == "label") != (spec.type == "label"):
            raise CountersError(f"{where}: {name} cannot be of type {type_!r} (it is a {spec.type})")
        if spec.name in seen:
            raise CountersError(f"{where}: {name} is listed twice")
        seen.add(spec.name)
        # The user's type and help win (dcgm-exporter lets users type a counter as a gauge).
        specs.append(replace(spec, type=type_, help=help_text or spec.help))  # type: ignore[arg-type]
    if not specs:
        raise CountersError(f"{source}: no fields listed")
    return CounterSet(tuple(specs), source)


def load_counters(path: str | None) -> CounterSet:
    if path is None:
        return default_counters()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CountersError(f"{path}: cannot read counters file: {exc}") from None
    return parse_counters(text, path)
