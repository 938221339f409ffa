"""benchmarks/real_gpu.py (the prepared check for a session with a GPU machine), run against the
fake NVML with a recorded nvidia-smi output derived from the same scenario."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.harness import ROOT
from tests.e2e.nvmlnode import frozen
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

SCRIPT = ROOT / "benchmarks" / "real_gpu.py"
MIB = 1 << 20


def smi_csv(scenario: dict[str, Any]) -> str:
    """What nvidia-smi --query-gpu would print for this (frozen) scenario, in the script's column order."""
    from benchmarks.real_gpu import COMPARED, IDENTITY

    defaults = scenario["defaults"]
    rows = []
    for i, dev in enumerate(scenario["devices"]):
        f = {**defaults["fields"], **dev.get("fields", {})}
        mem = {**defaults["memory"], **dev.get("memory", {})}
        used = f["DCGM_FI_DEV_FB_USED"]
        smi = {
            "index": str(i),
            "uuid": dev["uuid"],
            "pci.bus_id": dev["pci_bus_id"],
            "name": defaults["name"],
            "driver_version": scenario["driver_version"],
            "clocks.sm": f["DCGM_FI_DEV_SM_CLOCK"],
            "clocks.mem": f["DCGM_FI_DEV_MEM_CLOCK"],
            "temperature.gpu": f["DCGM_FI_DEV_GPU_TEMP"],
            "temperature.memory": f["DCGM_FI_DEV_MEMORY_TEMP"],
            "power.draw": f["DCGM_FI_DEV_POWER_USAGE"] / 1000,
            "power.limit": f["DCGM_FI_DEV_POWER_MGMT_LIMIT"] / 1000,
            "utilization.gpu": f["DCGM_FI_DEV_GPU_UTIL"],
            "utilization.memory": f["DCGM_FI_DEV_MEM_COPY_UTIL"],
            "memory.total": mem["total"] // MIB,
            "memory.used": used // MIB,
            "memory.free": (mem["total"] - mem["reserved"] - used) // MIB,
            "memory.reserved": mem["reserved"] // MIB,
            "pstate": f"P{f['DCGM_FI_DEV_PSTATE']}",
            "fan.speed": "[N/A]",
            "ecc.errors.corrected.volatile.total": f["DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"],
            "ecc.errors.uncorrected.volatile.total": f["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"],
            "ecc.errors.corrected.aggregate.total": f["DCGM_FI_DEV_ECC_SBE_AGG_TOTAL"],
            "ecc.errors.uncorrected.aggregate.total": f["DCGM_FI_DEV_ECC_DBE_AGG_TOTAL"],
            "retired_pages.single_bit_ecc.count": "[N/A]",
            "retired_pages.double_bit.count": "[N/A]",
            "remapped_rows.correctable": f["DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"],
            "remapped_rows.uncorrectable": f["DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"],
            "remapped_rows.pending": "Yes" if f["DCGM_FI_DEV_ROW_REMAP_PENDING"] else "No",
            "remapped_rows.failure": "Yes" if f["DCGM_FI_DEV_ROW_REMAP_FAILURE"] else "No",
        }
        props = list(IDENTITY) + [c.smi for c in COMPARED.values()]
        rows.append(", ".join(str(smi[p]) for p in props))
    return "\n".join(rows) + "\n"


def run(build: FakeNvmlBuild, tmp: Path, scenario: dict[str, Any], csv_text: str) -> subprocess.CompletedProcess[str]:
    (tmp / "scenario.json").write_text(json.dumps(scenario))
    (tmp / "smi.csv").write_text(csv_text)
    env = {**os.environ, "FAKENVML_CONFIG": str(tmp / "scenario.json"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--nvml-library",
            str(build.lib),
            "--nvidia-smi-csv",
            str(tmp / "smi.csv"),
            "--out",
            str(tmp / "report.md"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def two_gpus() -> dict[str, Any]:
    scenario: dict[str, Any] = frozen(load_scenario("h100x8"))
    scenario["devices"] = scenario["devices"][:2]
    return scenario


def test_agreeing_driver_and_nvidia_smi_pass(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    scenario = two_gpus()
    r = run(fakenvml_build, tmp_path, scenario, smi_csv(scenario))
    assert r.returncode == 0, r.stdout + r.stderr
    report = (tmp_path / "report.md").read_text()
    assert "Mismatches: 0" in report
    assert "| 1 | `DCGM_FI_DEV_POWER_MGMT_LIMIT` | 700.0 | 700.0 | ok (±0.5) |" in report
    assert "| 0 | `DCGM_FI_DEV_PSTATE` | 0.0 | 0.0 | ok |" in report
    assert "| whole device read" in report


def test_a_disagreeing_field_is_reported(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    scenario = two_gpus()
    csv_text = smi_csv(scenario).replace(", 700.0, ", ", 650.0, ", 1)  # GPU 0's power limit differs
    r = run(fakenvml_build, tmp_path, scenario, csv_text)
    assert r.returncode == 1
    assert "| 0 | `DCGM_FI_DEV_POWER_MGMT_LIMIT` | 700.0 | 650.0 | MISMATCH (tolerance 0.5) |" in r.stdout
    assert "Mismatches: 1" in r.stdout
