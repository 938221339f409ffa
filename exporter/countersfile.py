"""Reading a counters file: the bytes (bounded, regular files only) and its CSV records.

dcgm-exporter reads the file with Go's encoding/csv (`Comment = '#'`, internal/pkg/counters/
counter_config.go ReadCSVFile), then trims each field of spaces. Everything Go accepts reads the same
here; a few things Go refuses are accepted because their meaning is plain: a UTF-8 byte-order mark (Go
keeps it in the first field), blank lines made of spaces and indented comments (records for Go), a
quote inside an unquoted field (Go: "bare quote") and spaces around a quoted field.

Lines are counted on "\\n" only, as Go does: "\\r", "\\x0b", "\\x0c", "\\u2028" inside a line are
text (Python's str.splitlines would count them as line ends and shift every later line number).
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.boundedread import read_regular_file

MAX_BYTES = 1 << 20  # a counters file is a few KiB; this bounds what -f /dev/zero could cost


class CountersError(Exception):
    """A bad counters file; the message names file and line."""


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line of the record's first character
    fields: tuple[str, ...]  # trimmed of spaces, as upstream does


def read_counters_file(path: str) -> str:
    """The file's text. Refuses, naming the path: anything but a regular file (checked before opening, so a
    FIFO or /dev/zero is never read), more than 1 MiB, text that is not UTF-8 (naming the line)."""
    try:
        data = read_regular_file(path, MAX_BYTES)
    except OSError as exc:
        raise CountersError(f"{path}: cannot read counters file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CountersError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def _lines(text: str) -> list[str]:
    """Physical lines, split on "\\n" only, a CRLF's "\\r" dropped (Go normalises "\\r\\n" to "\\n")."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it starts none
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def records(text: str, source: str) -> list[Record]:
    """The CSV records of a counters file, comments and blank lines left out."""
    text = text.removeprefix("\ufeff")
    lines = _lines(text)
    out: list[Record] = []
    i = 0
    while i < len(lines):
        start = i + 1
        line = lines[i]
        i += 1
        bare = line.lstrip(" \t")
        if not bare.strip(" ") or bare.startswith("#"):
            continue
        fields: list[str] = []
        pos = 0
        while True:
            j = pos
            while j < len(line) and line[j] == " ":
                j += 1
            if j < len(line) and line[j] == '"':
                value, line, i, pos = _quoted(lines, line, i, j + 1, source, start)
                fields.append(value)
                if pos >= len(line):
                    break
                pos += 1  # past the comma
                continue
            comma = line.find(",", pos)
            if comma < 0:
                fields.append(line[pos:])
                break
            fields.append(line[pos:comma])
            pos = comma + 1
        out.append(Record(start, tuple(f.strip(" ") for f in fields)))
    return out


def _quoted(lines: list[str], line: str, i: int, k: int, source: str, start: int) -> tuple[str, str, int, int]:
    """A quoted field from `line[k:]` (just past its opening quote), possibly over several lines.
    Returns the value, the line it ends on, the index of the next line and the position of the comma
    (or the line's end) after it."""
    parts: list[str] = []
    while True:
        q = line.find('"', k)
        if q < 0:  # the field goes on on the next line, the newline part of it
            parts.append(line[k:] + "\n")
            if i >= len(lines):
                raise CountersError(f"{source}:{start}: unterminated quoted field")
            line, i, k = lines[i], i + 1, 0
            continue
        if line.startswith('"', q + 1):  # "" stands for one quote
            parts.append(line[k : q + 1])
            k = q + 2
            continue
        parts.append(line[k:q])
        k = q + 1
        while k < len(line) and line[k] == " ":
            k += 1
        if k < len(line) and line[k] != ",":
            raise CountersError(f"{source}:{start}: text after a closing quote: {line!r}")
        return "".join(parts), line, i, k
