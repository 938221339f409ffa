"""Alert rules: promtool check/test, coverage of every alert, runbooks, chart/plain sync."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_common import (
    PLAIN,
    RULE_TESTS,
    RULES,
    RUNBOOK_BASE,
    RUNBOOKS,
    alerts,
    by_kind,
    generator,
    load_docs,
    load_rules,
    render_chart,
    run_promtool,
)

SEVERITIES = {"critical", "warning", "info"}


def _duration_s(text: str) -> int:
    total = 0
    for value, unit in re.findall(r"(\d+)(ms|s|m|h|d)", text):
        total += int(value) * {"ms": 0, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    return total


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    assert RULE_TESTS, "no promtool unit tests found"
    result = run_promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_conventions() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for alert in alerts():
        name = alert["alert"]
        assert re.fullmatch(r"Gpu(?:[A-Z][a-z0-9]*)+", name), f"{name}: CamelCase with the Gpu prefix"
        assert alert["labels"]["severity"] in SEVERITIES, name
        ann = alert["annotations"]
        assert set(ann) >= {"summary", "description", "runbook_url"}, name
        assert "\n" not in ann["summary"].strip(), f"{name}: summary is one line"
        assert ann["runbook_url"] == RUNBOOK_BASE + name.lower(), name
        assert "DCGM_FI_DEV_XID_ERRORS" not in alert["expr"], f"{name}: never alert on the last-XID gauge"


def _rule_tests() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in RULE_TESTS:
        data = yaml.safe_load(path.read_text())
        assert [Path(path.parent, f).resolve() for f in data["rule_files"]] == [RULES.resolve()], path
        out.extend(data["tests"])
    return out


def test_every_alert_fires_after_for_and_is_silent_just_before() -> None:
    """Each alert: a firing case and a silent case one evaluation earlier, in the same test group."""
    for alert in alerts():
        name = alert["alert"]
        pairs = []
        for group in _rule_tests():
            cases = [c for c in group.get("alert_rule_test", []) if c["alertname"] == name]
            firing = [_duration_s(c["eval_time"]) for c in cases if c["exp_alerts"]]
            silent = [_duration_s(c["eval_time"]) for c in cases if not c["exp_alerts"]]
            pairs += [(s, f) for f in firing for s in silent if 0 < f - s <= 60]
            for case in cases:
                for exp in case["exp_alerts"]:
                    assert exp["exp_labels"]["severity"] == alert["labels"]["severity"], name
        assert pairs, f"{name}: needs a silent evaluation one minute before a firing one"
        for_s = _duration_s(alert.get("for", "0s"))
        assert any(f >= for_s for _, f in pairs), f"{name}: firing case must come after for: {alert.get('for')}"


def test_neighbouring_codes_are_covered() -> None:
    """The tests feed the neighbours the rules must ignore (application XIDs, SBE, other clock bits, ...)."""
    text = "\n".join(p.read_text() for p in RULE_TESTS)
    for needle in [
        'class="application"',
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "values: '40x25'",
        'pod=""',
        'gpu_i_id="4"',
        "DCGM_FI_DEV_RETIRED_DBE",
    ]:
        assert needle in text, needle


def _runbook_sections() -> dict[str, str]:
    text = RUNBOOKS.read_text()
    parts = re.split(r"^## (\S+)\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_runbook_section_per_alert_and_vice_versa() -> None:
    sections = _runbook_sections()
    names = {a["alert"] for a in alerts()}
    assert set(sections) == names, f"missing: {names - set(sections)}, orphaned: {set(sections) - names}"
    for name, body in sections.items():
        for part in ("**Meaning.**", "**Impact.**", "**Diagnosis.**", "**Action.**"):
            assert part in body, f"runbook {name}: {part}"
    # intra-document links point at existing anchors
    for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", RUNBOOKS.read_text()):
        assert anchor in {n.lower() for n in names}, anchor


def test_generated_outputs_are_up_to_date() -> None:
    assert generator().main(["--check"]) == 0, "run: python deploy/generate.py"


def test_plain_prometheus_rule_matches_source() -> None:
    (doc,) = load_docs((PLAIN / "prometheusrule.yaml").read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["spec"]["groups"] == load_rules()["groups"]


def test_chart_prometheus_rule_matches_source_with_default_thresholds() -> None:
    (doc,) = by_kind(render_chart({"prometheusRule": {"enabled": True}}), "PrometheusRule")
    assert doc["spec"]["groups"] == load_rules()["groups"]


def test_chart_threshold_defaults_match_generator() -> None:
    chart_values = yaml.safe_load((RULES.parents[1] / "helm/gpu-health-exporter/values.yaml").read_text())
    assert chart_values["prometheusRule"]["thresholds"] == generator().THRESHOLD_DEFAULTS


def test_chart_thresholds_change_the_rules(tmp_path: Path) -> None:
    values = {
        "prometheusRule": {
            "enabled": True,
            "thresholds": {
                "collectionStaleSeconds": 300,
                "deviceDataStaleSeconds": 90,
                "gpuCountLookback": "12h",
                "xidWindow": "30m",
                "slowdownFor": "15m",
                "pcieReplaysPerMinute": 20,
                "allocatedIdleFor": "4h",
            },
        }
    }
    (doc,) = by_kind(render_chart(values), "PrometheusRule")
    rules = {r["alert"]: r for g in doc["spec"]["groups"] for r in g["rules"]}
    assert rules["GpuExporterCollectionStale"]["expr"].endswith("> 300")
    assert rules["GpuDataStale"]["expr"].endswith("> 90")
    assert "[12h:5m]" in rules["GpuCountDropped"]["expr"]
    assert "[30m]" in rules["GpuXidFenceError"]["expr"] and "offset 30m" in rules["GpuXidWarnError"]["expr"]
    assert rules["GpuThermalSlowdown"]["for"] == "15m" and rules["GpuPowerBrakeSlowdown"]["for"] == "15m"
    assert rules["GpuPcieReplayRateHigh"]["expr"].endswith("> 20")
    assert "threshold 20" in rules["GpuPcieReplayRateHigh"]["annotations"]["description"]
    assert rules["GpuAllocatedButIdle"]["for"] == "4h"
    path = tmp_path / "rendered.rules.yml"
    path.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("job", ["gpu-health-exporter", "gpu-exporter"])
def test_chart_rules_follow_the_job_label(job: str) -> None:
    values: dict[str, Any] = {"prometheusRule": {"enabled": True}}
    if job != "gpu-health-exporter":
        values["nameOverride"] = job
    rendered = render_chart(values | {"serviceMonitor": {"enabled": True}})
    (rule,) = by_kind(rendered, "PrometheusRule")
    down = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "GpuExporterDown")
    assert down["expr"] == f'up{{job="{job}"}} == 0'
    (svc,) = by_kind(rendered, "Service")
    (monitor,) = by_kind(rendered, "ServiceMonitor")
    assert svc["metadata"]["labels"][monitor["spec"]["jobLabel"]] == job


def test_chart_disabled_alerts() -> None:
    (doc,) = by_kind(
        render_chart({"prometheusRule": {"enabled": True, "disabledAlerts": ["GpuAllocatedButIdle"]}}), "PrometheusRule"
    )
    names = {r["alert"] for g in doc["spec"]["groups"] for r in g["rules"] or []}
    assert names == {a["alert"] for a in alerts()} - {"GpuAllocatedButIdle"}


_DCGM_NAMES = r"\b(UUID|Hostname|modelName|GPU_I_ID|GPU_I_PROFILE)\b"
_OWN_NAMES = r"\b(uuid|hostname|model_name|gpu_i_id|gpu_i_profile)\b"


def test_label_scheme_per_family() -> None:
    """gpuhealth_* carry snake_case device labels, DCGM_* dcgm-exporter's: an alert reads only the
    scheme of the families it uses, and joins between the two match on shared labels only."""
    for alert in alerts():
        name, expr = alert["alert"], alert["expr"]
        own, dcgm = "gpuhealth_" in expr, "DCGM_" in expr
        text = expr + " " + " ".join(alert["annotations"].values())
        if own and not dcgm:
            assert not re.search(_DCGM_NAMES, text), name
        elif dcgm and not own:
            assert not re.search(_OWN_NAMES, text), name
        else:
            for clause in re.findall(r"\b(?:on|ignoring)\s*\(([^)]*)\)", expr):
                assert set(re.split(r"\s*,\s*", clause.strip())) <= {
                    "job",
                    "instance",
                    "gpu",
                    "pci_bus_id",
                    "device",
                }, f"{name}: on ({clause})"
            assert not re.search(_DCGM_NAMES, " ".join(alert["annotations"].values())), name


# RenderContext.device_labels, which Family declarations name as "device labels" (exporter/family.py).
_DEVICE_LABELS = {"gpu", "uuid", "pci_bus_id", "device", "model_name", "gpu_i_profile", "gpu_i_id", "hostname"}


def _declared_labels() -> dict[str, set[str]]:
    """Every own family the daemon or the proxy serves (exporter.ownmetrics), with its labels."""
    from exporter.family import DEVICE_LABELS
    from exporter.ownmetrics import OWN_METRICS, PROXY_METRICS

    out: dict[str, set[str]] = {}
    for family in (*OWN_METRICS, *PROXY_METRICS):
        labels: set[str] = set()
        for part in (p.strip() for p in family.labels_doc.split(",")):
            labels |= _DEVICE_LABELS if part == DEVICE_LABELS else ({part} if part else set())
        out[family.name] = labels
    return out


def test_rules_only_use_own_families_the_code_declares() -> None:
    """A rule on a misspelt or renamed gpuhealth_* family would never fire: each one the rules read is
    declared with an `exporter.family.Family`, and each label a rule selects or joins on is one the
    family has (or a target label)."""
    declared = _declared_labels()
    known_target = {"job", "instance"}
    for alert in alerts():
        name, expr = alert["alert"], alert["expr"]
        for family, selector in re.findall(r"\b(gpuhealth_\w+)(?:\{([^}]*)\})?", expr):
            assert family in declared, f"{name}: {family} is not an own family (exporter/ownmetrics.py)"
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                assert label in declared[family] | known_target, f"{name}: {family} has no label {label!r}"
        families = set(re.findall(r"\b(gpuhealth_\w+)", expr))
        if families and not re.search(r"\bDCGM_", expr):
            have = set.union(*(declared[f] for f in families)) | known_target
            for clause in re.findall(r"\b(?:on|by|without|ignoring)\s*\(([^)]*)\)", expr):
                for label in filter(None, (s.strip() for s in clause.split(","))):
                    assert label in have, f"{name}: joins or groups on {label!r}, which no family it reads has"
