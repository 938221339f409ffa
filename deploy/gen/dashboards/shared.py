"""What several dashboards share: the two label schemes, legends, the XID query and the health-state colours."""

from __future__ import annotations

from typing import Any

# Two label schemes (exporter/labels.py): DCGM families keep dcgm-exporter's names (UUID, Hostname,
# modelName, GPU_I_PROFILE, GPU_I_ID); own gpuhealth_* families use snake_case (uuid, hostname,
# model_name, gpu_i_profile, gpu_i_id). `gpu` and `pci_bus_id` are shared. $node holds Hostname values,
# which are the same strings as hostname.
N = 'Hostname=~"$node"'  # DCGM families
NO = 'hostname=~"$node"'  # own families
DEV = "Hostname, gpu, UUID"
DEV_OWN = "hostname, gpu, uuid"
GPU_LEGEND = "{{Hostname}} GPU {{gpu}}"
MIG_LEGEND = "{{Hostname}} GPU {{gpu}}/{{GPU_I_ID}} ({{GPU_I_PROFILE}})"
GPU_LEGEND_OWN = "{{hostname}} GPU {{gpu}}"
MIG_LEGEND_OWN = "{{hostname}} GPU {{gpu}}/{{gpu_i_id}} ({{gpu_i_profile}})"
# Join for the exporter's own per-process families, which carry no host label.
HOST_JOIN = f"* on (job, instance) group_left (hostname) max by (job, instance, hostname) (gpuhealth_device_up{{{NO}}})"


def xid_new(window: str) -> str:
    """XIDs counted within `window`: the counter's increase, or the whole value of a series that did not
    exist `window` ago (the first XID of a code on a GPU creates the series; increase() cannot see it).
    Matched on the device, not the target, so an exporter restart (new instance) is not a new XID."""
    xid = f"gpuhealth_xid_errors_total{{{NO}}}"
    return (
        f"(increase({xid}[{window}]) > 0) or ({xid} > 0 unless on (hostname, uuid, gpu_i_id, xid) "
        f"{xid} offset {window})"
    )


def state_mappings() -> list[dict[str, Any]]:
    """gpuhealth_health_state values. 3 (unknown: the monitor cannot judge the GPU, NVML unusable) is not
    a GPU fault, so it gets a neutral colour."""
    return [
        {
            "type": "value",
            "options": {
                "0": {"text": "healthy", "color": "green", "index": 0},
                "1": {"text": "degraded", "color": "yellow", "index": 1},
                "2": {"text": "unhealthy", "color": "red", "index": 2},
                "3": {"text": "unknown", "color": "blue", "index": 3},
            },
        }
    ]


def state_thresholds() -> dict[str, Any]:
    """Colours of gpuhealth_health_state where no mapping applies; the same as state_mappings()."""
    return {
        "mode": "absolute",
        "steps": [
            {"color": "green", "value": None},
            {"color": "yellow", "value": 1},
            {"color": "red", "value": 2},
            {"color": "blue", "value": 3},
        ],
    }
