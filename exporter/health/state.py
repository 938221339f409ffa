"""The health state file's document: its shape, versions and validation (exporter/health/store.py writes it).

The document's shape lives here alone: document() builds it from the engine's records,
validate() checks (and migrates) what was read, read_document() turns it back into records.

Versions: an older schema is migrated on load (and written back as the current one with the next
write); a newer one (a rollback) is left exactly as it is and start-up stops with StateError, since
guessing at a format we do not know would mean dropping the fences in it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from exporter.boundedread import read_regular_file
from exporter.health.records import DeviceRecord, ReasonRecord
from exporter.health.verdict import HealthState

# 2: adds "signals_seen": {"<GPU model>": ["DCGM_FI_...", ...]} (health fields that model reports).
SCHEMA_VERSION = 2
STATE_FILE = "state.json"
# A state file is a few KiB per device; this bounds what a hostile or corrupt one costs to read.
MAX_STATE_BYTES = 64 << 20

log = structlog.get_logger()


class StateFormatError(ValueError):
    """The state file exists but is not a state document we understand."""


class StateError(Exception):
    """The state dir or file must not be used or touched: start-up stops with this message (exit 1)."""


class StateVersionError(StateError, ValueError):
    """The file was written by a newer version (a ValueError too, for readers that report and go on)."""

    def __init__(self, found: int) -> None:
        super().__init__(f"state file has schema {found}, this version reads up to {SCHEMA_VERSION}")
        self.found = found


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise StateFormatError(what)


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate(doc: object) -> dict[str, Any]:
    """Check a loaded document and bring it to the current schema (a new dict; `doc` is unchanged).

    Raises StateVersionError for a newer schema (judge nothing else of it) and StateFormatError
    naming the first problem of a document that is not a state file at all.
    """
    _expect(isinstance(doc, dict), "top level is not an object")
    assert isinstance(doc, dict)
    schema = doc.get("schema")
    _expect(isinstance(schema, int) and not isinstance(schema, bool) and schema >= 1, f"schema is {schema!r}")
    assert isinstance(schema, int)
    if schema > SCHEMA_VERSION:
        raise StateVersionError(schema)
    devices = doc.get("devices", {})
    _expect(isinstance(devices, dict), "devices is not an object")
    for uuid, dev in devices.items():
        _expect(isinstance(dev, dict), f"device {uuid} is not an object")
        meta = dev.get("meta", {})
        _expect(isinstance(meta, dict), f"device {uuid}: meta is not an object")
        reasons = dev.get("reasons", [])
        _expect(isinstance(reasons, list), f"device {uuid}: reasons is not a list")
        for r in reasons:
            _expect(isinstance(r, dict), f"device {uuid}: a reason is not an object")
            for key in ("signal", "code", "message", "action"):
                _expect(isinstance(r.get(key), str), f"device {uuid}: reason {key} is not a string")
            for key in ("first_seen", "last_seen"):
                _expect(_num(r.get(key)), f"device {uuid}: reason {key} is not a number")
            for key in ("count", "state"):
                _expect(isinstance(r.get(key), int), f"device {uuid}: reason {key} is not an integer")
            _expect(r["state"] in (0, 1, 2), f"device {uuid}: reason state {r['state']} out of range")
        baseline = dev.get("baseline", {})
        _expect(isinstance(baseline, dict) and all(_num(v) for v in baseline.values()), f"device {uuid}: baseline")
    counts = doc.get("xid_counts", [])
    _expect(isinstance(counts, list), "xid_counts is not a list")
    for c in counts:
        _expect(
            isinstance(c, dict)
            and isinstance(c.get("gpu"), str)
            and isinstance(c.get("xid"), int)
            and isinstance(c.get("class"), str)
            and isinstance(c.get("count"), int)
            and c["count"] >= 0,
            f"bad xid_counts entry {c!r}",
        )
    return _migrate(dict(doc))


def _migrate(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["schema"] == 1:
        doc["signals_seen"] = {}  # unknown before 2: learnt again from the GPUs
        doc["schema"] = 2
    doc["signals_seen"] = _signals_seen(doc.get("signals_seen"))
    return doc


def _signals_seen(raw: object) -> dict[str, list[str]]:
    """The well-formed part of signals_seen. Advisory data: a bad entry is dropped with a warning,
    never a reason to move the file (and its fences) aside."""
    out: dict[str, list[str]] = {}
    dropped: list[str] = []
    if isinstance(raw, dict):
        for model, fields in raw.items():
            if isinstance(fields, list):
                good = [f for f in fields if isinstance(f, str)]
                if len(good) != len(fields):
                    dropped.append(model)
                out[model] = sorted(set(good))
            else:
                dropped.append(model)
    elif raw is not None:
        dropped.append("*")
    if dropped:
        log.warning(
            "health_state_signals_seen_ignored",
            models=sorted(dropped),
            consequence="these models' health fields are learnt again from the GPUs",
        )
    return out


# ---- the document: built from the engine's records, read back into them ---------------------------


@dataclass
class Document:
    """The state file's content in memory: the engine's records (live, under its lock, when written)."""

    devices: dict[str, DeviceRecord] = field(default_factory=dict)
    xid_counts: dict[tuple[str, int, str], int] = field(default_factory=dict)  # (gpu, xid, class) -> count
    clears_total: int = 0
    signals_seen: dict[str, set[str]] = field(default_factory=dict)  # GPU model -> health fields reported


def document(state: Document, written_at: float) -> dict[str, Any]:
    """The JSON document of `state` (current schema), sharing nothing mutable with it."""
    return {
        "schema": SCHEMA_VERSION,
        "written_at": written_at,
        "devices": {u: _device_json(d) for u, d in state.devices.items()},
        "xid_counts": [
            {"gpu": g, "xid": x, "class": c, "count": n} for (g, x, c), n in sorted(state.xid_counts.items())
        ],
        "clears_total": state.clears_total,
        "signals_seen": {m: sorted(f) for m, f in sorted(state.signals_seen.items())},
    }


def parse_state_bytes(raw: bytes) -> dict[str, Any]:
    """The validated document in `raw`. Raises StateVersionError or ValueError (StateFormatError
    for what is not a state document, JSON nested past the parser's depth included)."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise StateFormatError("JSON nested too deeply") from None
    return validate(doc)


def read_state_file(state_dir: Path) -> Document:
    """The persisted records, read-only (`health list` without a daemon, the device plugin before it
    hears one). Raises OSError (RefusedFile: not a regular file, too large), ValueError (not JSON) or
    StateError (not a state document)."""
    return read_document(parse_state_bytes(read_regular_file(state_dir / STATE_FILE, MAX_STATE_BYTES)))


def read_document(doc: dict[str, Any]) -> Document:
    """The records in a document that validate() returned (so of the current schema)."""
    clears = doc.get("clears_total", 0)
    return Document(
        {uuid: _device_record(uuid, d) for uuid, d in doc.get("devices", {}).items()},
        {(c["gpu"], c["xid"], c["class"]): c["count"] for c in doc.get("xid_counts", [])},
        clears if isinstance(clears, int) else 0,
        # validate() brought any older schema to the current one: signals_seen is always there.
        {m: set(f) for m, f in doc.get("signals_seen", {}).items()},
    )


def _reason_json(r: ReasonRecord) -> dict[str, Any]:
    return {
        "signal": r.signal,
        "code": r.code,
        "message": r.message,
        "first_seen": r.first_seen,
        "last_seen": r.last_seen,
        "count": r.count,
        "action": r.action,
        "state": int(r.state),
        "level": r.level,
        "class": r.cls,
    }


def _reason_record(d: dict[str, Any]) -> ReasonRecord:
    state = HealthState(d["state"])
    cls = str(d.get("class", "fence" if state is HealthState.UNHEALTHY else "warn"))
    first, last, level = float(d["first_seen"]), float(d["last_seen"]), bool(d.get("level", False))
    return ReasonRecord(d["signal"], d["code"], d["message"], first, last, d["count"], d["action"], state, level, cls)


def _device_json(d: DeviceRecord) -> dict[str, Any]:
    return {
        "meta": {"kind": d.kind, "parent": d.parent, "index": d.index, "gi": d.gpu_instance_id},
        "reasons": [_reason_json(r) for r in d.reasons.values()],
        "baseline": dict(d.tracker.baseline),
    }


def _device_record(uuid: str, d: dict[str, Any]) -> DeviceRecord:
    meta = d.get("meta", {})
    kind = meta.get("kind") if meta.get("kind") in ("gpu", "mig") else ("mig" if uuid.startswith("MIG-") else "gpu")
    parent = meta.get("parent") if isinstance(meta.get("parent"), str) else None
    index = meta.get("index") if isinstance(meta.get("index"), int) else None
    gi = meta.get("gi") if isinstance(meta.get("gi"), int) else None
    rec = DeviceRecord(uuid, kind, parent, index, gi)
    for r in d.get("reasons", []):
        rr = _reason_record(r)
        rec.reasons[(rr.signal, rr.code)] = rr
    rec.tracker.baseline = {k: float(v) for k, v in d.get("baseline", {}).items()}
    return rec
