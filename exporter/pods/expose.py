"""The pods part's own metric families and their text (PodMapper.render_metrics)."""

from __future__ import annotations

from collections.abc import Mapping

from exporter.family import DEVICE_LABELS, Family
from exporter.labels import RenderContext, format_labels
from exporter.pods.attribution import Attribution

REFRESH_SUCCESS = Family(
    "gpuhealth_pod_mapping_refresh_success", "gauge", "1 if the last kubelet PodResources List worked.", "", "pods"
)
MAPPING_AGE = Family("gpuhealth_pod_mapping_age_seconds", "gauge", "Age of the pod mapping in use.", "", "pods")
KUBELET_REQUESTS = Family(
    "gpuhealth_kubelet_requests_total",
    "counter",
    "Kubelet PodResources calls by method and gRPC code.",
    "method, code",
    "pods",
)
ALLOCATION_INFO = Family(
    "gpuhealth_gpu_allocation_info",
    "gauge",
    "1 per device and container it is allocated to; free devices have empty pod, namespace, container.",
    f"{DEVICE_LABELS}, resource, namespace, pod, container",
    "pods",
)
KUBELET_DEVICE_UNHEALTHY = Family(
    "gpuhealth_kubelet_device_unhealthy",
    "gauge",
    "1 if NVML sees the device but the kubelet's allocatable omits it (the kubelet deems it unhealthy).",
    f"{DEVICE_LABELS}, resource",
    "pods",
)
FAMILIES = (REFRESH_SUCCESS, MAPPING_AGE, KUBELET_REQUESTS, ALLOCATION_INFO, KUBELET_DEVICE_UNHEALTHY)


def render_pods(
    ctx: RenderContext,
    *,
    refresh_ok: bool,
    request_counts: Mapping[tuple[str, str], int],
    attribution: Attribution | None,
    age_s: float,
) -> str:
    """The pods part. Without an attribution (no List has worked yet) only the first three headers,
    the refresh gauge and the request counters; `age_s` is then ignored."""
    out = [REFRESH_SUCCESS.header, REFRESH_SUCCESS.scalar(1 if refresh_ok else 0), MAPPING_AGE.header]
    if attribution is not None:
        out.append(MAPPING_AGE.scalar(f"{age_s:.3f}"))
    out.append(KUBELET_REQUESTS.header)
    for (method, code), n in sorted(request_counts.items()):
        out.append(KUBELET_REQUESTS.sample(format_labels((("method", method), ("code", code))), n))
    if attribution is None:
        return "".join(out)
    out.append(ALLOCATION_INFO.header)
    for uuid, resource, ns, pod, container in attribution.allocation:
        dev = ctx.device_labels(uuid)
        if dev:
            extra = format_labels((("resource", resource), ("namespace", ns), ("pod", pod), ("container", container)))
            out.append(ALLOCATION_INFO.sample(f"{dev},{extra}", 1))
    out.append(KUBELET_DEVICE_UNHEALTHY.header)
    for uuid, resource, value in attribution.kubelet_health:
        dev = ctx.device_labels(uuid)
        if dev:
            out.append(KUBELET_DEVICE_UNHEALTHY.sample(f"{dev},{format_labels([('resource', resource)])}", value))
    return "".join(out)
