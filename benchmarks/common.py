"""What the benchmark scripts share: the results table, `report`, paths and a free port.

`benchmarks/run.py` and `benchmarks/pods.py` both report into `RESULTS`; run.py prints it as one
table at the end. Importing this module needs the repository root on sys.path (both scripts put it
there first).
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE_LIB = ROOT / "tests/fakenvml/build/libnvidia-ml.so.1"
SCENARIOS = ROOT / "tests/fakenvml/scenarios"
RESULTS: list[tuple[str, str, str]] = []


def report(section: str, what: str, value: str) -> None:
    """Record one figure in RESULTS and print it."""
    RESULTS.append((section, what, value))
    print(f"  {what:<62} {value}", flush=True)


def wait_ready(proc: subprocess.Popen[bytes], url: str, name: str, log: Path, timeout_s: float = 30) -> None:
    """Wait until `url` answers 200; raise with the log's tail if the process exits or never does."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not become ready")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
