"""The workload attribution dashboard."""

from __future__ import annotations

from typing import Any

from deploy.gen.dashboards.panels import Board, query_var, target
from deploy.gen.dashboards.shared import NO, N


def workload() -> dict[str, Any]:
    b = Board(
        "workload-attribution",
        "GPU use by namespace and pod: GPU-hours, energy, utilisation and memory, "
        "from gpuhealth_gpu_allocation_info and pod-labelled DCGM series.",
    )
    b.variables.append(
        query_var(
            "namespace",
            "Namespace",
            'label_values(gpuhealth_gpu_allocation_info{hostname=~"$node", pod!=""}, namespace)',
        )
    )
    f = f'{N}, namespace=~"$namespace", pod!=""'
    fo = f'{NO}, namespace=~"$namespace", pod!=""'
    b.row("Totals over the selected range")
    b.add(
        "bargauge",
        "GPU-hours by namespace",
        [
            target(
                f"sum by (namespace) (sum_over_time((count by (namespace, pod, hostname, uuid, gpu_i_id) "
                f"(gpuhealth_gpu_allocation_info{{{fo}}}))[$__range:$__interval])) * $__interval_ms / 3600000",
                "{{namespace}}",
                instant=True,
                fmt="time_series",
            )
        ],
        "h",
        description="Each allocated device (GPU, MIG instance or time-shared replica) counts one device-hour per "
        "hour held, sampled at the panel's query interval (so short ranges count too).",
        options={
            "orientation": "horizontal",
            "displayMode": "gradient",
            "reduceOptions": {"calcs": ["lastNotNull"], "values": False},
        },
    )
    b.add(
        "bargauge",
        "Energy by namespace",
        [
            target(
                f"sum by (namespace) (increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{f}}}[$__range]) "
                f"/ on (Hostname, UUID) group_left count by (Hostname, UUID) "
                f"(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{f}}})) / 1000",
                "{{namespace}}",
                instant=True,
                fmt="time_series",
            )
        ],
        "joule",
        description="Energy counter is mJ; a shared GPU's energy is split evenly between the pods on it.",
        options={
            "orientation": "horizontal",
            "displayMode": "gradient",
            "reduceOptions": {"calcs": ["lastNotNull"], "values": False},
        },
    )
    b.row("Over time")
    b.add(
        "timeseries",
        "Allocated devices by namespace",
        [target(f"count by (namespace) (gpuhealth_gpu_allocation_info{{{fo}}})", "{{namespace}}")],
        "none",
    )
    b.add(
        "timeseries",
        "GPU utilisation by namespace",
        [target(f"avg by (namespace) (DCGM_FI_DEV_GPU_UTIL{{{f}}})", "{{namespace}}")],
        "percent",
        defaults={"min": 0, "max": 100},
    )
    b.add(
        "timeseries",
        "GPU utilisation by pod",
        [
            target(
                f"max by (namespace, pod, Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL{{{f}}})",
                "{{namespace}}/{{pod}} on {{Hostname}} GPU {{gpu}}",
            )
        ],
        "percent",
        w=24,
        defaults={"min": 0, "max": 100},
    )
    b.add(
        "timeseries",
        "Framebuffer used by pod",
        [
            target(
                f"max by (namespace, pod, Hostname, gpu, GPU_I_ID) (DCGM_FI_DEV_FB_USED{{{f}}}) * 1048576",
                "{{namespace}}/{{pod}} on {{Hostname}} GPU {{gpu}}/{{GPU_I_ID}}",
            )
        ],
        "bytes",
        w=24,
    )
    shared_gpu_row(b)
    b.add(
        "table",
        "Current allocations",
        [target(f"gpuhealth_gpu_allocation_info{{{fo}}}", instant=True)],
        "none",
        w=24,
        transformations=[
            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}
        ],
    )
    return b.render()


def shared_gpu_row(b: Board) -> None:
    """Who uses how much of a shared (time-sliced, MPS) GPU: per pod and container, from the processes
    NVML lists (--process-metrics, docs/gpu-share.md). Empty while that flag is off."""
    b.row("Shared GPU")
    mem = f'gpuhealth_pod_gpu_memory_used_bytes{{{NO}, namespace=~"$namespace", pod!=""}}'
    every = f"gpuhealth_pod_gpu_memory_used_bytes{{{NO}}}"  # pods, host processes and unplaced ones
    by_pod = "namespace, pod, hostname, gpu, uuid, gpu_i_id"
    legend = "{{namespace}}/{{pod}} on {{hostname}} GPU {{gpu}}"
    b.add(
        "timeseries",
        "GPU memory by pod (per device)",
        [target(f"sum by ({by_pod}) ({mem})", legend)],
        "bytes",
        description="The memory NVML accounts to each pod's processes on each GPU or MIG instance.",
    )
    b.add(
        "timeseries",
        "GPU memory share by pod (per device)",
        [
            target(
                f"sum by ({by_pod}) ({mem}) / on (hostname, uuid, gpu_i_id) group_left "
                f"sum by (hostname, uuid, gpu_i_id) ({every})",
                legend,
            )
        ],
        "percentunit",
        description="Each pod's part of the memory the device's processes use (host processes included in the whole).",
        defaults={"min": 0, "max": 1},
    )
    b.add(
        "timeseries",
        "SM share by pod (per device)",
        [
            target(
                f'sum by ({by_pod}) (gpuhealth_pod_sm_utilization_ratio{{{NO}, namespace=~"$namespace", pod!=""}})',
                legend,
            )
        ],
        "percentunit",
        description="The sum of each pod's processes' SM utilisation samples on the device (NVML per-process "
        "utilisation; not sampled on MIG instances).",
        defaults={"min": 0, "max": 1},
    )
    b.add(
        "timeseries",
        "Processes per device, in a pod or not",
        [
            target(
                f"sum by (hostname, gpu, gpu_i_id, in_pod) (gpuhealth_gpu_processes{{{NO}}})",
                "{{hostname}} GPU {{gpu}} in pod: {{in_pod}}",
            )
        ],
        "none",
        description="in_pod false: host processes, or processes whose /proc entry could not be read.",
    )
