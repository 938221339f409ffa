"""The proxy's families (part device_plugin_proxy), served on its own /metrics."""

from __future__ import annotations

from exporter.deviceplugin.manager import VERDICT_SOURCE, VERDICT_SOURCES
from exporter.family import Family
from exporter.labels import escape_label_value
from exporter.proxy.proxy import ResourceStatus
from exporter.proxy.relay import FORWARDED_RPCS

PART = "device_plugin_proxy"
UPSTREAMS = Family(
    "gpuhealth_device_plugin_proxy_upstreams",
    "gauge",
    "Upstream device plugins registered with the proxy and streaming their devices",
    "",
    PART,
)
REGISTERED = Family(
    "gpuhealth_device_plugin_proxy_registered",
    "gauge",
    "1 while the proxy is registered with the kubelet for this resource",
    "resource",
    PART,
)
DEVICES = Family(
    "gpuhealth_device_plugin_proxy_devices",
    "gauge",
    "Devices forwarded to the kubelet, by health",
    "resource, health",
    PART,
)
FENCED = Family(
    "gpuhealth_device_plugin_proxy_fenced",
    "gauge",
    "Devices the upstream calls Healthy that the proxy forwards Unhealthy because of a verdict",
    "resource",
    PART,
)
FORWARDED = Family(
    "gpuhealth_device_plugin_proxy_forwarded_total",
    "counter",
    "Kubelet calls forwarded to the upstream plugin, by RPC and result",
    "resource, rpc, result",
    PART,
)
FAMILIES = (UPSTREAMS, REGISTERED, DEVICES, FENCED, FORWARDED)


def render(resources: list[ResourceStatus], source: str) -> str:
    """The proxy's exposition text; `source` is where its verdicts come from (VerdictStream.source)."""
    reg, devs, fenced, fwd = [REGISTERED.header], [DEVICES.header], [FENCED.header], [FORWARDED.header]
    for r in resources:
        res = f'resource="{escape_label_value(r.name)}"'
        reg.append(REGISTERED.sample(res, int(r.registered)))
        devs.append(DEVICES.sample(f'{res},health="healthy"', r.counts.healthy))
        devs.append(DEVICES.sample(f'{res},health="unhealthy"', r.counts.unhealthy))
        fenced.append(FENCED.sample(res, r.counts.fenced))
        for rpc in FORWARDED_RPCS:
            for result in ("ok", "error"):
                fwd.append(FORWARDED.sample(f'{res},rpc="{rpc}",result="{result}"', r.forwarded[(rpc, result)]))
    upstreams = UPSTREAMS.header + UPSTREAMS.scalar(sum(1 for r in resources if r.streaming))
    sources = [VERDICT_SOURCE.header] + [
        VERDICT_SOURCE.sample(f'source="{s}"', int(s == source)) for s in VERDICT_SOURCES
    ]
    return upstreams + "".join(reg + devs + fenced + fwd + sources)
