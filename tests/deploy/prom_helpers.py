"""Run Debian's `prometheus` server for tests: generated config, loopback port, HTTP API queries.

    with running_prometheus(["127.0.0.1:9400"], rule_files=[RULES]) as prom:
        prom.wait_for_targets_up()
        result = prom.query('DCGM_FI_DEV_GPU_TEMP')

The end-to-end tests scrape a running exporter with this; the self-test in test_prom_helpers.py
proves the helper by letting Prometheus scrape itself.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_JOB = "gpu-health-exporter"


class PrometheusError(RuntimeError):
    pass


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        raise PrometheusError("the `prometheus` binary is missing: apt-get install -y prometheus")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_config(
    targets: Sequence[str],
    *,
    job: str = DEFAULT_JOB,
    rule_files: Sequence[str | Path] = (),
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    honor_labels: bool = True,
    metrics_path: str = "/metrics",
    scheme: str = "http",
    extra_scrape_configs: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A prometheus.yml as a dict: one static job (honor_labels like the ServiceMonitor) + extras."""
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": evaluation_interval,
            "scrape_timeout": scrape_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "honor_labels": honor_labels,
                "metrics_path": metrics_path,
                "scheme": scheme,
                "static_configs": [{"targets": list(targets)}],
            },
            *extra_scrape_configs,
        ],
    }


@dataclass
class PrometheusServer:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: Any = field(repr=False, default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _get(self, path: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
        data = json.loads(body)
        if data.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {data.get('errorType')}: {data.get('error')}")
        return data["data"]

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"prometheus not ready after {timeout}s:\n{self.log()}")

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the `result` list (vector: [{'metric': {...}, 'value': [ts, 'v']}])."""
        params = {"query": expr}
        if at is not None:
            params["time"] = str(at)
        data = self._get("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        data = self._get("/api/v1/query_range", {"query": expr, "start": str(start), "end": str(end), "step": step})
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self._get("/api/v1/targets")["activeTargets"]
        return active

    def rules(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._get("/api/v1/rules")["groups"]
        return groups

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return alerts

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 30.0,
        interval: float = 0.25,
    ) -> list[dict[str, Any]]:
        """Poll `expr` until predicate(result) holds; returns that result."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = self.query(expr)
            if predicate(last):
                return last
            time.sleep(interval)
        raise PrometheusError(f"timed out waiting for {expr!r}; last result {last}")

    def wait_for_targets_up(self, job: str | None = None, timeout: float = 30.0) -> None:
        selector = f'up{{job="{job}"}}' if job else "up"
        self.wait_for(selector, lambda r: bool(r) and all(s["value"][1] == "1" for s in r), timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


def start_prometheus(
    config: dict[str, Any], workdir: Path | None = None, port: int | None = None, ready_timeout: float = 30.0
) -> PrometheusServer:
    """Start `prometheus` with `config` on 127.0.0.1 (a free port unless given) and wait until ready."""
    binary = prometheus_binary()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="prom-test-"))
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = port or free_port()
    log_path = workdir / "prometheus.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    server = PrometheusServer(port=port, workdir=workdir, process=process, log_path=log_path, _log=log)
    try:
        server.wait_ready(timeout=ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_prometheus(
    targets: Sequence[str] = (),
    *,
    config: dict[str, Any] | None = None,
    workdir: Path | None = None,
    **config_kwargs: Any,
) -> Iterator[PrometheusServer]:
    """Context manager: start Prometheus scraping `targets` (or with a full `config`), stop it after."""
    server = start_prometheus(config or make_config(targets, **config_kwargs), workdir=workdir)
    try:
        yield server
    finally:
        server.stop()


def self_scrape_config(port: int, **config_kwargs: Any) -> dict[str, Any]:
    """A config whose only target is the Prometheus server itself on `port`."""
    return make_config([f"127.0.0.1:{port}"], job="prometheus", **config_kwargs)
