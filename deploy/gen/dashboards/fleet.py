"""The fleet overview dashboard."""

from __future__ import annotations

from typing import Any

from deploy.gen.dashboards.panels import Board, target
from deploy.gen.dashboards.shared import DEV, NO, N


def fleet() -> dict[str, Any]:
    b = Board(
        "fleet-overview",
        "GPU fleet: GPUs reporting, allocation, utilisation, idle allocations, power "
        "and health across nodes (gpu-health-exporter, dcgm-exporter compatible names).",
    )
    b.row("Capacity")
    stat = {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "area",
        "textMode": "auto",
    }
    b.add(
        "stat",
        "GPUs reporting",
        [target(f"count(max by ({DEV}) (DCGM_FI_DEV_GPU_TEMP{{{N}}}))")],
        "none",
        w=4,
        h=5,
        options=stat,
        description="Distinct GPUs (UUID) with a temperature reading.",
    )
    b.add("stat", "Exporters up", [target('sum(up{job="gpu-health-exporter"})')], "none", w=4, h=5, options=stat)
    b.add(
        "stat",
        "Unhealthy GPUs",
        [target(f"count(gpuhealth_health_state{{{NO}}} == 2) or vector(0)")],
        "none",
        w=4,
        h=5,
        options=stat,
        defaults={
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}],
            },
            "color": {"mode": "thresholds"},
        },
    )
    b.add(
        "stat",
        "Degraded GPUs",
        [target(f"count(gpuhealth_health_state{{{NO}}} == 1) or vector(0)")],
        "none",
        w=4,
        h=5,
        options=stat,
        defaults={
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}, {"color": "yellow", "value": 1}],
            },
            "color": {"mode": "thresholds"},
        },
    )
    b.add(
        "stat",
        "Average GPU utilisation",
        [target(f"avg(max by ({DEV}) (DCGM_FI_DEV_GPU_UTIL{{{N}}}))")],
        "percent",
        w=4,
        h=5,
        options=stat,
    )
    b.add(
        "stat",
        "Total power",
        [target(f"sum(max by ({DEV}) (DCGM_FI_DEV_POWER_USAGE{{{N}}}))")],
        "watt",
        w=4,
        h=5,
        options=stat,
    )
    b.row("Allocation")
    alloc_devices = f"count by (hostname, uuid, gpu_i_id) (gpuhealth_gpu_allocation_info{{{NO}}})"
    b.add(
        "timeseries",
        "Allocatable vs allocated devices",
        [
            target(
                f"count({alloc_devices}) - (count(gpuhealth_kubelet_device_unhealthy{{{NO}}} == 1) or vector(0))",
                "allocatable",
            ),
            target(
                f'count(count by (hostname, uuid, gpu_i_id) (gpuhealth_gpu_allocation_info{{{NO}, pod!=""}}))',
                "allocated",
            ),
        ],
        "none",
        description="Devices (GPUs or MIG instances) the kubelet can allocate, and those held by pods.",
    )
    b.add(
        "timeseries",
        "GPU utilisation by node",
        [target(f"avg by (Hostname) (max by ({DEV}) (DCGM_FI_DEV_GPU_UTIL{{{N}}}))", "{{Hostname}}")],
        "percent",
        defaults={"min": 0, "max": 100},
    )
    b.add(
        "table",
        "Allocated but idle (0 % over 1h)",
        [
            target(
                f"max by (job, instance, hostname, gpu, uuid, gpu_i_id, namespace, pod, container) "
                f'(gpuhealth_gpu_allocation_info{{{NO}, pod!=""}}) and on (job, instance, gpu) '
                f"(max by (job, instance, gpu) (max_over_time(DCGM_FI_DEV_GPU_UTIL{{{N}}}[1h])) == 0)",
                instant=True,
            )
        ],
        "none",
        w=24,
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
    )
    b.row("Power and health")
    b.add(
        "timeseries",
        "Power by node",
        [target(f"sum by (Hostname) (max by ({DEV}) (DCGM_FI_DEV_POWER_USAGE{{{N}}}))", "{{Hostname}}")],
        "watt",
    )
    b.add(
        "timeseries",
        "Unhealthy, degraded and unknown GPUs",
        [
            target(f"count(gpuhealth_health_state{{{NO}}} == 2) or vector(0)", "unhealthy"),
            target(f"count(gpuhealth_health_state{{{NO}}} == 1) or vector(0)", "degraded"),
            target(f"count(gpuhealth_health_state{{{NO}}} == 3) or vector(0)", "unknown"),
        ],
        "none",
        description="Unknown: the exporter cannot judge the GPU (NVML unusable for the monitor); "
        "not a GPU fault, and it does not change what is allocatable.",
    )
    b.add(
        "table",
        "Unhealthy GPUs and reasons",
        [
            target(
                f"gpuhealth_health_reason{{{NO}}} and on (job, instance, uuid, gpu_i_id) "
                f"(gpuhealth_health_state{{{NO}}} == 2)",
                instant=True,
            )
        ],
        "none",
        w=24,
        transformations=[
            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}
        ],
    )
    return b.render()
