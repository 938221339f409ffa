from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def plugin_dir() -> Iterator[str]:
    # Not tmp_path: unix socket paths are limited to 107 bytes and pytest's temp paths get long.
    d = tempfile.mkdtemp(prefix="dp-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
