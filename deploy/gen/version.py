"""The version is set once, in pyproject.toml; the chart and values-full.yaml take it from there."""

from __future__ import annotations

import re
from pathlib import Path

from deploy.gen.paths import CHART, ROOT


def project_version() -> str:
    """pyproject.toml's [project] version: the one place the version is set."""
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    if not m:
        raise SystemExit("pyproject.toml: no version in [project]")
    return m.group(1)


def version_files() -> dict[Path, str]:
    """pyproject.toml's version -> the chart's version and appVersion (the image tag defaults to appVersion)
    and the image tag of deploy/helm/values-full.yaml; PLAIN_VALUES takes it for deploy/kubernetes/."""
    version = project_version()
    out: dict[Path, str] = {}
    for path, patterns in (
        (
            CHART / "Chart.yaml",
            [(r"^version: .*$", f"version: {version}"), (r"^appVersion: .*$", f'appVersion: "{version}"')],
        ),
        (ROOT / "deploy/helm/values-full.yaml", [(r"^(image:\n(?:  .*\n)*?  tag: ).*$", f'\\g<1>"{version}"')]),
    ):
        text = path.read_text()
        for pattern, replacement in patterns:
            text, found = re.subn(pattern, replacement, text, count=1, flags=re.M)
            if not found:
                raise SystemExit(f"{path.relative_to(ROOT)}: no match for {pattern!r}")
        out[path] = text
    return out
