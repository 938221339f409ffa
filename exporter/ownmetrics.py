"""The project's own metric families, collected from the modules that declare and emit them.

Each family is declared once, as an `exporter.family.Family` next to the code that writes it;
this module holds no texts. It feeds docs/metrics.md (`exporter/docgen.py`) and
tests/core/test_ownmetrics.py, which checks that every family the daemon serves is listed here
with the same HELP and TYPE, and that every family listed here is served.

Only docgen and tests import this module: it imports the pods and device plugin modules, which
import grpc; the daemon imports those lazily, only when `-k` or `--device-plugin` is on.
"""

from __future__ import annotations

from exporter import events, render, xid
from exporter.deviceplugin import manager
from exporter.family import Family
from exporter.health import blindspots, expose
from exporter.pods import expose as mapper  # the pods part's families (mapper.FAMILIES below)
from exporter.pods import gpushare
from exporter.proxy import metrics as proxy_metrics
from exporter.scheduling import drataints, faults, nodetaint, podevents

# In the order of the exposition: the renderer's parts, then the contributors.
OWN_METRICS: tuple[Family, ...] = (
    *xid.FAMILIES,
    *render.FAMILIES,
    *expose.FAMILIES,
    *blindspots.FAMILIES,
    *events.FAMILIES,
    *mapper.FAMILIES,
    *gpushare.FAMILIES,
    *manager.FAMILIES,
    *drataints.FAMILIES,
    *nodetaint.FAMILIES,
    *podevents.FAMILIES,
    *faults.FAMILIES,
    render.RENDER_SUCCESS,
)

# Served by `gpu-health-exporter device-plugin-proxy` on its own /metrics, never by the daemon
# (with manager.VERDICT_SOURCE, listed above); tests/proxy checks the proxy serves them as declared.
PROXY_METRICS: tuple[Family, ...] = proxy_metrics.FAMILIES

BY_NAME: dict[str, Family] = {f.name: f for f in (*OWN_METRICS, *PROXY_METRICS)}
if len(BY_NAME) != len(OWN_METRICS) + len(PROXY_METRICS):  # pragma: no cover - a declaration error, caught at import
    raise ValueError("an own metric family is declared twice")
