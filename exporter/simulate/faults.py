"""Scheduled faults (`Fault`) and the FAULT parser (grammar: `exporter.simulate.spec`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

RECOVERY_ACTIONS = {
    "none": 0,
    "reset": 1,
    "gpu-reset": 1,
    "reboot": 2,
    "node-reboot": 2,
    "drain-p2p": 3,
    "drain-reset": 4,
    "imex": 5,
    "bus-reset": 6,
    "system-reboot": 7,
}


@dataclass(frozen=True)
class Fault:
    """One scheduled fault. `at` and `duration` are seconds of simulated (elapsed) time."""

    kind: str
    gpu: int
    at: float = 0.0
    duration: float | None = None  # None: until the end
    xid: int = 0
    gi: int | None = None
    action: int = 0
    text: str = ""

    def active(self, t: float) -> bool:
        return t >= self.at and (self.duration is None or t < self.at + self.duration)


_FAULT_KINDS = ("xid", "dbe", "remap-failure", "recovery", "lost", "vanish", "hang", "thermal")
_WITH_DURATION = ("lost", "vanish", "hang", "thermal")
_TIME_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?$")
_TARGET_RE = re.compile(r"^(\d+)(?:/gi(\d+))?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_time(text: str, what: str, fault: str) -> float:
    m = _TIME_RE.match(text.strip())
    if not m:
        raise ValueError(f"fault {fault!r}: bad {what} {text!r} (want seconds, e.g. 30, 1.5, 500ms, 5m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_fault(text: str, gpus: int, mig_gis: dict[int, set[int]] | None = None) -> Fault:
    """Parse one FAULT (grammar: `exporter.simulate.spec`) for a node of `gpus` GPUs."""
    raw = text.strip()
    head, _, at_part = raw.partition("@")
    at, duration = 0.0, None
    if at_part:
        when, _, dur = at_part.partition("+")
        at = _parse_time(when, "time", raw)
        if dur:
            duration = _parse_time(dur, "duration", raw)
            if duration <= 0:
                raise ValueError(f"fault {raw!r}: duration must be positive")
    parts = head.split(":")
    kind = parts[0].strip().lower()
    if kind not in _FAULT_KINDS:
        raise ValueError(f"fault {raw!r}: unknown kind {kind!r} (one of {', '.join(_FAULT_KINDS)})")
    if duration is not None and kind not in _WITH_DURATION:
        raise ValueError(f"fault {raw!r}: {kind} takes no +duration (only {', '.join(_WITH_DURATION)} do)")
    want_arg = kind in ("xid", "recovery")
    if len(parts) != (3 if want_arg else 2):
        form = {"xid": "xid:GPU[/giN]:XID@T", "recovery": "recovery:GPU:ACTION@T"}.get(kind, f"{kind}:GPU@T")
        raise ValueError(f"fault {raw!r}: expected {form}")
    tm = _TARGET_RE.match(parts[1].strip())
    if not tm:
        raise ValueError(f"fault {raw!r}: bad target {parts[1]!r} (want a GPU index, e.g. 3 or 0/gi2)")
    gpu = int(tm.group(1))
    if gpu >= gpus:
        raise ValueError(f"fault {raw!r}: GPU {gpu} does not exist (the node has {gpus} GPUs, 0-{gpus - 1})")
    gi = int(tm.group(2)) if tm.group(2) is not None else None
    if gi is not None:
        if kind != "xid":
            raise ValueError(f"fault {raw!r}: only xid faults can name a GPU instance")
        have = (mig_gis or {}).get(gpu)
        if have is None:
            raise ValueError(f"fault {raw!r}: GPU {gpu} has no MIG layout (add mig={gpu}:...)")
        if gi not in have:
            raise ValueError(
                f"fault {raw!r}: GPU {gpu} has no GPU instance {gi} (it has {', '.join(map(str, sorted(have)))})"
            )
    xid = action = 0
    if kind == "xid":
        try:
            xid = int(parts[2])
        except ValueError:
            raise ValueError(f"fault {raw!r}: XID {parts[2]!r} is not a number") from None
        if not 0 < xid < 1 << 32:
            raise ValueError(f"fault {raw!r}: XID {xid} out of range")
    elif kind == "recovery":
        a = parts[2].strip().lower()
        if a.isdigit() and int(a) <= 7:
            action = int(a)
        elif a in RECOVERY_ACTIONS:
            action = RECOVERY_ACTIONS[a]
        else:
            raise ValueError(
                f"fault {raw!r}: unknown recovery action {parts[2]!r} (0-7 or {', '.join(RECOVERY_ACTIONS)})"
            )
    return Fault(kind, gpu, at, duration, xid, gi, action, raw)
