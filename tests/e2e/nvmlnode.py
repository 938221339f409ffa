"""An exporter process on the fake NVML, with a control file to inject faults."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.e2e.harness import ExporterProcess
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

# The golden expositions (tests/e2e/golden/<scenario>.prom): scenario -> built for the old driver.
GOLDEN = Path(__file__).parent / "golden"
SCENARIOS = {"h100x8": False, "mig": False, "consumer": False, "olddriver": True}


def frozen(spec: Any) -> Any:
    """The scenario with every time-varying value replaced by its starting value (for goldens)."""
    if isinstance(spec, dict):
        if "period_s" in spec and "base" in spec:
            return spec["base"]
        if "rate" in spec and "start" in spec:
            return spec["start"]
        if set(spec) == {"value"}:
            return spec["value"]
        return {k: frozen(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [frozen(v) for v in spec]
    return spec


class NvmlNode:
    """Scenario + control file + exporter process."""

    def __init__(
        self, build: FakeNvmlBuild, tmp: Path, scenario: str | dict[str, Any], args: list[str], old_driver: bool = False
    ) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        data = load_scenario(scenario) if isinstance(scenario, str) else scenario
        self.config = tmp / "scenario.json"
        self.config.write_text(json.dumps(data))
        self.control_path = tmp / "control.jsonl"
        self.control_path.touch()
        self.lib = build.old_lib if old_driver else build.lib
        self.args = ["--nvml-library", str(self.lib), *args]
        self.env = {"FAKENVML_CONFIG": str(self.config), "FAKENVML_CONTROL": str(self.control_path)}
        self.exporter = ExporterProcess(self.args, tmp, self.env)
        self.state_dir = self.exporter.state_dir

    def restart(self) -> ExporterProcess:
        """A new exporter process on the same state dir and fake GPUs (faults replayed)."""
        self.exporter = ExporterProcess(self.args, self.tmp, self.env, state_dir=self.state_dir)
        return self.exporter

    def control(self, op: str, **fields: Any) -> None:
        with open(self.control_path, "a") as fh:
            fh.write(json.dumps({"op": op, **fields}) + "\n")

    def value(self, text: str, family: str, **labels: str) -> float | None:
        """The value of the first series of `family` whose labels include `labels`."""
        for line in text.splitlines():
            if not line.startswith(family + "{"):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return None


VOLATILE_FAMILIES = (
    "process_",
    "python_",
    "gpuhealth_collection_duration_seconds",
    "gpuhealth_last_collection_timestamp_seconds",
    "gpuhealth_collections_total",
)


def normalise(text: str) -> str:
    """Drop what changes from run to run; keep every DCGM and per-device line."""
    out = []
    for line in text.splitlines():
        name = line.split(" ")[2] if line.startswith("# ") else re.split(r"[{ ]", line, maxsplit=1)[0]
        if name.startswith(VOLATILE_FAMILIES):
            continue
        line = re.sub(r'python_version="[^"]*"', 'python_version="X"', line)
        out.append(line)
    return "\n".join(out) + "\n"
