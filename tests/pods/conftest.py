"""Shared fixtures for pod attribution tests: a fake kubelet on a short socket path."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The fakes live in tests/ (shared with the lead's e2e tests) and the helpers here; make both
# importable whichever import mode pytest uses.
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

from fakekubelet import FakeKubelet  # noqa: E402


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Not tmp_path: unix socket paths are limited to ~107 bytes and pytest's can be longer.
    d = Path(tempfile.mkdtemp(prefix="fk-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def kubelet(sock_dir: Path) -> Iterator[FakeKubelet]:
    fake = FakeKubelet(sock_dir / "kubelet.sock").start()
    yield fake
    fake.stop()
