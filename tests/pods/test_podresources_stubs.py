"""The committed stubs must be exactly what podresources/regenerate.py produces from the protos."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from podresources import regenerate
from podresources.client import PodResourcesClient
from tests.pods.podfixtures import container, gpu_uuid, pod

REPO = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    generated = regenerate.generate(tmp_path)
    assert len(generated) == 6
    stale = [
        str(path.relative_to(tmp_path))
        for path in generated
        if path.read_bytes() != (REPO / path.relative_to(tmp_path)).read_bytes()
    ]
    assert not stale, f"stubs drifted from the protos; run .venv/bin/python podresources/regenerate.py: {stale}"


def test_fake_kubelet_runs_as_a_program(sock_dir: Path) -> None:
    """The lead's e2e/benchmark runs `python tests/fakekubelet.py --socket PATH --layout FILE`."""
    layout = sock_dir / "layout.json"
    layout.write_text(json.dumps({"pods": [pod("p", "ns", container("c", "nvidia.com/gpu", [gpu_uuid(0)]))]}))
    sock = sock_dir / "kubelet.sock"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "fakekubelet.py"), "--socket", str(sock), "--layout", str(layout)],
        cwd=sock_dir, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and "serving" in proc.stdout.readline()
        assert [p.name for p in PodResourcesClient(str(sock), timeout_s=5).list()] == ["p"]
    finally:
        proc.terminate()
        try:
            rc = proc.wait(30)  # generous: the CI machine may be busy
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0  # SIGTERM is a clean shutdown
