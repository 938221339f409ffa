"""Where the generator's sources and outputs live."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/gpu-health-exporter.rules.yml"
PLAIN_DIR = ROOT / "deploy/kubernetes"
CHART = ROOT / "deploy/helm/gpu-health-exporter"
CHART_RULE = CHART / "templates/prometheusrule.yaml"
DASHBOARDS = ROOT / "dashboards"
CHART_DASHBOARDS = CHART / "dashboards"

JOB = "gpu-health-exporter"
NAMESPACE = "gpu-health-exporter"
