"""The dashboard builder: `Board` lays panels out on Grafana's 24-column grid; `target` and the
template variables every board uses."""

from __future__ import annotations

from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
TAGS = ["gpu", "gpu-health-exporter"]
UIDS = {
    "fleet-overview": "gpuhe-fleet-overview",
    "node-gpu-detail": "gpuhe-node-gpu-detail",
    "workload-attribution": "gpuhe-workload-attribution",
    "health-errors": "gpuhe-health-errors",
}
TITLES = {
    "fleet-overview": "GPU / Fleet overview",
    "node-gpu-detail": "GPU / Node and GPU detail",
    "workload-attribution": "GPU / Workload attribution",
    "health-errors": "GPU / Health and errors",
}


def target(
    expr: str, legend: str = "", *, instant: bool = False, fmt: str = "time_series", ref: str = "A"
) -> dict[str, Any]:
    t: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref}
    if instant:
        t.update({"instant": True, "range": False, "format": "table" if fmt == "time_series" else fmt})
    else:
        t.update({"range": True, "instant": False, "format": fmt})
    return t


class Board:
    def __init__(self, key: str, description: str) -> None:
        self.key = key
        self.description = description
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.variables: list[dict[str, Any]] = [datasource_var(), node_var()]
        self.annotations: list[dict[str, Any]] = [
            {
                "builtIn": 1,
                "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                "enable": True,
                "hide": True,
                "iconColor": "rgba(0, 211, 255, 1)",
                "name": "Annotations & Alerts",
                "type": "dashboard",
            }
        ]

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "id": len(self.panels) + 1,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def add(
        self,
        ptype: str,
        title: str,
        targets: list[dict[str, Any]],
        unit: str,
        *,
        w: int = 12,
        h: int = 8,
        description: str = "",
        options: dict[str, Any] | None = None,
        defaults: dict[str, Any] | None = None,
        transformations: list[dict[str, Any]] | None = None,
    ) -> None:
        if self.x + w > 24:
            self._newline()
        for i, t in enumerate(targets):
            t["refId"] = chr(ord("A") + i)
        field_defaults: dict[str, Any] = {"unit": unit}
        field_defaults.update(defaults or {})
        panel: dict[str, Any] = {
            "type": ptype,
            "title": title,
            "description": description,
            "datasource": DS,
            "id": len(self.panels) + 1,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": targets,
            "fieldConfig": {"defaults": field_defaults, "overrides": []},
            "options": options or {},
        }
        if ptype == "timeseries":
            panel["options"] = {
                "legend": {
                    "displayMode": "table",
                    "placement": "right",
                    "calcs": ["lastNotNull", "max"],
                    "showLegend": True,
                },
                "tooltip": {"mode": "multi", "sort": "desc"},
            } | (options or {})
        if transformations:
            panel["transformations"] = transformations
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def render(self) -> dict[str, Any]:
        links: list[dict[str, Any]] = [
            {
                "title": "GPU dashboards",
                "type": "dashboards",
                "tags": ["gpu-health-exporter"],
                "asDropdown": True,
                "includeVars": False,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "url": "",
                "tooltip": "",
            }
        ]
        for key, uid in UIDS.items():
            if key == self.key:
                continue
            links.append(
                {
                    "title": TITLES[key],
                    "type": "link",
                    "icon": "dashboard",
                    "asDropdown": False,
                    "tags": [],
                    "url": f"/d/{uid}/{key}?${{datasource:queryparam}}&${{node:queryparam}}",
                    "keepTime": True,
                    "includeVars": False,
                    "targetBlank": False,
                    "tooltip": "",
                }
            )
        return {
            "annotations": {"list": self.annotations},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": links,
            "panels": self.panels,
            "refresh": "1m",
            "schemaVersion": 39,
            "tags": TAGS,
            "templating": {"list": self.variables},
            "time": {"from": "now-6h", "to": "now"},
            "timepicker": {},
            "timezone": "browser",
            "title": TITLES[self.key],
            "uid": UIDS[self.key],
            "version": 1,
            "weekStart": "",
        }


def datasource_var() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "regex": "",
        "options": [],
        "includeAll": False,
        "multi": False,
        "skipUrlSync": False,
    }


def query_var(name: str, label: str, query: str, *, multi: bool = True) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1},
        "definition": query,
        "current": {},
        "hide": 0,
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "includeAll": True,
        "allValue": ".*",
        "multi": multi,
        "options": [],
        "skipUrlSync": False,
    }


def node_var() -> dict[str, Any]:
    return query_var("node", "Node (Hostname)", "label_values(DCGM_FI_DEV_GPU_TEMP, Hostname)")
