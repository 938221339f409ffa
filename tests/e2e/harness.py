"""Run the real exporter as a subprocess and talk to it over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ExporterProcess:
    def __init__(
        self,
        args: list[str],
        tmp: Path,
        env: dict[str, str] | None = None,
        state_dir: Path | None = None,
        subcommand: str | None = None,  # e.g. "device-plugin": that process instead of the daemon
    ) -> None:
        self.port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        # Short path: the control socket lives in the state dir and unix socket paths max out at 107 bytes.
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="ghe-state-", dir="/tmp"))
        self.log_path = tmp / f"exporter-{self.port}.log"
        self.args = [
            sys.executable,
            "-m",
            "exporter",
            *([subcommand] if subcommand else []),
            "-a",
            f"127.0.0.1:{self.port}",
            "--state-dir",
            str(self.state_dir),
            "--log-format",
            "json",
            *args,
        ]
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = str(ROOT)
        full_env.setdefault("NODE_NAME", "test-node")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, bytes(r.read())
        except urllib.error.HTTPError as e:
            return e.code, bytes(e.read())

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body.decode()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                status, body = self.get("/ready")
                if status == 200:
                    return
                last = body.decode()
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise AssertionError(f"exporter not ready after {timeout}s ({last}):\n{self.logs()}")

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        """Poll /metrics until predicate(text) holds; returns that text."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.metrics()
            if predicate(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"condition not met in {timeout}s; last metrics:\n{text[-3000:]}\nlogs:\n{self.logs()}")

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-8000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Shown with the failing test's output: which part of the stop lingered (stop_slow lines).
                print(f"exporter did not stop within {timeout}s of {signal.Signals(sig).name}; killing it:")
                print(self.logs()[-4000:])
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def run_exporter(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run to completion (for start-up errors): returns exit code and output."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def own_families(text: str) -> str:
    """The exposition minus DCGM families (their names break Prometheus lints by design)."""
    keep = []
    for line in text.splitlines(keepends=True):
        name = line.split(" ")[2] if line.startswith("# ") else line.split("{")[0].split(" ")[0]
        if not name.startswith(("DCGM_", "python_")):  # python_* are prometheus_client's own
            keep.append(line)
    return "".join(keep)
