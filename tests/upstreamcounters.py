"""Our copies of dcgm-exporter's shipped counters files (tests/e2e/counters/, the same lines as its
etc/*.csv, commented or not) and the helpers that enable their commented lines."""

from __future__ import annotations

import re
from pathlib import Path

UPSTREAM = Path(__file__).resolve().parent / "e2e" / "counters"
UPSTREAM_FILES = ("default-counters.csv", "dcp-metrics-included.csv", "1.x-compatibility-metrics.csv")
# A commented line that is a counters line once its leading "# " goes.
COMMENTED = re.compile(r"^# ([A-Za-z_][A-Za-z0-9_]* *,.*)$")


def commented_lines(text: str) -> list[int]:
    """0-based indexes of the commented counters lines."""
    return [i for i, line in enumerate(text.split("\n")) if COMMENTED.match(line)]


def uncomment(text: str, indexes: list[int]) -> str:
    lines = text.split("\n")
    for i in indexes:
        lines[i] = lines[i][2:]
    return "\n".join(lines)


def all_enabled(name: str) -> str:
    """The upstream file `name` with every commented counters line enabled."""
    text = (UPSTREAM / name).read_text()
    return uncomment(text, commented_lines(text))
