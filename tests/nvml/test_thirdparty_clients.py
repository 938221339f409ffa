"""Third-party NVML clients against the fake NVML (tests/fakenvml): gpustat, nvitop and nvitop-exporter.

Each runs as a subprocess on every shipped scenario (LD_LIBRARY_PATH at the fake, FAKENVML_CONFIG at the
scenario) and must print values that come from the scenario: names, memory, temperature, persistence mode,
processes with their memory, NVLink link counts. olddriver.json runs on build/old, the symbol set the
clients meet on an R470 node.

The scenario's process ids are replaced by ids of live `sleep` processes the test starts: gpustat drops
(and nvitop shows as "No Such Process") a GPU process whose pid does not exist on the host. Memory, kinds
and placement stay the scenario's.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakenvmllib import FakeNvml, load_scenario

SCENARIOS = ("consumer", "h100x8", "mig", "olddriver")
R470 = frozenset({"olddriver"})
MIB = 1 << 20
GIB = 1 << 30
TIMEOUT_S = 60.0


# ------------------------------------------------------------- the scenario


def span(spec: Any) -> tuple[float, float]:
    """The range a value spec (README: value specs) takes: constant, sine or counter."""
    if isinstance(spec, bool):
        return float(spec), float(spec)
    if isinstance(spec, int | float):
        return float(spec), float(spec)
    if isinstance(spec, dict):
        if "base" in spec:
            amp = abs(float(spec.get("amplitude", 0)))
            return float(spec["base"]) - amp, float(spec["base"]) + amp
        if "rate" in spec:
            return float(spec.get("start", 0)), math.inf
        if "value" in spec:
            return float(spec["value"]), float(spec["value"])
    raise ValueError(f"not a value spec: {spec!r}")


@dataclass
class Proc:
    pid: int  # the live stand-in's pid
    mib: int
    kind: str
    gpu: int
    mig_slot: int | None  # position in the parent's MIG instance list
    sm: int | None = None  # the scenario's utilisation sample ("sm", "mem"), if any
    mem: int | None = None


@dataclass
class Gpu:
    index: int
    name: str
    uuid: str
    pci_bus_id: str
    mem_total: int
    mem_reserved: int
    used: tuple[float, float]  # DCGM_FI_DEV_FB_USED's range, bytes
    temp: tuple[float, float]
    persistence: bool
    display_active: bool
    nvlink_links: int
    pcie_tx_rate: float | None  # bytes/s of the PCIe TX counter; None: not supported
    mig_uuids: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)


def merged(defaults: dict[str, Any], dev: dict[str, Any]) -> dict[str, Any]:
    """A device's keys over the scenario defaults; "fields" and "memory" merge key by key, as the fake does."""
    out = {**defaults, **dev}
    for key in ("fields", "memory"):
        out[key] = {**defaults.get(key, {}), **dev.get(key, {})}
    out["not_supported"] = set(defaults.get("not_supported", [])) | set(dev.get("not_supported", []))
    return out


def expected(scenario: dict[str, Any]) -> list[Gpu]:
    defaults = scenario.get("defaults", {})
    devices = scenario["devices"]
    all_nvlink = scenario.get("nvlink") == "all" and len(devices) > 1
    peers = {i: set(d.get("nvlink_peers", [])) for i, d in enumerate(devices)}
    for i, ps in list(peers.items()):
        for p in ps:
            peers[p].add(i)
    gpus = []
    for i, raw in enumerate(devices):
        d = merged(defaults, raw)
        fields = {k: v for k, v in d["fields"].items() if k not in d["not_supported"]}
        links = d.get("nvlink_links", 18) if (all_nvlink or peers[i]) else 0
        tx = fields.get("DCGM_FI_DEV_PCIE_TX_THROUGHPUT")
        gpu = Gpu(
            index=i,
            name=d["name"],
            uuid=d["uuid"],
            pci_bus_id=d["pci_bus_id"],
            mem_total=int(d["memory"]["total"]),
            mem_reserved=int(d["memory"].get("reserved", 0)),
            used=span(fields.get("DCGM_FI_DEV_FB_USED", d["memory"].get("used", 0))),
            temp=span(fields["DCGM_FI_DEV_GPU_TEMP"]),
            persistence=bool(d.get("persistence_mode", True)),
            display_active=bool(d.get("display_active", False)),
            nvlink_links=int(links),
            pcie_tx_rate=float(tx.get("rate", 0)) if isinstance(tx, dict) else None if tx is None else 0.0,
        )
        mig = d.get("mig", {})
        if mig.get("enabled"):
            for slot, inst in enumerate(mig.get("instances", [])):
                gpu.mig_uuids.append(inst["uuid"])
                gpu.procs += [
                    Proc(p["pid"], p["used_memory_mib"], p["kind"], i, slot, p.get("sm"), p.get("mem"))
                    for p in inst.get("processes", [])
                ]
        gpu.procs += [
            Proc(p["pid"], p["used_memory_mib"], p["kind"], i, None, p.get("sm"), p.get("mem"))
            for p in d.get("processes", [])
        ]
        gpus.append(gpu)
    return gpus


@dataclass
class Run:
    name: str
    gpus: list[Gpu]
    env: dict[str, str]


@pytest.fixture(params=SCENARIOS)
def run(request: pytest.FixtureRequest, fake_nvml: FakeNvml) -> Iterator[Run]:
    """The scenario with live stand-ins for its processes, and the environment a client runs in."""
    name: str = request.param
    scenario = copy.deepcopy(load_scenario(name))
    holders = [obj for obj in walk(scenario) if isinstance(obj.get("processes"), list)]
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        for holder in holders:
            for proc in holder["processes"]:
                sleeper = subprocess.Popen(["sleep", "600"])
                sleepers.append(sleeper)
                proc["pid"] = sleeper.pid
        gpus = expected(scenario)
        assert any(g.procs for g in gpus), f"{name}: the scenario lists no processes"
        fake_nvml.use(scenario, old_driver=name in R470)
        env = fake_nvml.env()
        env.update(COLUMNS="200", LINES="100", TERM="xterm", PYTHONUNBUFFERED="1")
        yield Run(name, gpus, env)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


def walk(obj: Any) -> Iterator[dict[str, Any]]:
    if isinstance(obj, dict):
        yield obj
        for v in obj.values():
            yield from walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v)


def tool(name: str) -> str:
    """A client installed with the dev extras (pyproject.toml), next to this interpreter or on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'", pytrace=False)
    return found


def client(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    # A missing NVML symbol shows up as a FunctionNotFound traceback (nvitop) or a version-mismatch note.
    assert "undefined symbol" not in proc.stderr and "FunctionNotFound" not in proc.stderr, proc.stderr
    return proc.stdout


def between(value: float, lo: float, hi: float, slack: float) -> bool:
    return lo - slack <= value <= hi + slack


# ------------------------------------------------------------------ gpustat


def test_gpustat_json(run: Run) -> None:
    report = json.loads(client([tool("gpustat"), "--json"], run.env))
    gpus = report["gpus"]
    assert [g["uuid"] for g in gpus] == [g.uuid for g in run.gpus]
    for got, want in zip(gpus, run.gpus, strict=True):
        assert got["name"] == want.name
        assert got["memory.total"] == want.mem_total // MIB
        # nvmlDeviceGetMemoryInfo_v2 leaves reserved memory out of used; the v1 call (R470) folds it in
        lo, hi = want.used[0] / MIB, (want.used[1] + want.mem_reserved) / MIB
        assert between(got["memory.used"], lo, hi, 1), (got["memory.used"], lo, hi)
        assert between(got["temperature.gpu"], *want.temp, 1)
        # the parent GPU's query returns its MIG instances' processes too
        procs = {p["pid"]: p["gpu_memory_usage"] for p in got["processes"]}
        assert procs == {p.pid: p.mib for p in want.procs}


# ------------------------------------------------------------------- nvitop

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SIZE = re.compile(r"^([\d.]+)(B|KiB|MiB|GiB)$")
UNIT = {"B": 1, "KiB": 1 << 10, "MiB": MIB, "GiB": GIB}


def size(text: str) -> float:
    m = SIZE.match(text)
    assert m, f"not a size: {text!r}"
    return float(m.group(1)) * UNIT[m.group(2)]


def test_nvitop_once(run: Run) -> None:
    out = ANSI.sub("", client([tool("nvitop"), "-1", "--ascii"], run.env))
    lines = out.splitlines()
    # Device panel: "| 0  H100 80GB HBM3   On | 00000000:18:00.0 Off | ..." then the readings line below.
    row = re.compile(r"^\|\s+(\d+)\s+(\S.*?)\s+(On|Off|N/A)\s+\|\s+(\S+)\s+(On|Off|N/A)\s+\|")
    rows = {int(m.group(1)): (i, m) for i, line in enumerate(lines) if (m := row.match(line))}
    assert sorted(rows) == [g.index for g in run.gpus], out
    for want in run.gpus:
        i, m = rows[want.index]
        assert want.name.endswith(m.group(2).lstrip(".")), (m.group(2), want.name)
        assert m.group(3) == ("On" if want.persistence else "Off")
        assert m.group(4) == want.pci_bus_id
        assert m.group(5) == ("On" if want.display_active else "Off")
        readings = re.search(r"(\d+)C\s.*\|\s+(\S+)\s+/\s+(\S+)\s+\|", lines[i + 1])
        assert readings, lines[i + 1]
        assert between(float(readings.group(1)), *want.temp, 1)
        assert abs(size(readings.group(3)) - want.mem_total) <= 0.01 * GIB
    # Process panel: "| 0:1   7388 C   root  3584MiB ..." (GPU index, MIG slot after the colon).
    # then %SM and %GMBW: the process's utilisation sample (nvmlDeviceGetProcessUtilization), 0 without one
    proc = re.compile(r"^\|\s+(\d+(?::\d+)?)\s+(\d+)\s+(C|G|C\+G)\s+\S+\s+(\S+)\s+(\S+)\s+(\S+)\s")
    seen = {int(m.group(2)): m for line in lines if (m := proc.match(line))}
    for p in (p for g in run.gpus for p in g.procs):
        assert p.pid in seen, f"pid {p.pid} missing from:\n{out}"
        m = seen[p.pid]
        assert m.group(1) == (f"{p.gpu}:{p.mig_slot}" if p.mig_slot is not None else f"{p.gpu}")
        assert m.group(3) == {"compute": "C", "graphics": "G", "compute+graphics": "C+G"}[p.kind]
        assert size(m.group(4)) == p.mib * MIB
        if p.sm is not None:
            assert (m.group(5), m.group(6)) == (str(p.sm), str(p.mem)), m.group(0)


# ---------------------------------------------------------- nvitop-exporter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def complete(text: str, run: Run) -> bool:
    """Every GPU and every scenario process has been collected once."""
    got = samples(text)
    uuids = {labels.get("uuid") for name, labels, _ in got if name == "gpu_memory_total_MiB"}
    pids = {labels.get("pid") for name, labels, _ in got if name == "process_gpu_memory_MiB"}
    return {g.uuid for g in run.gpus} <= uuids and {str(p.pid) for g in run.gpus for p in g.procs} <= pids


def scrape(run: Run) -> str:
    port = free_port()
    argv = [tool("nvitop-exporter"), "--bind-address", "127.0.0.1", "--port", str(port), "--interval", "0.5"]
    proc = subprocess.Popen(argv, env=run.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, (
                f"nvitop-exporter exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}"
            )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    text: str = resp.read().decode()
                if complete(text, run):
                    return text
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            assert time.monotonic() < deadline, "nvitop-exporter never served every GPU and process"
            time.sleep(0.1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_nvitop_exporter_scrape(run: Run) -> None:
    got = samples(scrape(run))

    def value(name: str, uuid: str) -> float:
        (v,) = [v for n, labels, v in got if n == name and labels.get("uuid") == uuid]
        return v

    for want in run.gpus:
        assert value("gpu_memory_total_MiB", want.uuid) == pytest.approx(want.mem_total / MIB)
        assert between(value("gpu_temperature_C", want.uuid), *want.temp, 1)
        links = {
            labels["link"]
            for n, labels, _ in got
            if n == "gpu_nvlink_tx_throughput_MiBps" and labels.get("uuid") == want.uuid
        }
        assert len(links) == want.nvlink_links, (want.uuid, sorted(links))
        tx = value("gpu_pcie_tx_throughput_MiBps", want.uuid)
        if want.pcie_tx_rate is None:
            assert math.isnan(tx)
        else:  # nvmlDeviceGetPcieThroughput: whole KB/s
            assert tx == pytest.approx(int(want.pcie_tx_rate / 1024) / 1024)
        # a MIG instance's process is listed under the instance and, with its ids, under the parent GPU
        for p in want.procs:
            owners = {
                labels["uuid"]: v
                for n, labels, v in got
                if n == "process_gpu_memory_MiB" and labels.get("pid") == str(p.pid)
            }
            where = {want.uuid} | ({want.mig_uuids[p.mig_slot]} if p.mig_slot is not None else set())
            assert owners == dict.fromkeys(where, float(p.mib)), (p, owners)
