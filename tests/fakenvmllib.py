"""The fake libnvidia-ml.so.1 (tests/fakenvml) seen from Python: where it is built, its scenarios,
and one test's handle on a scenario + control file (`FakeNvml`). The fixtures that build it and
hand out a `FakeNvml` are in tests/conftest.py."""

from __future__ import annotations

import ctypes
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FAKENVML_DIR = REPO / "tests" / "fakenvml"
SCENARIOS_DIR = FAKENVML_DIR / "scenarios"


@dataclass(frozen=True)
class FakeNvmlBuild:
    lib: Path  # current-driver fake
    old_lib: Path  # built with -DFAKE_OLD_DRIVER: exactly what an R470 libnvidia-ml.so exports
    # built with -DFAKE_PRE_R450: before R450, without the _v2/_v3 forms (the exporter's oldest fallbacks)
    r418_lib: Path = FAKENVML_DIR / "build" / "r418" / "libnvidia-ml.so.1"


def load_scenario(name: str) -> dict[str, Any]:
    """A shipped scenario (tests/fakenvml/scenarios/<name>.json) as a dict, to tweak and `use`."""
    with open(SCENARIOS_DIR / f"{name}.json", encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


class FakeNvml:
    """One test's view of the fake: scenario, control file, counters."""

    def __init__(self, build: FakeNvmlBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.build = build
        self.tmp_path = tmp_path
        self._monkeypatch = monkeypatch
        self.config_path = tmp_path / "fakenvml-scenario.json"
        self.control_path = tmp_path / "fakenvml-control.jsonl"
        self.lib_path = build.lib

    def use(self, scenario: str | dict[str, Any], *, old_driver: bool = False, pre_r450: bool = False) -> str:
        """Select a scenario (shipped name or dict); returns the library path to load.

        `old_driver`: build/old (an R470 driver's symbols); `pre_r450`: build/r418 (no _v2/_v3 forms).
        Takes effect at the next nvmlInit after a full shutdown.
        """
        data = load_scenario(scenario) if isinstance(scenario, str) else scenario
        self.config_path.write_text(json.dumps(data), encoding="utf-8")
        self.control_path.write_text("", encoding="utf-8")
        self._monkeypatch.setenv("FAKENVML_CONFIG", str(self.config_path))
        self._monkeypatch.setenv("FAKENVML_CONTROL", str(self.control_path))
        self.lib_path = self.build.r418_lib if pre_r450 else self.build.old_lib if old_driver else self.build.lib
        return str(self.lib_path)

    def control(self, op: str, **fields: Any) -> None:
        """Append one control op, e.g. control("xid", gpu=0, xid=79)."""
        line = json.dumps({"op": op, **fields})
        with open(self.control_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that loads the fake through LD_LIBRARY_PATH."""
        env = dict(os.environ)
        env["FAKENVML_CONFIG"] = str(self.config_path)
        env["FAKENVML_CONTROL"] = str(self.control_path)
        env["LD_LIBRARY_PATH"] = str(self.lib_path.parent) + os.pathsep + env.get("LD_LIBRARY_PATH", "")
        return env

    def _lib(self) -> ctypes.CDLL:
        lib = ctypes.CDLL(str(self.lib_path))  # same path: the already-loaded copy
        lib.fakenvml_call_count.restype = ctypes.c_ulonglong
        lib.fakenvml_call_count.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.fakenvml_field_count.restype = ctypes.c_ulonglong
        lib.fakenvml_field_count.argtypes = [ctypes.c_int, ctypes.c_uint]
        return lib

    def calls(self, symbol: str, gpu: int = -1) -> int:
        """How often `symbol` was called (on scenario GPU `gpu`, or in total with -1)."""
        return int(self._lib().fakenvml_call_count(symbol.encode(), gpu))

    def field_requests(self, gpu: int, field_id: int) -> int:
        """How often NVML field id `field_id` was requested through nvmlDeviceGetFieldValues on `gpu`."""
        return int(self._lib().fakenvml_field_count(gpu, field_id))

    def reset_counters(self) -> None:
        self._lib().fakenvml_reset_counters()
