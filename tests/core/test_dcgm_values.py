"""dcgm-exporter's exposition rules in the renderer: value text, the `device` label, label fields, MIG layouts.

Each rule is what a user diffing our /metrics against dcgm-exporter's (or running its MIG dashboards)
would notice; the facts come from dcgm-exporter's gpu_collector.go (toString, toMetric), its
render_metrics.go template and DCGM's devicemonitoring (`-d f` watches a MIG GPU as its instances).
"""

from __future__ import annotations

import dataclasses

from exporter.collector import Collector
from exporter.counters import parse_counters
from exporter.devices import parse_device_selector
from exporter.labels import MigLayout, RenderContext
from exporter.model import EVENT_XID, DeviceEvent
from exporter.render import Renderer, format_double, format_int64
from exporter.xid import XidTracker
from tests.core.fakebackend import ScriptedBackend

CSV = (
    "DCGM_FI_DEV_POWER_USAGE, gauge, Power draw (in W).\n"
    "DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature (in C).\n"
    "DCGM_FI_DEV_FB_USED, gauge, Framebuffer memory used (in MiB).\n"
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE, gauge, Ratio of time the graphics engine is active.\n"
    "DCGM_FI_DEV_XID_ERRORS, gauge, Value of the last XID error encountered.\n"
)


def render(backend: ScriptedBackend, csv: str = CSV, layout: MigLayout = "dcgm", devices: str = "f") -> str:
    xids = XidTracker(300)
    xids.on_events([DeviceEvent("GPU-00000001", EVENT_XID, xid=79)])
    fields = parse_counters(csv, "t.csv")
    collector = Collector(backend, fields, parse_device_selector(devices), 1.0, 0.5)
    renderer = Renderer(RenderContext("Hostname", "node1"), xids, "scripted", process_registry=None, mig_layout=layout)
    return renderer.render(collector.run_once()).plain.decode()


def series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_value_text_is_dcgm_exporters() -> None:
    """Doubles print with six decimals (Go's %f), int64 fields as whole numbers (%d)."""
    assert format_double(52.636) == "52.636000"
    assert format_double(0.0) == "0.000000"
    assert format_int64(41.0) == "41"
    b = ScriptedBackend(gpus=1)
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_POWER_USAGE": 52.636, "DCGM_FI_DEV_GPU_TEMP": 43.0}}
    text = render(b)
    assert series(text, "DCGM_FI_DEV_POWER_USAGE")[0].endswith("} 52.636000")
    assert series(text, "DCGM_FI_DEV_GPU_TEMP")[0].endswith("} 43")


def test_nan_is_left_out() -> None:
    b = ScriptedBackend(gpus=1)
    b.values = {"GPU-00000000": {"DCGM_FI_PROF_GR_ENGINE_ACTIVE": float("nan"), "DCGM_FI_DEV_GPU_TEMP": 40.0}}
    text = render(b)
    assert "NaN" not in text
    assert series(text, "DCGM_FI_PROF_GR_ENGINE_ACTIVE") == []


def test_device_label_is_the_nvml_index_not_the_minor() -> None:
    b = ScriptedBackend(gpus=2)
    inv = b.inventory
    # GPU 1 has minor number 7: /dev/nvidia7. dcgm-exporter still says device="nvidia1".
    b.inventory = dataclasses.replace(inv, gpus=(inv.gpus[0], dataclasses.replace(inv.gpus[1], minor=7)))
    b.values = {"GPU-00000001": {"DCGM_FI_DEV_GPU_TEMP": 40.0}}
    (line,) = series(render(b), "DCGM_FI_DEV_GPU_TEMP")
    assert 'gpu="1",UUID="GPU-00000001"' in line and 'device="nvidia1"' in line


def test_label_fields_become_labels_sorted_by_name() -> None:
    b = ScriptedBackend(gpus=1)
    inv = b.inventory
    gpu = dataclasses.replace(inv.gpus[0], attributes=(("serial", "1650923001234"), ("vbios", "96.00.99.00.01")))
    b.inventory = dataclasses.replace(inv, gpus=(gpu,), nvml_version="12.570.1")
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 40.0}}
    csv = (
        "DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature (in C).\n"
        "DCGM_FI_NVML_VERSION, label, NVML Version\n"
        "DCGM_FI_DEV_VBIOS_VERSION, label, VBIOS version of the device\n"
        "DCGM_FI_DRIVER_VERSION, label, Driver Version\n"
        "DCGM_FI_DEV_SERIAL, label, Device Serial Number\n"
        "DCGM_FI_DEV_BRAND, label, Device Brand\n"  # not given by this GPU: no label, no empty string
    )
    (line,) = series(render(b, csv), "DCGM_FI_DEV_GPU_TEMP")
    assert line == (
        'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-00000000",pci_bus_id="00000000:18:00.0",device="nvidia0",'
        'modelName="NVIDIA H100 80GB HBM3",Hostname="node1",DCGM_FI_DEV_SERIAL="1650923001234",'
        'DCGM_FI_DEV_VBIOS_VERSION="96.00.99.00.01",DCGM_FI_DRIVER_VERSION="570.1",'
        'DCGM_FI_NVML_VERSION="12.570.1"} 40'
    )


def mig_backend() -> ScriptedBackend:
    b = ScriptedBackend(gpus=2, mig_on=1)  # GPU 1 has instances 1 (3g.40gb) and 5 (1g.10gb)
    b.values = {
        "GPU-00000000": {"DCGM_FI_DEV_POWER_USAGE": 100.0, "DCGM_FI_DEV_FB_USED": 1000.0},
        "GPU-00000001": {"DCGM_FI_DEV_POWER_USAGE": 250.5, "DCGM_FI_DEV_GPU_TEMP": 50.0},
        "MIG-1-a": {"DCGM_FI_DEV_FB_USED": 3000.0, "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.5},
        "MIG-1-b": {"DCGM_FI_DEV_FB_USED": 500.0, "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.25},
    }
    return b


def test_dcgm_layout_shows_a_mig_gpu_only_as_its_instances() -> None:
    text = render(mig_backend())
    power = series(text, "DCGM_FI_DEV_POWER_USAGE")
    # GPU 0 (no MIG) as itself; GPU 1 once per GPU instance with the parent's GPU-wide value.
    assert [('GPU_I_ID="1"' in s, 'GPU_I_ID="5"' in s, s.rsplit(" ", 1)[1]) for s in power] == [
        (False, False, "100.000000"),
        (True, False, "250.500000"),
        (False, True, "250.500000"),
    ]
    assert all('UUID="GPU-00000001"' in s for s in power[1:])  # dcgm-exporter's UUID is the parent's
    assert 'GPU_I_PROFILE="3g.40gb",GPU_I_ID="1"' in power[1]
    # Per-instance fields keep their per-instance values; the GPU itself has no series of its own.
    fb = series(text, "DCGM_FI_DEV_FB_USED")
    assert [s.rsplit(" ", 1)[1] for s in fb] == ["1000", "3000", "500"]
    assert not [s for s in text.splitlines() if 'UUID="GPU-00000001"' in s and "GPU_I_ID" not in s]
    # The XID gauge too: GPU 1's last XID on each of its instances.
    xid = series(text, "DCGM_FI_DEV_XID_ERRORS")
    assert [s.rsplit(" ", 1)[1] for s in xid if 'UUID="GPU-00000001"' in s] == ["79", "79"]


def test_parent_layout_keeps_gpu_wide_series_on_the_gpu() -> None:
    text = render(mig_backend(), layout="parent")
    power = series(text, "DCGM_FI_DEV_POWER_USAGE")
    assert len(power) == 2 and not any("GPU_I_ID" in s for s in power)
    fb = series(text, "DCGM_FI_DEV_FB_USED")
    assert sum("GPU_I_ID" in s for s in fb) == 2
    assert len(series(text, "DCGM_FI_DEV_XID_ERRORS")) == 2  # one per GPU, not per instance


def test_one_series_per_gpu_instance_with_two_compute_instances() -> None:
    b = mig_backend()
    inv = b.inventory
    gpu1 = inv.gpus[1]
    second_ci = dataclasses.replace(gpu1.migs[0], uuid="MIG-1-a2", compute_instance_id=1, slot=2)
    b.inventory = dataclasses.replace(inv, gpus=(inv.gpus[0], dataclasses.replace(gpu1, migs=(*gpu1.migs, second_ci))))
    b.values["MIG-1-a2"] = {"DCGM_FI_DEV_FB_USED": 3000.0}
    layouts: tuple[MigLayout, ...] = ("dcgm", "parent")
    for layout in layouts:
        fb = series(render(b, layout=layout), "DCGM_FI_DEV_FB_USED")
        assert sum('GPU_I_ID="1"' in s for s in fb) == 1, layout


class PodOnGpu1:
    def labels_for(self, gpu_uuid: str, gpu_instance_id: int | None) -> tuple[tuple[tuple[str, str], ...], ...]:
        if gpu_uuid == "GPU-00000001":
            return ((("container", "c"), ("namespace", "ml"), ("pod", "train")),)
        return ()


def test_xid_gauge_sorts_err_labels_with_the_pod_labels() -> None:
    """dcgm-exporter's template writes err_code/err_msg and the pod labels as one sorted map."""
    b = ScriptedBackend(gpus=2)
    xids = XidTracker(300)
    xids.on_events([DeviceEvent("GPU-00000001", EVENT_XID, xid=79)])
    collector = Collector(b, parse_counters(CSV, "t.csv"), parse_device_selector("f"), 1.0, 0.5)
    renderer = Renderer(RenderContext("Hostname", "node1"), xids, "scripted", pods=PodOnGpu1(), process_registry=None)
    text = renderer.render(collector.run_once()).plain.decode()
    held = [line for line in series(text, "DCGM_FI_DEV_XID_ERRORS") if 'gpu="1"' in line]
    assert held == [
        'DCGM_FI_DEV_XID_ERRORS{gpu="1",UUID="GPU-00000001",pci_bus_id="00000000:19:00.0",device="nvidia1",'
        'modelName="NVIDIA H100 80GB HBM3",Hostname="node1",container="c",err_code="79",'
        'err_msg="GPU has fallen off the bus",namespace="ml",pod="train"} 79'
    ]


def test_instances_only_selection_still_gets_the_gpu_wide_values() -> None:
    """`-d i`: dcgm-exporter watches only the GPU instances, each with every field (GPU-wide ones from
    its GPU). The GPU is read for them but has no DCGM series of its own, under either layout."""
    layouts: tuple[MigLayout, ...] = ("dcgm", "parent")
    for layout in layouts:
        text = render(mig_backend(), layout=layout, devices="i")
        power = series(text, "DCGM_FI_DEV_POWER_USAGE")
        assert [s.rsplit(" ", 1)[1] for s in power] == ["250.500000", "250.500000"], layout
        assert all("GPU_I_ID" in s for s in power), layout
        assert not [s for s in text.splitlines() if s.startswith("DCGM_") and 'UUID="GPU-00000000"' in s], layout
        assert [s.rsplit(" ", 1)[1] for s in series(text, "DCGM_FI_DEV_FB_USED")] == ["3000", "500"], layout
