"""Shared fixtures for pod attribution tests: a fake kubelet on a short socket path."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakekubelet import FakeKubelet


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
