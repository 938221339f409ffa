"""The version is set once, in pyproject.toml; everything else takes it from there."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import exporter

ROOT = Path(__file__).resolve().parents[2]


def pyproject_version() -> str:
    m = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    assert m, "pyproject.toml: no version in [project]"
    return m.group(1)


def test_package_version_is_pyprojects() -> None:
    # A mismatch means the installed metadata is stale: re-run `pip install -e .` (make venv does).
    assert exporter.__version__ == pyproject_version()


def test_chart_and_manifests_carry_the_version() -> None:
    version = pyproject_version()
    chart = yaml.safe_load((ROOT / "deploy/helm/gpu-health-exporter/Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == version
    values = yaml.safe_load((ROOT / "deploy/helm/gpu-health-exporter/values.yaml").read_text())
    assert values["image"]["tag"] == ""  # defaults to the chart's appVersion
    assert yaml.safe_load((ROOT / "deploy/helm/values-full.yaml").read_text())["image"]["tag"] == version
    daemonset = (ROOT / "deploy/kubernetes/daemonset.yaml").read_text()
    assert f"image: ghcr.io/gpu-health-exporter/gpu-health-exporter:{version}\n" in daemonset
