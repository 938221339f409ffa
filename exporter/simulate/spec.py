"""Parsing of `--simulate[=SPEC]` into a `SimConfig`.

Spec grammar (comma-separated items; whitespace around items is ignored)::

    SPEC     := "" | ITEM ("," ITEM)*
    ITEM     := PRESET | "file:" PATH | KEY "=" VALUE
    PRESET   := MODEL ["x" N]              h100x8 (the default), a100x4, l4x2, rtx4090, v100x8
    MODEL    := h100 | a100 | v100 | l4 | rtx4090
    KEY=VALUE:
      model=MODEL           gpus=N (1-1024)       seed=N        driver=X.Y.Z
      mig=SEL:PROFILES[;SEL:PROFILES...]   PROFILES := PROFILE["*"K]("+"PROFILE["*"K])* | "" | none
                                           e.g. mig=0:3g.40gb+2g.20gb+1g.10gb*2;1:7g.80gb
      workload=SEL:PATTERN[;...]           PATTERN := train | infer | batch | hold | idle
      faults=FAULT[;FAULT...]              (mig, workload and faults accumulate when repeated;
                                            an empty value clears the earlier ones)
    SEL      := N | N-M | all
    FAULT    := KIND ":" GPU ["/gi" G] [":" ARG] ["@" TIME ["+" DURATION]]
      xid:GPU[/giG]:XID@T      an XID event (attributed to GPU instance G when given)
      dbe:GPU@T                double-bit ECC error: DBE event + XID 48, DBE counters +1,
                               uncorrectable remapped rows +1 and remap pending (or a retired page)
      remap-failure:GPU@T      row remapping failed: ROW_REMAP_FAILURE=1 and XID 64
      recovery:GPU:ACTION@T    GET_GPU_RECOVERY_ACTION = ACTION (0-7 or none, reset, reboot,
                               drain-p2p, drain-reset, imex, bus-reset, system-reboot)
      lost:GPU@T[+D]           reads raise DeviceLostError; the event wait raises it once
      vanish:GPU@T[+D]         the GPU disappears from discover(); reads raise DeviceLostError
      hang:GPU@T[+D]           read() blocks (until D passes or shutdown())
      thermal:GPU@T[+D]        HW thermal slowdown: hot, clocks down, thermal violation grows
    TIME, DURATION := number with optional unit ms|s|m|h (default s); T defaults to 0;
                      without +D a fault lasts forever.

`file:PATH.json` reads the same options from a JSON object (keys model, gpus, seed,
driver, preset, mig, workload, faults; mig/workload/faults as a string, a list of
strings, or for mig/workload an object {"0": "3g.40gb+4g.40gb"}).

See docs/simulate.md for what each model supports and the value ranges.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from exporter.simulate.models import MODELS, place_migs
from exporter.simulate.workload import PATTERNS

DEFAULT_DRIVER = "570.124.06"
MAX_GPUS = 1024


@dataclass
class SimConfig:
    model: str = "h100"
    gpus: int = 8
    seed: int = 0
    driver: str = DEFAULT_DRIVER
    mig: dict[int, tuple[str, ...]] = field(default_factory=dict)
    workload: dict[int, str] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)


_PRESET_RE = re.compile(r"^([a-z0-9]+)x(\d+)$")
_KEYS = ("model", "gpus", "seed", "driver", "mig", "workload", "faults", "preset")


def _split_list(value: str) -> list[str]:
    return [p.strip() for p in value.split(";") if p.strip()]


def _selector(sel: str, gpus: int, what: str) -> list[int]:
    s = sel.strip().lower()
    if s in ("all", "*"):
        return list(range(gpus))
    m = re.match(r"^(\d+)(?:-(\d+))?$", s)
    if not m:
        raise ValueError(f"{what}: bad GPU selector {sel!r} (want N, N-M or all)")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if hi < lo or hi >= gpus:
        raise ValueError(f"{what}: GPU {sel} does not exist (the node has {gpus} GPUs, 0-{gpus - 1})")
    return list(range(lo, hi + 1))


def _int(value: str, key: str, lo: int, hi: int) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{key}={value!r}: not an integer") from None
    if not lo <= n <= hi:
        raise ValueError(f"{key}={value!r}: must be {lo}-{hi}")
    return n


def _json_items(path: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"file:{path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"file:{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"file:{path}: want a JSON object of options")
    items: list[tuple[str, str]] = []
    for key, value in data.items():
        if key not in _KEYS:
            raise ValueError(f"file:{path}: unknown key {key!r} (one of {', '.join(_KEYS)})")
        if isinstance(value, dict):
            if key not in ("mig", "workload"):
                raise ValueError(f"file:{path}: {key} cannot be an object")
            parts = []
            for sel, v in value.items():
                if isinstance(v, list):
                    v = "+".join(str(x) for x in v)
                parts.append(f"{sel}:{v}")
            items.append((key, ";".join(parts)))
        elif isinstance(value, list):
            items.append((key, ";".join(str(v) for v in value)))
        elif isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"file:{path}: {key} must be a string or an integer")
        else:
            items.append((key, str(value)))
    return items


def parse_spec(spec: str | None) -> SimConfig:
    """Parse a `--simulate` spec into a SimConfig (raises ValueError naming the bad part)."""
    items: list[tuple[str, str]] = []
    for token in (spec or "").split(","):
        tok = token.strip()
        if not tok:
            continue
        if tok.startswith("file:"):
            items.extend(_json_items(tok[5:]))
        elif "=" in tok:
            key, _, value = tok.partition("=")
            key = key.strip().lower()
            if key not in _KEYS:
                raise ValueError(f"unknown option {key!r} in {tok!r} (one of {', '.join(_KEYS)}, or a preset)")
            items.append((key, value.strip()))
        else:
            items.append(("preset", tok))
    cfg = SimConfig()
    # Node shape first, so the order of items does not matter for mig/workload/faults.
    for key, value in items:
        if key == "preset":
            v = value.strip().lower()
            m = _PRESET_RE.match(v)
            if v in MODELS:
                cfg.model = v
            elif m and m.group(1) in MODELS:
                cfg.model = m.group(1)
                cfg.gpus = _int(m.group(2), f"GPU count in preset {value!r}", 1, MAX_GPUS)
            else:
                raise ValueError(
                    f"unknown preset {value!r} (want MODEL[xN] with MODEL one of {', '.join(MODELS)}, e.g. h100x8)"
                )
        elif key == "model":
            if value.lower() not in MODELS:
                raise ValueError(f"model={value!r}: unknown model (one of {', '.join(MODELS)})")
            cfg.model = value.lower()
        elif key == "gpus":
            cfg.gpus = _int(value, "gpus", 1, MAX_GPUS)
        elif key == "seed":
            cfg.seed = _int(value, "seed", 0, (1 << 63) - 1)
        elif key == "driver":
            if not re.match(r"^\d+(\.\d+){1,2}$", value):
                raise ValueError(f"driver={value!r}: want a version like {DEFAULT_DRIVER}")
            cfg.driver = value
    model = MODELS[cfg.model]
    for key, value in items:
        if key in ("mig", "workload", "faults") and not value.strip():
            # An empty value clears what came before (e.g. to drop the faults of a file: spec).
            if key == "mig":
                cfg.mig.clear()
            elif key == "workload":
                cfg.workload.clear()
            else:
                cfg.faults.clear()
        elif key == "mig":
            for item in _split_list(value):
                sel, sep, profiles = item.partition(":")
                if not sep:
                    raise ValueError(f"mig item {item!r}: want GPU:PROFILE+PROFILE (e.g. 0:3g.40gb+4g.40gb)")
                if not model.mig:
                    raise ValueError(f"mig item {item!r}: {model.name} does not support MIG (use h100 or a100)")
                names: list[str] = []
                for p in profiles.split("+"):
                    p = p.strip().lower()
                    if p in ("", "none"):
                        continue
                    name, star, count = p.partition("*")
                    if name not in model.mig:
                        raise ValueError(
                            f"mig item {item!r}: unknown profile {name!r} for {model.name} "
                            f"(one of {', '.join(model.mig)})"
                        )
                    k = _int(count, f"mig profile count in {item!r}", 1, 7) if star else 1
                    names.extend([name] * k)
                place_migs(model, names, item)  # validate now, with the item in the message
                for gpu in _selector(sel, cfg.gpus, f"mig item {item!r}"):
                    cfg.mig[gpu] = tuple(names)
        elif key == "workload":
            for item in _split_list(value):
                sel, sep, pattern = item.partition(":")
                pattern = pattern.strip().lower()
                if not sep or pattern not in PATTERNS:
                    raise ValueError(f"workload item {item!r}: want GPU:PATTERN with PATTERN one of {PATTERNS}")
                for gpu in _selector(sel, cfg.gpus, f"workload item {item!r}"):
                    cfg.workload[gpu] = pattern
        elif key == "faults":
            cfg.faults.extend(_split_list(value))
    return cfg
