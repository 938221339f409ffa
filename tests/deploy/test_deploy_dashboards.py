"""Grafana dashboards: structure, conventions, links, and PromQL syntax of every query (promtool)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.deploy.deploy_common import (
    COMPAT_QUERIES,
    DASHBOARD_NAMES,
    check_promql,
    load_dashboard,
    substitute_grafana_vars,
)

UNIT_FREE_TYPES = {"row"}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return [p for p in out if p["type"] not in UNIT_FREE_TYPES]


def targets(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for p in panels(board) for t in p["targets"]]


def test_structure() -> None:
    uids = set()
    for name in DASHBOARD_NAMES:
        board = load_dashboard(name)
        assert board["schemaVersion"] >= 39, name
        assert board["uid"] not in uids and len(board["uid"]) <= 40, name
        uids.add(board["uid"])
        assert "gpu-health-exporter" in board["tags"], name
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["node"]["definition"] == "label_values(DCGM_FI_DEV_GPU_TEMP, Hostname)"
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in panels(board):
            where = f"{name}: {panel['title']}"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: unit"
            assert panel["targets"], f"{where}: targets"
            for target in panel["targets"]:
                assert target["expr"].strip(), where
                assert target["datasource"]["uid"] == "${datasource}", where
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, where


def test_no_overlapping_panels() -> None:
    for name in DASHBOARD_NAMES:
        cells: set[tuple[int, int]] = set()
        for panel in load_dashboard(name)["panels"]:
            g = panel["gridPos"]
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & area, f"{name}: {panel['title']} overlaps"
            cells |= area


def test_links_between_the_four() -> None:
    uids = {name: load_dashboard(name)["uid"] for name in DASHBOARD_NAMES}
    for name in DASHBOARD_NAMES:
        urls = " ".join(link.get("url", "") for link in load_dashboard(name)["links"])
        for other, uid in uids.items():
            if other != name:
                assert f"/d/{uid}/" in urls, f"{name} does not link to {other}"


def test_legends_unique_across_nodes_and_mig_aware() -> None:
    mig = 0
    for name in DASHBOARD_NAMES:
        for target in targets(load_dashboard(name)):
            legend = target.get("legendFormat", "")
            own = "gpuhealth_" in target["expr"] and "DCGM_" not in target["expr"]
            # own families carry snake_case labels, DCGM families dcgm-exporter's
            host, gi = ("{{hostname}}", "{{gpu_i_id}}") if own else ("{{Hostname}}", "{{GPU_I_ID}}")
            if "{{gpu}}" in legend:
                assert host in legend, f"{name}: {legend}"
            if gi in legend:
                mig += 1
                assert f"GPU {{{{gpu}}}}/{gi}" in legend, legend
    assert mig >= 3


def test_label_scheme_per_family() -> None:
    """gpuhealth_* selectors use snake_case device labels; DCGM selectors dcgm-exporter's names."""
    dcgm_only = re.compile(r"\b(UUID|Hostname|modelName|GPU_I_ID|GPU_I_PROFILE)\b")
    own_only = re.compile(r"\b(uuid|hostname|model_name|gpu_i_id|gpu_i_profile)\b")
    for name, expr in _all_queries().items():
        for metric, selector in re.findall(r"\b((?:gpuhealth|DCGM)_\w+)\{([^}]*)\}", expr):
            bad = dcgm_only if metric.startswith("gpuhealth_") else own_only
            assert not bad.search(selector), f"{name}: {metric}{{{selector}}}"


def test_device_values_are_deduplicated() -> None:
    """Shared GPUs repeat DCGM series per pod: per-GPU panels aggregate with max by (..., UUID)."""
    for name in ("node-gpu-detail", "health-errors", "fleet-overview"):
        for target in targets(load_dashboard(name)):
            expr = target["expr"]
            if re.search(r"DCGM_FI_DEV_\w+", expr) and "{{gpu}}" in target.get("legendFormat", ""):
                assert re.search(r"max by \([^)]*UUID", expr), f"{name}: {expr}"


def test_rates_use_grafana_windows() -> None:
    for name in DASHBOARD_NAMES:
        for target in targets(load_dashboard(name)):
            for window in re.findall(r"(?:rate|increase)\([^\[]*\[([^\]]+)\]", target["expr"]):
                assert window in ("$__rate_interval", "$__range"), f"{name}: {target['expr']}"


def test_required_content() -> None:
    text = {name: str(load_dashboard(name)) for name in DASHBOARD_NAMES}
    fleet, health, workload = text["fleet-overview"], text["health-errors"], text["workload-attribution"]
    for needle in [
        "gpuhealth_gpu_allocation_info",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_POWER_USAGE",
        "gpuhealth_health_state",
        "max_over_time(DCGM_FI_DEV_GPU_UTIL",
    ]:
        assert needle in fleet, needle
    for needle in [
        "state-timeline",
        "gpuhealth_xid_errors_total",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "DCGM_FI_DEV_ROW_REMAP_PENDING",
        "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
    ]:
        assert needle in health, needle
    xid_annotations = [
        a
        for a in load_dashboard("health-errors")["annotations"]["list"]
        if "gpuhealth_xid_errors_total" in a.get("expr", "")
    ]
    assert xid_annotations and "increase(" in xid_annotations[0]["expr"]
    assert "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" in workload and ") / 1000" in workload  # mJ -> J
    assert "GPU-hours" in workload and "namespace" in workload


def _all_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for name in DASHBOARD_NAMES:
        board = load_dashboard(name)
        for panel in panels(board):
            for target in panel["targets"]:
                queries[f"{name}/{panel['title']}/{target['refId']}"] = target["expr"]
        for ann in board["annotations"]["list"]:
            if ann.get("expr"):
                queries[f"{name}/annotation/{ann['name']}"] = ann["expr"]
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                match = re.fullmatch(r"label_values\((.*), *\w+\)", var["definition"])
                assert match, var["definition"]
                queries[f"{name}/variable/{var['name']}"] = match.group(1)
    return queries


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    queries = {k: substitute_grafana_vars(v) for k, v in _all_queries().items()}
    assert len(queries) > 60
    for query in queries.values():
        assert "$" not in query, query
    check_promql(queries, tmp_path)


def test_grafana_12239_compat_queries(tmp_path: Path) -> None:
    lines = [line for line in COMPAT_QUERIES.read_text().splitlines() if line and not line.startswith("#")]
    queries = dict(line.split("\t", 1) for line in lines)
    for title in [
        "GPU Temperature",
        "GPU Avg. Temp",
        "GPU Power Usage",
        "GPU Power Total",
        "GPU SM Clocks",
        "GPU Utilization",
        "Tensor Core Utilization",
        "GPU Framebuffer Mem Used",
    ]:
        assert title in queries, title
    check_promql(queries, tmp_path)
