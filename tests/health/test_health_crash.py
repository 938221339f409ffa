"""kill -9 at random moments of an XID storm: the fence and the file survive, counts never go back."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from exporter.health.state import STATE_FILE, validate
from exporter.health.verdict import HealthState

from .conftest import GPU0, EngineFactory

REPO = Path(__file__).resolve().parents[2]


def _counts(doc: dict[str, object]) -> dict[tuple[str, int, str], int]:
    entries = doc["xid_counts"]
    assert isinstance(entries, list)
    return {(c["gpu"], c["xid"], c["class"]): c["count"] for c in entries}


def test_kill_9_under_storm(tmp_path: Path, make_engine: EngineFactory) -> None:
    sd = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(1)
    previous: dict[tuple[str, int, str], int] = {}
    for _ in range(6):
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("storm_child.py")), str(sd)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
        )
        try:
            assert child.stdout is not None
            # structlog's default output shares stdout; skip its lines.
            while (line := child.stdout.readline()) and line.strip() != b"FENCED":
                pass
            assert line.strip() == b"FENCED"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        doc = validate(json.loads((sd / STATE_FILE).read_text()))
        counts = _counts(doc)
        for key, n in previous.items():
            assert counts.get(key, 0) >= n, key  # persisted counts never go backwards
        assert counts[(GPU0, 79, "fence")] >= 1
        previous = counts
    eng = make_engine(state_dir=sd)
    assert eng.verdict(GPU0).state is HealthState.UNHEALTHY
    assert eng.state_file_errors == 0
    assert not [p for p in sd.iterdir() if p.name.startswith(".state.json.tmp-")]  # leftovers swept
