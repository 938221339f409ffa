#!/usr/bin/env python3
"""Generate the derived deployment artefacts from their sources.

Sources -> outputs (the code is in deploy/gen/, one module per kind of output):
- pyproject.toml's version
    -> the chart's version and appVersion, deploy/helm/values-full.yaml's image tag (`gen.version`)
- deploy/prometheus/gpu-health-exporter.rules.yml
    -> deploy/helm/gpu-health-exporter/templates/prometheusrule.yaml (thresholds from values; `gen.rules`)
- the Helm chart rendered with PLAIN_VALUES
    -> deploy/kubernetes/*.yaml (plain manifests, PrometheusRule included; `gen.manifests`)
- the dashboard definitions (`gen.dashboards`, one module per dashboard)
    -> dashboards/*.json and deploy/helm/gpu-health-exporter/dashboards/*.json (ConfigMaps)

Run `python deploy/generate.py` after editing a source; `--check` exits 1 when an output is out of
date (the tests run the same check).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy.gen.dashboards import dashboards  # noqa: E402
from deploy.gen.manifests import PLAIN_VALUES, plain_manifests  # noqa: E402
from deploy.gen.paths import CHART_DASHBOARDS, CHART_RULE, DASHBOARDS  # noqa: E402
from deploy.gen.rules import THRESHOLD_DEFAULTS, THRESHOLDS, chart_prometheus_rule, load_rules  # noqa: E402
from deploy.gen.version import project_version, version_files  # noqa: E402

__all__ = [
    "PLAIN_VALUES",
    "THRESHOLDS",
    "THRESHOLD_DEFAULTS",
    "dashboards",
    "main",
    "outputs",
    "plain_manifests",
    "project_version",
    "version_files",
]


def outputs() -> dict[Path, str]:
    rules = load_rules()
    out: dict[Path, str] = {CHART_RULE: chart_prometheus_rule(rules)}
    for key, board in dashboards().items():
        text = json.dumps(board, indent=2) + "\n"
        out[DASHBOARDS / f"{key}.json"] = text
        out[CHART_DASHBOARDS / f"{key}.json"] = text
    return out


def _sync(files: dict[Path, str], check: bool, stale: list[Path]) -> None:
    for path, text in files.items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if any output is out of date")
    args = parser.parse_args(argv)
    stale: list[Path] = []
    _sync(version_files(), args.check, stale)  # first: the plain manifests are rendered from the chart
    _sync(outputs(), args.check, stale)
    # The plain manifests are rendered from the chart on disk, so they come after it.
    _sync(plain_manifests(), args.check, stale)
    for path in stale:
        print(("out of date: " if args.check else "wrote ") + str(path.relative_to(ROOT)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
