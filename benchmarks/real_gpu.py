#!/usr/bin/env python3
"""Check the exporter against a real NVIDIA driver (prepared for a session with a GPU machine).

    python benchmarks/real_gpu.py [--nvml-library PATH] [--nvidia-smi-csv FILE] [--out FILE.md]

1. Reads every catalogue field through the exporter's NVML adapter, on every GPU.
2. Compares each field that nvidia-smi also reports with `nvidia-smi --query-gpu` (same units,
   tolerance per field: instantaneous values such as power or utilisation move between the two reads).
3. Times each kind of NVML read (median of 20) and one whole device read.
4. Prints a Markdown report (and writes it to --out, e.g. $OUT/real-gpu.md on the device machine).

Exit code 1 when a compared field disagrees. `--nvidia-smi-csv` takes a recorded `nvidia-smi` output
instead of running it (the test suite feeds one derived from a fake-NVML scenario).
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.fields import CATALOGUE, Call, FieldSpec, FieldValue, Rate  # noqa: E402
from exporter.nvml import NvmlBackend  # noqa: E402


@dataclass(frozen=True)
class Compared:
    smi: str  # nvidia-smi --query-gpu property
    tolerance: float  # absolute, in the exported unit
    why: str = ""


# DCGM field -> nvidia-smi property reporting the same quantity in the same unit.
COMPARED: dict[str, Compared] = {
    "DCGM_FI_DEV_SM_CLOCK": Compared("clocks.sm", 100, "clocks move with load"),
    "DCGM_FI_DEV_MEM_CLOCK": Compared("clocks.mem", 1),
    "DCGM_FI_DEV_GPU_TEMP": Compared("temperature.gpu", 3, "moves with load"),
    "DCGM_FI_DEV_MEMORY_TEMP": Compared("temperature.memory", 3, "moves with load"),
    "DCGM_FI_DEV_POWER_USAGE": Compared("power.draw", 50, "instantaneous"),
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": Compared("power.limit", 0.5),
    "DCGM_FI_DEV_GPU_UTIL": Compared("utilization.gpu", 30, "instantaneous"),
    "DCGM_FI_DEV_MEM_COPY_UTIL": Compared("utilization.memory", 30, "instantaneous"),
    "DCGM_FI_DEV_FB_TOTAL": Compared("memory.total", 1),
    "DCGM_FI_DEV_FB_USED": Compared("memory.used", 64, "allocations move"),
    "DCGM_FI_DEV_FB_FREE": Compared("memory.free", 64, "allocations move"),
    "DCGM_FI_DEV_FB_RESERVED": Compared("memory.reserved", 1),
    "DCGM_FI_DEV_PSTATE": Compared("pstate", 0),
    "DCGM_FI_DEV_FAN_SPEED": Compared("fan.speed", 5),
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": Compared("ecc.errors.corrected.volatile.total", 0),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": Compared("ecc.errors.uncorrected.volatile.total", 0),
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": Compared("ecc.errors.corrected.aggregate.total", 0),
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": Compared("ecc.errors.uncorrected.aggregate.total", 0),
    "DCGM_FI_DEV_RETIRED_SBE": Compared("retired_pages.single_bit_ecc.count", 0),
    "DCGM_FI_DEV_RETIRED_DBE": Compared("retired_pages.double_bit.count", 0),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": Compared("remapped_rows.correctable", 0),
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": Compared("remapped_rows.uncorrectable", 0),
    "DCGM_FI_DEV_ROW_REMAP_PENDING": Compared("remapped_rows.pending", 0),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": Compared("remapped_rows.failure", 0),
}
IDENTITY = ("index", "uuid", "pci.bus_id", "name", "driver_version")


def smi_rows(recorded: str | None) -> list[dict[str, str]]:
    props = list(IDENTITY) + [c.smi for c in COMPARED.values()]
    if recorded is not None:
        text = Path(recorded).read_text()
    else:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            raise SystemExit("nvidia-smi not found (pass --nvidia-smi-csv to compare with a recorded output)")
        text = subprocess.run(
            [exe, f"--query-gpu={','.join(props)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return [dict(zip(props, (c.strip() for c in row), strict=True)) for row in csv.reader(io.StringIO(text)) if row]


def smi_value(text: str, prop: str) -> float | None:
    """nvidia-smi's value as a number; None for N/A or unsupported."""
    if text in ("", "[N/A]", "N/A", "[Not Supported]", "Not Supported", "Disabled", "Enabled"):
        return None
    if prop == "pstate":
        return float(text.lstrip("P"))
    if text in ("Yes", "No"):
        return 1.0 if text == "Yes" else 0.0
    return float(text)


def median_ms(fn: object, n: int = 20) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvml-library", help="libnvidia-ml.so.1 to load (default: the system's)")
    ap.add_argument("--nvidia-smi-csv", help="recorded nvidia-smi --query-gpu output instead of running it")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args()

    backend = NvmlBackend(args.nvml_library)
    backend.start()
    inventory = backend.discover()
    polled = [f for f in CATALOGUE if isinstance(f.reader, (FieldValue, Call, Rate))]
    lines = [f"# Real-GPU check (driver {inventory.driver_version}, {len(inventory.gpus)} GPUs)", ""]
    mismatches = 0

    readings = {g.uuid: backend.read(g.uuid, polled) for g in inventory.gpus}
    smi = {row["uuid"]: row for row in smi_rows(args.nvidia_smi_csv)}
    lines += ["## Fields compared with nvidia-smi", ""]
    lines += ["| GPU | field | exporter | nvidia-smi | verdict |", "|---|---|---|---|---|"]
    for gpu in inventory.gpus:
        row = smi.get(gpu.uuid)
        if row is None:
            lines.append(f"| {gpu.index} | (identity) | {gpu.uuid} | missing from nvidia-smi | MISMATCH |")
            mismatches += 1
            continue
        if row["pci.bus_id"].upper() != gpu.pci_bus_id.upper() or row["name"] != gpu.name:
            theirs_id = f"{row['pci.bus_id']} {row['name']}"
            lines.append(f"| {gpu.index} | identity | {gpu.pci_bus_id} {gpu.name} | {theirs_id} | MISMATCH |")
            mismatches += 1
        got = readings[gpu.uuid]
        for name, cmp in COMPARED.items():
            ours = got.values.get(name)
            theirs = smi_value(row[cmp.smi], cmp.smi)
            if ours is None and theirs is None:
                continue
            if ours is None or theirs is None:
                verdict = "MISMATCH (one side unsupported)"
                mismatches += 1
            elif abs(ours - theirs) <= cmp.tolerance:
                verdict = "ok" if cmp.tolerance == 0 else f"ok (±{cmp.tolerance:g}{', ' + cmp.why if cmp.why else ''})"
            else:
                verdict = f"MISMATCH (tolerance {cmp.tolerance:g})"
                mismatches += 1
            lines.append(f"| {gpu.index} | `{name}` | {ours} | {theirs} | {verdict} |")

    lines += ["", "## Fields nvidia-smi does not report (exporter values, GPU 0)", ""]
    if inventory.gpus:
        first = readings[inventory.gpus[0].uuid]
        for spec in polled:
            if spec.name not in COMPARED:
                value = first.values.get(spec.name, "unsupported" if spec.name in first.unsupported else "-")
                lines.append(f"- `{spec.name}`: {value}")

    lines += ["", "## NVML read timings (median of 20, GPU 0)", "", "| read | ms |", "|---|---|"]
    if inventory.gpus:
        uuid = inventory.gpus[0].uuid
        by_reader: dict[str, list[FieldSpec]] = {}
        for spec in polled:
            by_reader.setdefault(str(spec.reader), []).append(spec)
        for reader, specs in sorted(by_reader.items()):
            lines.append(
                f"| {reader} ({len(specs)} field{'s' if len(specs) > 1 else ''}) | "
                f"{median_ms(lambda s=specs: backend.read(uuid, s)):.3f} |"
            )
        whole = median_ms(lambda: backend.read(uuid, polled))
        lines.append(f"| whole device read ({len(polled)} fields) | {whole:.3f} |")
        lines.append(f"| discovery (all GPUs) | {median_ms(backend.discover, 5):.3f} |")
    backend.shutdown()
    lines += ["", f"Mismatches: {mismatches}", ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
