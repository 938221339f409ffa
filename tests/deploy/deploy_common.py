"""Paths and helpers shared by the deploy tests (rules, chart, manifests, dashboards)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/gpu-health-exporter.rules.yml"
RULE_TESTS = sorted((ROOT / "deploy/prometheus/tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs/runbooks.md"
CHART = ROOT / "deploy/helm/gpu-health-exporter"
VALUES_FULL = ROOT / "deploy/helm/values-full.yaml"
PLAIN = ROOT / "deploy/kubernetes"
DASHBOARDS = ROOT / "dashboards"
DASHBOARD_NAMES = ("fleet-overview", "node-gpu-detail", "workload-attribution", "health-errors")
COMPAT_QUERIES = DASHBOARDS / "compat/grafana-12239-queries.txt"
RUNBOOK_BASE = "https://github.com/gpu-health-exporter/gpu-health-exporter/blob/main/docs/runbooks.md#"
RELEASE = "gpu-health-exporter"
NAMESPACE = "gpu-health-exporter"


def promtool() -> str:
    """The promtool binary; a missing binary is a failure, not a skip."""
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install -y prometheus"
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, check=False)


def load_rules(path: Path = RULES) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def alerts(rules: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rules = rules or load_rules()
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


@cache
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_generate", ROOT / "deploy/generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def render_chart(values: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Render the chart; returns {template file name: [documents]} (empty templates dropped)."""
    from helm_python.chart import Chart

    with Chart.load(CHART) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    out: dict[str, list[dict[str, Any]]] = {}
    for path, text in rendered.items():
        if not path.endswith((".yaml", ".yml")):
            continue
        docs = load_docs(text)
        if docs:
            out[path.rsplit("/", 1)[-1]] = docs
    return out


def all_docs(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [d for docs in rendered.values() for d in docs]


def by_kind(rendered: dict[str, list[dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for d in all_docs(rendered) if d["kind"] == kind]


def full_values() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(VALUES_FULL.read_text())
    return data


def load_dashboard(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / f"{name}.json").read_text())
    return data


# Longer names first: "$__interval_ms" must not become "1m_ms".
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval_ms": "60000",
    "$__interval": "1m",
    "$__range_s": "3600",
    "$__range": "1h",
    "${__range}": "1h",
}


def substitute_grafana_vars(expr: str, values: dict[str, str] | None = None, all_value: str = ".*") -> str:
    """Replace Grafana's built-in variables (GRAFANA_VARS, or `values`) and every dashboard variable
    ($node, ${node:regex}, ...) by `all_value`, which makes the query plain PromQL."""
    for var, value in (values or GRAFANA_VARS).items():
        expr = expr.replace(var, value)
    expr = re.sub(r"\$\{(\w+)(?::\w+)?\}", all_value, expr)
    return re.sub(r"\$(\w+)", all_value, expr)


def check_promql(exprs: dict[str, str], tmp_path: Path) -> None:
    """Validate PromQL syntax with promtool: each expr becomes a recording rule."""
    rules = {
        "groups": [
            {
                "name": "syntax",
                "rules": [{"record": f"syntax:check_{i}", "expr": expr} for i, expr in enumerate(exprs.values())],
            }
        ]
    }
    path = tmp_path / "syntax.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = run_promtool("check", "rules", str(path))
    if result.returncode != 0:
        bad = []
        for name, expr in exprs.items():  # find the offenders one by one
            if expr and len(exprs) > 1:
                try:
                    check_promql({name: expr}, tmp_path)
                except AssertionError:
                    bad.append(name)
        raise AssertionError(f"promtool rejected {bad or list(exprs)}:\n{result.stdout}\n{result.stderr}")
