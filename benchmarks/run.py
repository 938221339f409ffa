#!/usr/bin/env python3
"""Benchmarks for gpu-health-exporter. Prints figures side by side, in one run.

    .venv/bin/python benchmarks/run.py
        [--only render,scrape,collect,memory,pods,processes,proxy,dra_taints,health,peers]
        [--soak-seconds 600] [--peer-seconds 60]

Each comparison is a ratio measured in the same run (these machines are noisy):
render vs prometheus_client.generate_latest on the same samples; scrape
throughput vs nginx serving the same bytes as a static file. Results and the
command are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import prometheus_client  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily  # noqa: E402

from benchmarks.common import FAKE_LIB, RESULTS, SCENARIOS, free_port, report, wait_ready  # noqa: E402
from exporter.collector import Collector  # noqa: E402
from exporter.counters import default_counters  # noqa: E402
from exporter.devices import parse_device_selector  # noqa: E402
from exporter.fields import Event, FieldSpec  # noqa: E402
from exporter.labels import RenderContext  # noqa: E402
from exporter.render import Renderer  # noqa: E402
from exporter.snapshot import Snapshot  # noqa: E402
from exporter.xid import XidTracker  # noqa: E402

# --- render -------------------------------------------------------------------------------


def _prom_client_registry(snapshots: list[Snapshot], fields: Sequence[FieldSpec]) -> Callable[[int], bytes]:
    """What an exporter built on prometheus_client does per cycle: families from samples, then generate_latest."""

    def render(i: int) -> bytes:
        snap = snapshots[i % len(snapshots)]

        class OneCycle:
            def collect(self):  # type: ignore[no-untyped-def]
                for f in fields:
                    if f.type == "label" or isinstance(f.reader, Event):
                        continue
                    cls = CounterMetricFamily if f.type == "counter" else GaugeMetricFamily
                    labels = [
                        "gpu",
                        "UUID",
                        "pci_bus_id",
                        "device",
                        "modelName",
                        "GPU_I_PROFILE",
                        "GPU_I_ID",
                        "Hostname",
                        "DCGM_FI_DRIVER_VERSION",
                    ]
                    fam = cls(f.name, f.help, labels=labels)
                    for s in snap.samples:
                        v = s.values.get(f.name)
                        if v is None:
                            continue
                        g = s.gpu
                        prof, gi = (s.mig.profile, str(s.mig.gpu_instance_id)) if s.mig else ("", "")
                        fam.add_metric(
                            [
                                str(g.index),
                                g.uuid,
                                g.pci_bus_id,
                                g.device,
                                g.name,
                                prof,
                                gi,
                                "node-1",
                                snap.inventory.driver_version,
                            ],
                            v,
                        )
                    yield fam

        reg = prometheus_client.CollectorRegistry()
        reg.register(OneCycle())
        return prometheus_client.generate_latest(reg)

    return render


class FakeClock:
    """Simulated time, so 50 cycles of changing values take no wall time."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _best_interleaved(
    a: Callable[[int], object], b: Callable[[int], object], per_batch_a: int, per_batch_b: int, batches: int = 9
) -> tuple[float, float]:
    """Seconds per call of `a` and `b`, timeit-style: batches alternate between the two
    (so a noisy moment hits both), the fastest batch of each counts, and the garbage
    collector is paused so neither side pays for the other's garbage."""
    best = [float("inf"), float("inf")]
    i = 0
    gc.collect()
    gc.disable()
    try:
        for _ in range(batches):
            for side, fn, n in ((0, a, per_batch_a), (1, b, per_batch_b)):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn(i)
                    i += 1
                best[side] = min(best[side], (time.perf_counter() - t0) / n)
    finally:
        gc.enable()
    return best[0], best[1]


def bench_render() -> None:
    from exporter.simulate import SimulatedBackend

    print("render (per cycle, same samples; values change every cycle)")
    for label, spec in (
        ("8 GPUs, default fields", None),
        ("8 GPUs x 7 MIG instances", ";".join(f"{g}:" + "+".join(["1g.10gb"] * 7) for g in range(8))),
    ):
        clock = FakeClock(1000.0)
        backend = SimulatedBackend.from_spec(f"mig={spec}" if spec else None, clock=clock)
        counters = default_counters()
        col = Collector(backend, counters, parse_device_selector("f"), 1.0, 2.0, clock=clock)
        snaps = []
        for _ in range(50):
            clock.now += 1.0
            snaps.append(col.run_once())
        # The parent MIG layout renders each sample once, as the prometheus_client side does: the same samples.
        renderer = Renderer(
            RenderContext("Hostname", "node-1"),
            XidTracker(300, message=str),
            "simulated",
            process_registry=None,
            mig_layout="parent",
        )
        series = renderer.render_dcgm(snaps[0], counters.fields).count("\n")
        other = _prom_client_registry(snaps, counters.fields)

        def ours_once(
            i: int, r: Renderer = renderer, ss: list[Snapshot] = snaps, fs: tuple[FieldSpec, ...] = counters.fields
        ) -> object:
            return r.render_dcgm(ss[i % len(ss)], fs)

        ours, theirs = _best_interleaved(ours_once, other, 60, 15)
        report("render", f"{label}: lines rendered", str(series))
        report("render", f"{label}: ours (ms/cycle)", f"{ours * 1e3:.3f}")
        report("render", f"{label}: prometheus_client generate_latest (ms/cycle)", f"{theirs * 1e3:.3f}")
        report("render", f"{label}: speed-up", f"{theirs / ours:.1f}x")
        full = renderer.render(snaps[-1])
        report("render", f"{label}: exposition bytes (plain / gzip)", f"{len(full.plain)} / {len(full.gzipped)}")
        if spec:  # the default dcgm layout: every field once per GPU instance, so more lines
            dcgm = Renderer(
                RenderContext("Hostname", "node-1"), XidTracker(300, message=str), "simulated", process_registry=None
            )

            def dcgm_once(
                i: int, r: Renderer = dcgm, ss: list[Snapshot] = snaps, fs: tuple[FieldSpec, ...] = counters.fields
            ) -> object:
                return r.render_dcgm(ss[i % len(ss)], fs)

            dcgm_s, _ = _best_interleaved(dcgm_once, ours_once, 60, 15)
            lines = dcgm.render_dcgm(snaps[0], counters.fields).count("\n")
            report("render", f"{label}, --mig-layout dcgm: lines / ours (ms/cycle)", f"{lines} / {dcgm_s * 1e3:.3f}")


# --- a running exporter -------------------------------------------------------------------


class Exporter:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, tls: bool = False) -> None:
        self.port = free_port()
        self.state = tempfile.mkdtemp(prefix="ghe-bench-")
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "-a",
                f"127.0.0.1:{self.port}",
                "--state-dir",
                self.state,
                "--log-level",
                "warning",
                *args,
            ],
            # Logs to a file, never an unread pipe: a full pipe would block the daemon's log writes.
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=open(Path(self.state) / "exporter.log", "wb"),  # noqa: SIM115
        )
        try:
            if tls:
                self._wait_ready_tls()
            else:
                wait_ready(
                    self.proc, f"http://127.0.0.1:{self.port}/ready", "exporter", Path(self.state) / "exporter.log"
                )
        except RuntimeError:
            self.stop()
            raise

    def _wait_ready_tls(self, timeout_s: float = 30) -> None:
        import http.client
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a benchmark's own throwaway CA
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited: {(Path(self.state) / 'exporter.log').read_text()[-2000:]}")
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=1)
                conn.request("GET", "/ready")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("exporter did not become ready over TLS")

    def get(self, path: str = "/metrics") -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return bytes(r.read())

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"VmRSS:\s+(\d+) kB", text)
        return int(m.group(1)) / 1024 if m else float("nan")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / tck

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.state, ignore_errors=True)


def wrk(url: str, conns: int, seconds: int, headers: Sequence[str] = ()) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) from wrk --latency."""
    threads = max(1, min(2, conns))
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout

    def ms(tag: str) -> float:
        m = re.search(rf"^\s+{tag}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, ms("50"), ms("99")


def start_nginx(body: bytes) -> tuple[subprocess.Popen[bytes], int, str]:
    root = tempfile.mkdtemp(prefix="ghe-nginx-")
    os.chmod(root, 0o755)  # nginx workers run unprivileged: a 0700 temp dir would answer 403
    for name, data in (("metrics", body), ("metrics.gz", gzip.compress(body, 6))):
        (Path(root) / name).write_bytes(data)
        os.chmod(Path(root) / name, 0o644)
    port = free_port()
    conf = Path(root) / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  default_type "text/plain; version=0.0.4; charset=utf-8";
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
  server {{ listen 127.0.0.1:{port}; root {root}; gzip_static on; }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", root], stderr=subprocess.DEVNULL)
    for _ in range(50):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    # Measure only a server that really serves the bytes (a misconfigured one answers fast 403s).
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        served = r.read()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=5) as r:
        gz_ok = r.headers.get("Content-Encoding") == "gzip" and gzip.decompress(r.read()) == body
    if served != body or not gz_ok:
        proc.terminate()
        raise RuntimeError(f"nginx did not serve the exposition ({len(served)} bytes, gzip ok: {gz_ok})")
    return proc, port, root


def bench_scrape(seconds: int) -> None:
    print("scrape (wrk on loopback; exporter on simulated 8x H100, 1 s interval; nginx: 1 worker, same bytes)")
    exp = Exporter(["--simulate", "-c", "1000"])
    try:
        body = exp.get()
        nginx, nport, nroot = start_nginx(body)
        try:
            url = f"http://127.0.0.1:{exp.port}/metrics"
            nurl = f"http://127.0.0.1:{nport}/metrics"
            for conns in (1, 50):
                rps, p50, p99 = wrk(url, conns, seconds)
                report("scrape", f"{conns} client(s): ours p50 / p99 (ms)", f"{p50:.2f} / {p99:.2f}")
                report("scrape", f"{conns} client(s): ours throughput (req/s)", f"{rps:.0f}")
            for enc, hdr in (("plain", []), ("gzip", ["Accept-Encoding: gzip"])):
                # Alternate the two servers and keep each one's best round: a noisy
                # moment on this shared machine then cannot decide the ratio.
                ours = theirs = 0.0
                for _ in range(3):
                    ours = max(ours, wrk(url, 50, seconds, hdr)[0])
                    theirs = max(theirs, wrk(nurl, 50, seconds, hdr)[0])
                report("scrape", f"50 conns {enc}: ours / nginx (req/s)", f"{ours:.0f} / {theirs:.0f}")
                report("scrape", f"50 conns {enc}: ratio ours/nginx", f"{ours / theirs:.2f}")
            before = exp.get("/metrics").count(b"\n")
            report("scrape", "exposition lines", str(before))
            bench_scrape_vs_prometheus_client(exp, body, seconds)
            bench_scrape_tls(seconds)
        finally:
            nginx.terminate()
            nginx.wait(5)
            shutil.rmtree(nroot, ignore_errors=True)
    finally:
        exp.stop()


# prometheus_client's own HTTP server (start_http_server) on the same payload: the families parsed once
# from our exposition and rendered by generate_latest per scrape, as an exporter built on it serves them.
_PROM_CLIENT_SERVER = """
import sys, time
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
families = list(text_string_to_metric_families(open(sys.argv[1]).read()))
class Same:
    def collect(self):
        return families
registry = CollectorRegistry()
registry.register(Same())
start_http_server(int(sys.argv[2]), addr="127.0.0.1", registry=registry)
while True:
    time.sleep(3600)
"""


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_per_scrape_us(pid: int, url: str, seconds: int) -> tuple[float, float, float]:
    """(p99 ms, req/s, CPU µs per scrape) for 50 clients; the process's idle CPU over as long is taken off."""
    idle0 = _proc_cpu_s(pid)
    time.sleep(seconds)
    idle = _proc_cpu_s(pid) - idle0
    busy0 = _proc_cpu_s(pid)
    rps, _, p99 = wrk(url, 50, seconds)
    busy = _proc_cpu_s(pid) - busy0
    return p99, rps, max(0.0, busy - idle) / max(1.0, rps * seconds) * 1e6


def bench_scrape_vs_prometheus_client(exp: Exporter, body: bytes, seconds: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="ghe-promclient-"))
    (root / "metrics.txt").write_bytes(body)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROM_CLIENT_SERVER, str(root / "metrics.txt"), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "log", "wb"),  # noqa: SIM115
    )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/metrics", "prometheus_client", root / "log")
        ours = _cpu_per_scrape_us(exp.proc.pid, f"http://127.0.0.1:{exp.port}/metrics", seconds)
        theirs = _cpu_per_scrape_us(proc.pid, f"http://127.0.0.1:{port}/metrics", seconds)
        report("scrape", "50 clients: p99 ours / prometheus_client (ms)", f"{ours[0]:.2f} / {theirs[0]:.2f}")
        report("scrape", "50 clients: req/s ours / prometheus_client", f"{ours[1]:.0f} / {theirs[1]:.0f}")
        report("scrape", "CPU per scrape ours / prometheus_client (us)", f"{ours[2]:.0f} / {theirs[2]:.0f}")
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(root, ignore_errors=True)


def bench_scrape_tls(seconds: int) -> None:
    """The same scrapes over TLS 1.3 with basic auth (--web-config-file), keep-alive as Prometheus scrapes."""
    import base64

    import bcrypt
    import trustme

    root = Path(tempfile.mkdtemp(prefix="ghe-tls-"))
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(root / "server.crt"))
    leaf.private_key_pem.write_to_path(str(root / "server.key"))
    hashed = bcrypt.hashpw(b"bench", bcrypt.gensalt(10)).decode()
    (root / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    exp = Exporter(
        ["--simulate", "-c", "1000", "--web-config-file", str(root / "web.yml"), "--web-unauthenticated-probes"],
        tls=True,
    )
    try:
        auth = "Authorization: Basic " + base64.b64encode(b"prometheus:bench").decode()
        url = f"https://127.0.0.1:{exp.port}/metrics"
        wrk(url, 50, 1, [auth])  # the password's one bcrypt, before the measured run
        rps, p50, p99 = wrk(url, 50, seconds, [auth])
        report("scrape", "50 clients TLS 1.3 + basic auth: ours p50 / p99 (ms)", f"{p50:.2f} / {p99:.2f}")
        report("scrape", "50 clients TLS 1.3 + basic auth: ours throughput (req/s)", f"{rps:.0f}")
    finally:
        exp.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- collection against the fake NVML -----------------------------------------------------


def bench_collect() -> None:
    from exporter.nvml import NvmlBackend

    print("collection CPU against the fake NVML (h100x8 scenario, default fields)")
    os.environ["FAKENVML_CONFIG"] = str(SCENARIOS / "h100x8.json")
    backend = NvmlBackend(str(FAKE_LIB))
    backend.start()
    col = Collector(backend, default_counters(), parse_device_selector("f"), 1.0, 2.0)
    col.run_once()
    n = 200
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(n):
        col.run_once()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    gpus = len(col.inventory.gpus) if col.inventory else 0
    report("collect", "CPU per GPU per cycle (ms)", f"{cpu / n / gpus * 1e3:.3f}")
    report("collect", "wall time per cycle, 8 GPUs (ms)", f"{wall / n * 1e3:.3f}")
    backend.shutdown()


def bench_memory(seconds: int) -> None:
    print(f"resident memory: exporter on the fake NVML (h100x8), 1 s interval, scraped every second, {seconds} s")
    exp = Exporter(
        ["--nvml-library", str(FAKE_LIB), "-c", "1000"], env={"FAKENVML_CONFIG": str(SCENARIOS / "h100x8.json")}
    )
    try:
        start_rss = exp.rss_mb()
        cpu0 = exp.cpu_s()
        t_end = time.time() + seconds
        samples = []
        while time.time() < t_end:
            exp.get()
            samples.append(exp.rss_mb())
            time.sleep(1.0)
        cpu = exp.cpu_s() - cpu0
        report("memory", "RSS after start-up (MB)", f"{start_rss:.1f}")
        report("memory", f"RSS after {seconds} s (MB)", f"{exp.rss_mb():.1f}")
        report("memory", "RSS max during run (MB)", f"{max(samples):.1f}")
        report("memory", "process CPU, share of one core", f"{cpu / seconds * 100:.2f}%")
    finally:
        exp.stop()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_health() -> None:
    """XID -> verdict -> ListAndWatch at the (fake) kubelet; collection and scrapes during a storm."""
    from exporter.health.control import request
    from tests.deviceplugin.fakekubelet_registration import FakeKubelet

    print("health: fake NVML (h100x8) -> exporter (1 s interval) -> device plugin -> fake kubelet")
    plugin_dir = tempfile.mkdtemp(prefix="ghe-bench-dp-", dir="/tmp")
    kubelet = FakeKubelet(plugin_dir).start()
    control = Path(tempfile.mkdtemp(prefix="ghe-bench-ctl-")) / "control.jsonl"
    control.touch()
    env = {"FAKENVML_CONFIG": str(SCENARIOS / "h100x8.json"), "FAKENVML_CONTROL": str(control)}
    exp = Exporter(
        ["--nvml-library", str(FAKE_LIB), "-c", "1000", "--device-plugin", "--device-plugin-dir", plugin_dir], env=env
    )
    res = "nvidia.com/gpu"

    def inject(op: dict[str, object]) -> None:
        with open(control, "a") as fh:
            fh.write(json.dumps(op) + "\n")

    try:
        assert kubelet.wait_for(lambda: kubelet.allocatable(res) == 8, timeout=20)
        uuids = sorted(kubelet.latest(res).ids)  # type: ignore[union-attr]
        by_index = json.loads(exp.get("/gpus"))["devices"]
        index_of = {d["uuid"]: d["index"] for d in by_index if "parent" not in d}
        latencies = []
        for i in range(100):
            uuid = uuids[i % 8]
            t0 = time.monotonic()
            inject({"op": "xid", "gpu": index_of[uuid], "xid": 79})

            def unhealthy(u: str = uuid) -> bool:
                latest = kubelet.latest(res)
                return latest is not None and latest.health_of(u) == "Unhealthy"

            ok = kubelet.wait_for(unhealthy, timeout=5)
            latencies.append(time.monotonic() - t0 if ok else float("inf"))
            request(Path(exp.state) / "control.sock", {"op": "clear", "target": uuid, "reason": "benchmark"})
            kubelet.wait_for(lambda: kubelet.allocatable(res) == 8, timeout=5)
        report(
            "health",
            "XID 79 -> kubelet Unhealthy, 100 XIDs: p50 / p99 (ms)",
            f"{_percentile(latencies, 0.5) * 1e3:.1f} / {_percentile(latencies, 0.99) * 1e3:.1f}",
        )

        def scrape_ms(n: int = 50) -> tuple[float, float]:
            lat = []
            for _ in range(n):
                t0 = time.perf_counter()
                exp.get()
                lat.append(time.perf_counter() - t0)
            return _percentile(lat, 0.5) * 1e3, _percentile(lat, 0.99) * 1e3

        def collection_s() -> float:
            text = exp.get().decode()
            m = re.search(r"^gpuhealth_collection_duration_seconds (\S+)$", text, re.M)
            return float(m.group(1)) if m else float("nan")

        def cycles() -> float:
            m = re.search(r"^gpuhealth_collections_total (\S+)$", exp.get().decode(), re.M)
            return float(m.group(1)) if m else float("nan")

        quiet = scrape_ms()
        quiet_coll = collection_s()
        cycles_before = cycles()
        rss0 = exp.rss_mb()
        with open(control, "a") as fh:  # a storm: 20 000 XIDs at once (NVML's queue drops the overflow)
            for i in range(20000):
                fh.write(json.dumps({"op": "xid", "gpu": i % 8, "xid": 13}) + "\n")
        storm = scrape_ms()
        time.sleep(2.5)
        storm_coll = collection_s()
        storm_cycles = cycles() - cycles_before
        if not storm_cycles >= 2:
            raise RuntimeError(f"collection stalled during the storm ({storm_cycles} cycles)")
        report("health", "collection cycles during the ~3 s storm window (1 s interval)", f"{storm_cycles:.0f}")
        report("health", "scrape latency quiet: p50 / p99 (ms)", f"{quiet[0]:.2f} / {quiet[1]:.2f}")
        report("health", "scrape latency during XID storm: p50 / p99 (ms)", f"{storm[0]:.2f} / {storm[1]:.2f}")
        report(
            "health", "collection cycle quiet / during storm (ms)", f"{quiet_coll * 1e3:.2f} / {storm_coll * 1e3:.2f}"
        )
        report("health", "RSS growth over the storm (MB)", f"{exp.rss_mb() - rss0:.1f}")
    finally:
        exp.stop()
        kubelet.stop()
        shutil.rmtree(plugin_dir, ignore_errors=True)


def bench_pods_section() -> None:
    from benchmarks.pods import bench_pods

    bench_pods()


def bench_processes_section() -> None:
    from benchmarks.processes import bench_processes

    bench_processes()


def bench_proxy_section() -> None:
    from benchmarks.proxy_latency import main as proxy_main

    proxy_main([])


def bench_dra_taints_section() -> None:
    from benchmarks.dra_taints import main as dra_main

    dra_main([])


def bench_peers_section(seconds: float) -> None:
    from benchmarks.peers import bench_peers

    bench_peers(seconds)


SECTIONS = {
    "render": lambda a: bench_render(),
    "scrape": lambda a: bench_scrape(a.seconds),
    "collect": lambda a: bench_collect(),
    "memory": lambda a: bench_memory(a.soak_seconds),
    "health": lambda a: bench_health(),
    "pods": lambda a: bench_pods_section(),
    "processes": lambda a: bench_processes_section(),
    "proxy": lambda a: bench_proxy_section(),
    "dra_taints": lambda a: bench_dra_taints_section(),
    "peers": lambda a: bench_peers_section(a.peer_seconds),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections")
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per measurement")
    ap.add_argument("--soak-seconds", type=int, default=600, help="memory soak duration")
    ap.add_argument("--peer-seconds", type=float, default=60.0, help="peers: length of each phase (idle, scraped)")
    ap.add_argument("--json", help="also write results to this file")
    args = ap.parse_args()
    for name in args.only.split(","):
        SECTIONS[name.strip()](args)
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=1))
    print("\n| section | measurement | value |\n|---|---|---|")
    for section, what, value in RESULTS:
        print(f"| {section} | {what} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
