"""The project's own metric families: one table for docs and for a test that
every family the exporter serves is documented."""

from __future__ import annotations

from typing import NamedTuple

from exporter.render import DEVICE_UP_HELP


class OwnMetric(NamedTuple):
    name: str
    type: str
    labels: str
    help: str
    part: str


# gpu, uuid, pci_bus_id, device, model_name, [gpu_i_profile, gpu_i_id], hostname
_DEV = "device labels"

OWN_METRICS: tuple[OwnMetric, ...] = (
    OwnMetric("gpuhealth_build_info", "gauge", "version, backend, driver_version, python_version", "Always 1.", "core"),
    OwnMetric("gpuhealth_gpus", "gauge", "", "GPUs found by the last discovery.", "core"),
    OwnMetric(
        "gpuhealth_device_up", "gauge", _DEV, DEVICE_UP_HELP, "core"
    ),
    OwnMetric(
        "gpuhealth_device_data_age_seconds",
        "gauge",
        _DEV,
        "Age of the values served for the device; grows while its NVML reads hang.",
        "core",
    ),
    OwnMetric("gpuhealth_collection_duration_seconds", "gauge", "", "Duration of the last collection cycle.", "core"),
    OwnMetric("gpuhealth_last_collection_timestamp_seconds", "gauge", "", "Unix time the last cycle ended.", "core"),
    OwnMetric("gpuhealth_collections_total", "counter", "", "Collection cycles run.", "core"),
    OwnMetric(
        "gpuhealth_nvml_errors_total",
        "counter",
        "field, error",
        "NVML errors by field (* for whole-device failures) and NVML error name.",
        "core",
    ),
    OwnMetric(
        "DCGM_EXP_XID_ERRORS_COUNT",
        "gauge",
        "DCGM device labels, window_size_in_ms, xid",
        "XIDs per code within --xid-count-window-size (dcgm-exporter compatible).",
        "core",
    ),
    OwnMetric(
        "gpuhealth_render_success",
        "gauge",
        "part",
        "1 if this part of the exposition (dcgm, xid, core, health, pods, device_plugin) rendered in the last "
        "cycle; 0 if it failed and its last good output is served.",
        "core",
    ),
    OwnMetric(
        "gpuhealth_health_state",
        "gauge",
        _DEV,
        "Health verdict: 0 healthy, 1 degraded, 2 unhealthy (fenced), 3 unknown (the monitor cannot judge the "
        "device; allocation unchanged).",
        "health",
    ),
    OwnMetric(
        "gpuhealth_health_signal_missing",
        "gauge",
        f"{_DEV}, field",
        "1 while a health field that GPUs of this model reported before is not supported on this GPU: that "
        "health check is blind on it. Only served while 1.",
        "health",
    ),
    OwnMetric(
        "gpuhealth_xid_monitoring_up",
        "gauge",
        _DEV,
        "1 when the GPU's XID events are registered and the event wait loop runs; 0 when XIDs on it would be "
        "missed.",
        "core",
    ),
    OwnMetric(
        "gpuhealth_health_reason",
        "gauge",
        f"{_DEV}, signal, code, class, action",
        "1 for each active reason behind a non-healthy state.",
        "health",
    ),
    OwnMetric(
        "gpuhealth_xid_errors_total",
        "counter",
        f"{_DEV}, xid, class",
        "XIDs by code and policy class; persisted, never loses counts across restarts.",
        "health",
    ),
    OwnMetric(
        "gpuhealth_health_state_file_errors_total",
        "counter",
        "",
        "Corrupt or unreadable state files moved aside.",
        "health",
    ),
    OwnMetric(
        "gpuhealth_health_state_write_failures_total",
        "counter",
        "",
        "Failed writes of the health state file; the newest verdicts are retried until they are on disk.",
        "health",
    ),
    OwnMetric("gpuhealth_health_clears_total", "counter", "", "Explicit health clears.", "health"),
    OwnMetric("gpuhealth_pod_mapping_refresh_success", "gauge", "", "1 if the last kubelet List worked.", "pods"),
    OwnMetric("gpuhealth_pod_mapping_age_seconds", "gauge", "", "Age of the pod mapping in use.", "pods"),
    OwnMetric("gpuhealth_kubelet_requests_total", "counter", "method, code", "PodResources calls by result.", "pods"),
    OwnMetric(
        "gpuhealth_gpu_allocation_info",
        "gauge",
        f"{_DEV}, resource, namespace, pod, container",
        "1 per allocation; free devices have empty pod, namespace and container.",
        "pods",
    ),
    OwnMetric(
        "gpuhealth_kubelet_device_unhealthy",
        "gauge",
        f"{_DEV}, resource",
        "1 if NVML sees the device but the kubelet's allocatable list omits it.",
        "pods",
    ),
    OwnMetric(
        "gpuhealth_device_plugin_registered",
        "gauge",
        "resource",
        "1 while registered with the kubelet.",
        "device plugin",
    ),
    OwnMetric(
        "gpuhealth_device_plugin_devices",
        "gauge",
        "resource, health",
        "Devices advertised, by health.",
        "device plugin",
    ),
    OwnMetric(
        "gpuhealth_device_plugin_allocations_total", "counter", "resource, result", "Allocate calls.", "device plugin"
    ),
)
