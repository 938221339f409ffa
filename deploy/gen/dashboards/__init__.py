"""The Grafana dashboards, one module each (`panels`: the builder; `shared`: label schemes and queries)."""

from __future__ import annotations

from typing import Any

from deploy.gen.dashboards.fleet import fleet
from deploy.gen.dashboards.health import health
from deploy.gen.dashboards.node_detail import node_detail
from deploy.gen.dashboards.workload import workload


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        "fleet-overview": fleet(),
        "node-gpu-detail": node_detail(),
        "workload-attribution": workload(),
        "health-errors": health(),
    }
