"""The health and errors dashboard."""

from __future__ import annotations

from typing import Any

from deploy.gen.dashboards.panels import DS, Board, target
from deploy.gen.dashboards.shared import (
    DEV,
    DEV_OWN,
    GPU_LEGEND,
    GPU_LEGEND_OWN,
    HOST_JOIN,
    MIG_LEGEND_OWN,
    NO,
    N,
    state_mappings,
    state_thresholds,
    xid_new,
)


def health() -> dict[str, Any]:
    b = Board(
        "health-errors",
        "GPU health: verdict timeline, XIDs (annotations and table), ECC, row remapping, "
        "retired pages, PCIe replays, throttling reasons and exporter errors.",
    )
    b.annotations.append(
        {
            "name": "XID errors",
            "datasource": DS,
            "enable": True,
            "hide": False,
            "iconColor": "red",
            "expr": f"sum by (hostname, gpu, xid, class) ({xid_new('$__rate_interval')})",
            "step": "1m",
            "titleFormat": "XID {{xid}} ({{class}})",
            "textFormat": "{{hostname}} GPU {{gpu}}",
            "tagKeys": "hostname,gpu,xid,class",
            "useValueForTime": False,
        }
    )
    b.row("Health")
    b.add(
        "state-timeline",
        "Health state",
        [
            target(f'max by ({DEV_OWN}) (gpuhealth_health_state{{{NO}, gpu_i_id=""}})', GPU_LEGEND_OWN),
            target(
                f'max by ({DEV_OWN}, gpu_i_id, gpu_i_profile) (gpuhealth_health_state{{{NO}, gpu_i_id!=""}})',
                MIG_LEGEND_OWN,
            ),
        ],
        "none",
        w=24,
        h=10,
        defaults={"mappings": state_mappings(), "color": {"mode": "thresholds"}, "thresholds": state_thresholds()},
    )
    b.add(
        "table",
        "Active health reasons",
        [target(f"gpuhealth_health_reason{{{NO}}} == 1", instant=True)],
        "none",
        w=24,
        transformations=[
            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}
        ],
    )
    b.row("XID errors")
    b.add(
        "table",
        "XIDs in range",
        [target(f"sum by (hostname, gpu, uuid, xid, class) ({xid_new('$__range')})", instant=True)],
        "none",
        description="XIDs that occurred in the selected range, including the first of a code on a GPU (which "
        "creates the counter series, so increase() alone misses it).",
    )
    b.add(
        "table",
        "XID totals (persisted)",
        [target(f"max by (hostname, gpu, uuid, xid, class) (gpuhealth_xid_errors_total{{{NO}}})", instant=True)],
        "none",
    )
    b.add(
        "timeseries",
        "XIDs",
        [
            target(
                f"sum by (hostname, gpu, xid) ({xid_new('$__rate_interval')})", "{{hostname}} GPU {{gpu}} XID {{xid}}"
            )
        ],
        "none",
    )
    b.add(
        "table",
        "Last XID (dcgm-exporter gauge)",
        [target(f"max by (Hostname, gpu, err_code, err_msg) (DCGM_FI_DEV_XID_ERRORS{{{N}}}) > 0", instant=True)],
        "none",
    )
    b.add(
        "state-timeline",
        "XID monitoring",
        [target(f"min by ({DEV_OWN}) (gpuhealth_xid_monitoring_up{{{NO}}})", GPU_LEGEND_OWN)],
        "bool",
        w=24,
        description="Whether the GPU's NVML XID events are registered and the event wait loop runs. While a GPU is "
        "not monitored its XIDs are missed (alert GpuXidMonitoringDown).",
        defaults={
            "mappings": [
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "not monitored", "color": "red", "index": 0},
                        "1": {"text": "monitored", "color": "green", "index": 1},
                    },
                }
            ],
            "color": {"mode": "thresholds"},
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
            },
        },
    )
    b.row("Memory errors")
    b.add(
        "timeseries",
        "ECC errors (volatile)",
        [
            target(
                f"max by ({DEV}) (increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{N}}}[$__rate_interval]))",
                GPU_LEGEND + " DBE",
            ),
            target(
                f"max by ({DEV}) (increase(DCGM_FI_DEV_ECC_SBE_VOL_TOTAL{{{N}}}[$__rate_interval]))",
                GPU_LEGEND + " SBE",
            ),
        ],
        "none",
    )
    b.add(
        "timeseries",
        "Remapped rows",
        [
            target(f"max by ({DEV}) (DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS{{{N}}})", GPU_LEGEND + " uncorrectable"),
            target(f"max by ({DEV}) (DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS{{{N}}})", GPU_LEGEND + " correctable"),
        ],
        "none",
    )
    b.add(
        "table",
        "Row remap / page retirement flags",
        [
            target(f"max by ({DEV}) (DCGM_FI_DEV_ROW_REMAP_PENDING{{{N}}}) > 0", instant=True),
            target(f"max by ({DEV}) (DCGM_FI_DEV_ROW_REMAP_FAILURE{{{N}}}) > 0", instant=True),
            target(f"max by ({DEV}) (DCGM_FI_DEV_RETIRED_PENDING{{{N}}}) > 0", instant=True),
        ],
        "none",
        w=24,
        transformations=[{"id": "merge", "options": {}}],
    )
    b.row("PCIe and throttling")
    b.add(
        "timeseries",
        "PCIe replays",
        [target(f"max by ({DEV}) (rate(DCGM_FI_DEV_PCIE_REPLAY_COUNTER{{{N}}}[$__rate_interval]))", GPU_LEGEND)],
        "cps",
    )
    b.add(
        "timeseries",
        "Time throttled (thermal / power violations)",
        [
            target(
                f"max by ({DEV}) (rate(DCGM_FI_DEV_THERMAL_VIOLATION{{{N}}}[$__rate_interval])) / 1e9",
                GPU_LEGEND + " thermal",
            ),
            target(
                f"max by ({DEV}) (rate(DCGM_FI_DEV_POWER_VIOLATION{{{N}}}[$__rate_interval])) / 1e9",
                GPU_LEGEND + " power",
            ),
        ],
        "percentunit",
        description="Violation counters are in nanoseconds (as DCGM's): rate / 1e9 = fraction of time.",
    )
    reasons = [("SW power cap", 4), ("HW slowdown", 8), ("SW thermal", 32), ("HW thermal", 64), ("HW power brake", 128)]
    b.add(
        "state-timeline",
        "Clock event reasons",
        [
            target(
                f"max by ({DEV}) (floor(DCGM_FI_DEV_CLOCKS_EVENT_REASONS{{{N}}} / {bit}) % 2)", f"{GPU_LEGEND} {name}"
            )
            for name, bit in reasons
        ],
        "bool",
        w=24,
        h=10,
        description="Bits of DCGM_FI_DEV_CLOCKS_EVENT_REASONS (PromQL has no bitwise operators: floor(x / bit) % 2).",
        defaults={
            "color": {"mode": "thresholds"},
            "thresholds": {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}, {"color": "orange", "value": 1}],
            },
        },
    )
    b.row("Exporter")
    b.add("timeseries", "Devices collected", [target(f"gpuhealth_device_up{{{NO}}}", GPU_LEGEND_OWN)], "bool")
    b.add(
        "timeseries",
        "NVML errors",
        [
            target(
                f"sum by (hostname, field, error) (rate(gpuhealth_nvml_errors_total[$__rate_interval]) {HOST_JOIN})",
                "{{hostname}} {{field}} {{error}}",
            )
        ],
        "cps",
    )
    b.add(
        "table",
        "Kubelet and exporter disagree",
        [target(f"gpuhealth_kubelet_device_unhealthy{{{NO}}} == 1", instant=True)],
        "none",
        w=24,
        transformations=[
            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}}}
        ],
    )
    return b.render()
