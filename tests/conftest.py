"""Shared test fixtures: the fake libnvidia-ml.so.1 (tests/fakenvml).

`fakenvml_build` builds the fake once per session with `make -C tests/fakenvml`
and fails loudly when the toolchain (cc, make, libcjson-dev) is missing.
`fake_nvml` gives each test its own scenario + control file in tmp_path and
sets FAKENVML_CONFIG / FAKENVML_CONTROL (read by the library at every
nvmlInit that follows a full shutdown, so one pytest process can switch
scenarios freely).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fakenvmllib import FAKENVML_DIR, FakeNvml, FakeNvmlBuild


@pytest.fixture(scope="session")
def fakenvml_build() -> FakeNvmlBuild:
    cc = os.environ.get("CC", "cc")
    missing = [tool for tool in (cc, "make") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"cannot build the fake NVML: {', '.join(missing)} not found (install build-essential)", False)
    proc = subprocess.run(["make", "-C", str(FAKENVML_DIR)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(
            "building tests/fakenvml failed (needs a C compiler and libcjson-dev):\n" + proc.stdout + proc.stderr,
            False,
        )
    build = FakeNvmlBuild(
        lib=FAKENVML_DIR / "build" / "libnvidia-ml.so.1",
        old_lib=FAKENVML_DIR / "build" / "old" / "libnvidia-ml.so.1",
    )
    for path in (build.lib, build.old_lib, build.r418_lib):
        if not path.is_file():
            pytest.fail(f"make succeeded but {path} is missing", False)
    return build


@pytest.fixture
def fake_nvml(fakenvml_build: FakeNvmlBuild, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    return FakeNvml(fakenvml_build, tmp_path, monkeypatch)
