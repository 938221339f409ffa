"""The node and GPU detail dashboard."""

from __future__ import annotations

from typing import Any

from deploy.gen.dashboards.panels import Board, query_var, target
from deploy.gen.dashboards.shared import (
    DEV,
    DEV_OWN,
    GPU_LEGEND,
    GPU_LEGEND_OWN,
    HOST_JOIN,
    MIG_LEGEND,
    MIG_LEGEND_OWN,
    NO,
    N,
    state_mappings,
    state_thresholds,
)


def node_detail() -> dict[str, Any]:
    b = Board(
        "node-gpu-detail",
        "One node's GPUs in detail: thermals, power, clocks, utilisation, memory "
        "(MIG-aware), PCIe/NVLink, health and the exporter itself.",
    )
    b.variables.append(query_var("gpu", "GPU", 'label_values(DCGM_FI_DEV_GPU_TEMP{Hostname=~"$node"}, gpu)'))
    f = f'{N}, gpu=~"$gpu"'
    fo = f'{NO}, gpu=~"$gpu"'
    b.row("Thermals and power")
    b.add(
        "timeseries",
        "GPU temperature",
        [target(f"max by ({DEV}) (DCGM_FI_DEV_GPU_TEMP{{{f}}})", GPU_LEGEND)],
        "celsius",
    )
    b.add(
        "timeseries",
        "Memory temperature",
        [target(f"max by ({DEV}) (DCGM_FI_DEV_MEMORY_TEMP{{{f}}})", GPU_LEGEND)],
        "celsius",
    )
    b.add(
        "timeseries",
        "Power draw and limit",
        [
            target(f"max by ({DEV}) (DCGM_FI_DEV_POWER_USAGE{{{f}}})", GPU_LEGEND),
            target(f"max by ({DEV}) (DCGM_FI_DEV_POWER_MGMT_LIMIT{{{f}}})", GPU_LEGEND + " limit"),
        ],
        "watt",
    )
    b.add(
        "timeseries",
        "Energy (average power from the energy counter)",
        [
            target(
                f"max by ({DEV}) (rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{f}}}[$__rate_interval])) / 1000",
                GPU_LEGEND,
            )
        ],
        "watt",
        description="DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION is in mJ: rate / 1000 = W.",
    )
    b.row("Utilisation and clocks")
    b.add(
        "timeseries",
        "GPU utilisation",
        [target(f"max by ({DEV}) (DCGM_FI_DEV_GPU_UTIL{{{f}}})", GPU_LEGEND)],
        "percent",
        defaults={"min": 0, "max": 100},
    )
    b.add(
        "timeseries",
        "Memory copy utilisation",
        [target(f"max by ({DEV}) (DCGM_FI_DEV_MEM_COPY_UTIL{{{f}}})", GPU_LEGEND)],
        "percent",
        defaults={"min": 0, "max": 100},
    )
    b.add(
        "timeseries",
        "SM clock",
        [target(f"max by ({DEV}) (DCGM_FI_DEV_SM_CLOCK{{{f}}}) * 1000000", GPU_LEGEND)],
        "hertz",
    )
    b.add(
        "timeseries",
        "Memory clock",
        [target(f"max by ({DEV}) (DCGM_FI_DEV_MEM_CLOCK{{{f}}}) * 1000000", GPU_LEGEND)],
        "hertz",
    )
    b.row("Memory (MIG-aware)")
    b.add(
        "timeseries",
        "Framebuffer used",
        [
            # The GPU's own series (parent layout, no MIG), else the sum of its instances (dcgm layout).
            target(
                f'(max by ({DEV}) (DCGM_FI_DEV_FB_USED{{{f}, GPU_I_ID=""}}) '
                f'or sum by ({DEV}) (DCGM_FI_DEV_FB_USED{{{f}, GPU_I_ID!=""}})) * 1048576',
                GPU_LEGEND,
            ),
            target(
                f'max by ({DEV}, GPU_I_ID, GPU_I_PROFILE) (DCGM_FI_DEV_FB_USED{{{f}, GPU_I_ID!=""}}) * 1048576',
                MIG_LEGEND,
            ),
        ],
        "bytes",
        description="Whole GPUs and MIG instances; FB values are MiB in the exposition.",
    )
    b.add(
        "timeseries",
        "Framebuffer free",
        [
            # The GPU's own series (parent layout, no MIG), else the sum of its instances (dcgm layout).
            target(
                f'(max by ({DEV}) (DCGM_FI_DEV_FB_FREE{{{f}, GPU_I_ID=""}}) '
                f'or sum by ({DEV}) (DCGM_FI_DEV_FB_FREE{{{f}, GPU_I_ID!=""}})) * 1048576',
                GPU_LEGEND,
            ),
            target(
                f'max by ({DEV}, GPU_I_ID, GPU_I_PROFILE) (DCGM_FI_DEV_FB_FREE{{{f}, GPU_I_ID!=""}}) * 1048576',
                MIG_LEGEND,
            ),
        ],
        "bytes",
    )
    b.row("Interconnect")
    b.add(
        "timeseries",
        "PCIe throughput",
        [
            target(f"max by ({DEV}) (DCGM_FI_PROF_PCIE_TX_BYTES{{{f}}})", GPU_LEGEND + " tx"),
            target(f"max by ({DEV}) (DCGM_FI_PROF_PCIE_RX_BYTES{{{f}}})", GPU_LEGEND + " rx"),
        ],
        "Bps",
    )
    b.add(
        "timeseries",
        "NVLink bandwidth",
        [target(f"max by ({DEV}) (DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL{{{f}}}) * 1024000", GPU_LEGEND)],
        "Bps",
        description="DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL is DCGM's throughput (tx + rx, all links): KiB/s / 1000. "
        "Despite its counter type it is a rate: never rate() it.",
    )
    b.row("Health and pods")
    b.add(
        "state-timeline",
        "Health state",
        [
            target(f'max by ({DEV_OWN}) (gpuhealth_health_state{{{fo}, gpu_i_id=""}})', GPU_LEGEND_OWN),
            target(
                f'max by ({DEV_OWN}, gpu_i_id, gpu_i_profile) (gpuhealth_health_state{{{fo}, gpu_i_id!=""}})',
                MIG_LEGEND_OWN,
            ),
        ],
        "none",
        defaults={"mappings": state_mappings(), "color": {"mode": "thresholds"}, "thresholds": state_thresholds()},
    )
    b.add(
        "table",
        "Pods on these GPUs",
        [target(f'gpuhealth_gpu_allocation_info{{{fo}, pod!=""}}', instant=True)],
        "none",
        transformations=[
            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}
        ],
    )
    b.row("Exporter")
    b.add("timeseries", "Device data age", [target(f"gpuhealth_device_data_age_seconds{{{fo}}}", GPU_LEGEND_OWN)], "s")
    b.add(
        "timeseries",
        "Collection duration",
        [target(f"gpuhealth_collection_duration_seconds {HOST_JOIN}", "{{hostname}}")],
        "s",
    )
    return b.render()
