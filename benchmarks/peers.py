#!/usr/bin/env python3
"""Side by side with nvitop-exporter on the same fake NVML, the same 1 s interval, in one run.

    .venv/bin/pip install -e '.[bench]'        # nvitop-exporter
    .venv/bin/python benchmarks/run.py --only peers --peer-seconds 60

Both exporters run at once against tests/fakenvml (h100x8 scenario): ours with `--nvml-library`,
nvitop-exporter through pynvml with LD_LIBRARY_PATH pointing at the fake. nvitop-exporter's
`--interval SEC` is its update period in seconds (default 1.0; it collects in a background thread
whether scraped or not). Measurement windows alternate (idle, scraped, idle, scraped, ...) and each
window measures both processes over the same wall-clock span, so machine noise hits both alike:

- idle CPU: utime+stime delta from /proc/<pid>/stat over the idle windows, as % of one core;
- scraped CPU: the same while each is scraped once a second (the two scrapes half a second apart);
- samples per scrape: non-comment lines of the exposition;
- CPU per exported sample: scraped-window CPU / (scrapes x samples per scrape);
- RSS: VmRSS at the end.

Our process also runs the XID event thread (`nvml-events`), which nvitop-exporter has no counterpart
for. Against the fake its nvmlEventSetWait polls the fake's control file every 5 ms (a real driver
blocks in the kernel), which is most of our idle CPU here; so ours is also reported without that
thread's CPU (/proc/<pid>/task/<tid>/stat, the thread found by name with `py-spy dump`; skipped if
py-spy is not installed or may not attach).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import FAKE_LIB, SCENARIOS, free_port, report, wait_ready  # noqa: E402

WINDOW_S = 10.0  # one idle or scraped window; the phases alternate in windows this long


class Proc:
    """One exporter process: CPU and RSS from /proc, scrapes over HTTP."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, ready_path: str) -> None:
        self.name = name
        self.port = port
        self.tmp = tempfile.mkdtemp(prefix=f"ghe-peer-{name}-")
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **env},
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(self.tmp) / "log", "wb"),  # noqa: SIM115
        )
        try:
            wait_ready(self.proc, f"http://127.0.0.1:{port}{ready_path}", name, Path(self.tmp) / "log")
        except RuntimeError:
            self.stop()
            raise

    def scrape(self) -> int:
        """Samples in one /metrics response."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            body = r.read().decode()
        return sum(1 for line in body.splitlines() if line and not line.startswith("#"))

    def cpu_s(self, tid: int | None = None) -> float:
        where = f"/proc/{self.proc.pid}" + (f"/task/{tid}" if tid is not None else "")
        fields = Path(f"{where}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def thread_id(self, name: str) -> int | None:
        """The native id of the Python thread called `name` (py-spy dump), or None."""
        spy = Path(sys.executable).parent / "py-spy"
        binary = str(spy) if spy.exists() else shutil.which("py-spy")
        if binary is None:
            return None
        try:
            argv = [binary, "dump", "--pid", str(self.proc.pid)]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        m = re.search(rf'^Thread (?:0x[0-9a-fA-F]+ )?\(?(\d+)\)? \([^)]*\): "{re.escape(name)}"', out.stdout, re.M)
        return int(m.group(1)) if m else None

    def rss_mb(self) -> float:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{self.proc.pid}/status").read_text())
        return int(m.group(1)) / 1024 if m else float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _nvitop_exporter() -> str | None:
    here = Path(sys.executable).parent / "nvitop-exporter"
    return str(here) if here.exists() else shutil.which("nvitop-exporter")


def start_ours(scenario: Path) -> Proc:
    port = free_port()
    state = tempfile.mkdtemp(prefix="ghe-peer-state-")
    argv = [sys.executable, "-m", "exporter", "-a", f"127.0.0.1:{port}", "--state-dir", state]
    argv += ["--log-level", "warning", "--nvml-library", str(FAKE_LIB), "-c", "1000"]
    env = {"FAKENVML_CONFIG": str(scenario), "PYTHONPATH": str(ROOT)}
    return Proc("ours", argv, env, port, "/ready")


def start_nvitop(binary: str, scenario: Path) -> Proc:
    port = free_port()
    argv = [binary, "--bind-address", "127.0.0.1", "--port", str(port), "--interval", "1"]
    env = {"FAKENVML_CONFIG": str(scenario), "LD_LIBRARY_PATH": str(FAKE_LIB.parent)}
    return Proc("nvitop", argv, env, port, "/metrics")


def bench_peers(seconds: float = 60.0, scenario: Path = SCENARIOS / "h100x8.json") -> None:
    print(f"side by side with nvitop-exporter: fake NVML ({scenario.stem}), 1 s interval, {seconds:.0f} s per phase")
    binary = _nvitop_exporter()
    if binary is None:
        print("  nvitop-exporter not installed (pip install -e '.[bench]'): skipped")
        return
    procs = [start_ours(scenario), start_nvitop(binary, scenario)]
    try:
        time.sleep(3.0)  # past start-up: first discovery, imports, first cycles
        events_tid = procs[0].thread_id("nvml-events")
        ev_idle = ev_busy = 0.0
        idle = {p.name: 0.0 for p in procs}
        busy = {p.name: 0.0 for p in procs}
        samples = {p.name: 0 for p in procs}
        scrapes = {p.name: 0 for p in procs}
        idle_s = busy_s = 0.0
        window = min(WINDOW_S, seconds)
        while idle_s < seconds or busy_s < seconds:
            for scraped in (False, True):
                span = min(window, seconds - (busy_s if scraped else idle_s))
                if span <= 0:
                    continue
                c0 = {p.name: p.cpu_s() for p in procs}
                e0 = procs[0].cpu_s(events_tid) if events_tid is not None else 0.0
                t0 = time.monotonic()
                end = t0 + span
                tick = 0
                while True:
                    # Scrape each once a second, half a second apart; idle windows just sleep.
                    at = t0 + tick * 0.5
                    if at >= end:
                        break
                    time.sleep(max(0.0, at - time.monotonic()))
                    if scraped:
                        p = procs[tick % 2]
                        samples[p.name] += p.scrape()
                        scrapes[p.name] += 1
                    tick += 1
                time.sleep(max(0.0, end - time.monotonic()))
                took = time.monotonic() - t0
                for p in procs:
                    (busy if scraped else idle)[p.name] += p.cpu_s() - c0[p.name]
                if events_tid is not None:
                    spent = procs[0].cpu_s(events_tid) - e0
                    if scraped:
                        ev_busy += spent
                    else:
                        ev_idle += spent
                if scraped:
                    busy_s += took
                else:
                    idle_s += took
        rss = {p.name: p.rss_mb() for p in procs}
    finally:
        for p in procs:
            p.stop()
    figures: dict[str, dict[str, float]] = {}
    for name in ("ours", "nvitop"):
        per_scrape = samples[name] / max(1, scrapes[name])
        figures[name] = {
            "idle": idle[name] / idle_s * 100,
            "busy": busy[name] / busy_s * 100,
            "samples": per_scrape,
            "per_sample_us": busy[name] / max(1, samples[name]) * 1e6,
            "rss": rss[name],
        }
        f = figures[name]
        report("peers", f"{name}: idle CPU (% of one core)", f"{f['idle']:.2f}%")
        report("peers", f"{name}: CPU scraped once a second (% of one core)", f"{f['busy']:.2f}%")
        report("peers", f"{name}: samples per scrape", f"{f['samples']:.0f}")
        report("peers", f"{name}: CPU per exported sample (us)", f"{f['per_sample_us']:.1f}")
        report("peers", f"{name}: RSS (MB)", f"{f['rss']:.1f}")
    o, n = figures["ours"], figures["nvitop"]
    if events_tid is not None:
        o_idle = (idle["ours"] - ev_idle) / idle_s * 100
        o_busy = (busy["ours"] - ev_busy) / busy_s * 100
        o_per = (busy["ours"] - ev_busy) / max(1, samples["ours"]) * 1e6
        report("peers", "ours: nvml-events thread alone (the fake's poll), idle", f"{ev_idle / idle_s * 100:.2f}%")
        report("peers", "ours without the nvml-events thread: idle CPU", f"{o_idle:.2f}%")
        report("peers", "ours without the nvml-events thread: CPU scraped once a second", f"{o_busy:.2f}%")
        report("peers", "ours without the nvml-events thread: CPU per exported sample (us)", f"{o_per:.1f}")
        report("peers", "ours without nvml-events / nvitop: idle CPU", f"{o_idle / n['idle']:.2f}x")
        report("peers", "ours without nvml-events / nvitop: CPU scraped once a second", f"{o_busy / n['busy']:.2f}x")
        ratio = o_per / n["per_sample_us"]
        report("peers", "ours without nvml-events / nvitop: CPU per exported sample", f"{ratio:.2f}x")
    else:
        print("  (py-spy not available: ours is not also reported without its event thread)")
    report("peers", "ours / nvitop: idle CPU", f"{o['idle'] / n['idle']:.2f}x")
    report("peers", "ours / nvitop: CPU scraped once a second", f"{o['busy'] / n['busy']:.2f}x")
    report("peers", "ours / nvitop: CPU per exported sample", f"{o['per_sample_us'] / n['per_sample_us']:.2f}x")
    report("peers", "ours / nvitop: RSS", f"{o['rss'] / n['rss']:.2f}x")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each phase (idle, scraped)")
    bench_peers(ap.parse_args().seconds)
