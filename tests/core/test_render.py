from __future__ import annotations

import re

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from exporter.collector import Collector
from exporter.counters import default_counters, parse_counters
from exporter.devices import parse_device_selector
from exporter.labels import RenderContext
from exporter.logs import Reminder
from exporter.model import EVENT_XID, DeviceEvent
from exporter.render import Renderer
from exporter.xid import XidTracker
from tests.core.fakebackend import ScriptedBackend

FIELDS = parse_counters(
    "DCGM_FI_DEV_GPU_TEMP, gauge, GPU temperature (in C).\n"
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION, counter, Total energy consumption since boot (in mJ).\n"
    "DCGM_FI_DEV_FB_USED, gauge, Framebuffer memory used (in MiB).\n"
    "DCGM_FI_DEV_XID_ERRORS, gauge, Value of the last XID error encountered.\n"
    "DCGM_FI_DRIVER_VERSION, label, Driver Version\n",
    "t.csv",
)


class Pods:
    def __init__(self) -> None:
        self.map: dict[tuple[str, int | None], tuple[tuple[tuple[str, str], ...], ...]] = {}

    def labels_for(self, gpu_uuid: str, gi: int | None) -> tuple[tuple[tuple[str, str], ...], ...]:
        return self.map.get((gpu_uuid, gi), ())


def render(backend: ScriptedBackend, pods: Pods | None = None, host: str | None = "Hostname") -> str:
    xids = XidTracker(300)  # dcgm-exporter's err_msg wording (exporter/dcgmxid.py)
    xids.on_events([DeviceEvent("GPU-00000001", EVENT_XID, xid=79)])
    c = Collector(backend, FIELDS, parse_device_selector("f"), 1.0, 0.5)
    r = Renderer(RenderContext(host, 'node"1'), xids, "scripted", pods=pods, process_registry=None)
    expo = r.render(c.run_once())
    return expo.plain.decode()


def backend() -> ScriptedBackend:
    b = ScriptedBackend(gpus=2)
    b.values = {
        "GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 40, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 123456789.0},
        "GPU-00000001": {"DCGM_FI_DEV_GPU_TEMP": 41.5},
    }
    return b


def test_dcgm_label_order_and_names() -> None:
    text = render(backend())
    assert (
        'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-00000000",pci_bus_id="00000000:18:00.0",device="nvidia0",'
        'modelName="NVIDIA H100 80GB HBM3",Hostname="node\\"1",DCGM_FI_DRIVER_VERSION="570.1"} 40\n'
    ) in text
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in text
    assert "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_total" not in text
    assert re.search(r'DCGM_FI_DEV_GPU_TEMP\{gpu="1",.*\} 41\n', text)  # an int64 field: whole, as %d


def test_families_without_values_are_left_out() -> None:
    assert "DCGM_FI_DEV_FB_USED" not in render(backend())


def test_xid_gauge_has_err_labels_and_zero_before_first() -> None:
    text = render(backend())
    assert re.search(r'DCGM_FI_DEV_XID_ERRORS\{gpu="0",.*,err_code="0",err_msg="No Error"\} 0\n', text)
    assert re.search(
        r'DCGM_FI_DEV_XID_ERRORS\{gpu="1",.*,err_code="79",err_msg="GPU has fallen off the bus"\} 79\n', text
    )
    # The window count is exporter/dcgmexp.py's, served only when the counters file lists it.
    assert "DCGM_EXP_XID_ERRORS_COUNT" not in text


def test_hostname_label_switches() -> None:
    assert 'hostname="node\\"1"' in render(backend(), host="hostname")
    assert "ostname" not in render(backend(), host=None).split("# HELP gpuhealth_build_info")[0]


def test_pod_labels_follow_device_labels_and_shared_gpus_repeat() -> None:
    pods = Pods()
    shared = (
        (("container", "a"), ("namespace", "ns"), ("pod", "p1"), ("vgpu", "0")),
        (("container", "b"), ("namespace", "ns"), ("pod", "p2"), ("vgpu", "1")),
    )
    pods.map[("GPU-00000000", None)] = shared
    text = render(backend(), pods)
    temp0 = [line for line in text.splitlines() if line.startswith('DCGM_FI_DEV_GPU_TEMP{gpu="0"')]
    assert len(temp0) == 2
    assert temp0[0].endswith('DCGM_FI_DRIVER_VERSION="570.1",container="a",namespace="ns",pod="p1",vgpu="0"} 40')
    temp1 = [line for line in text.splitlines() if line.startswith('DCGM_FI_DEV_GPU_TEMP{gpu="1"')]
    assert "pod=" not in temp1[0]


def test_mig_instances_carry_profile_and_instance_labels() -> None:
    b = ScriptedBackend(gpus=1, mig_on=0)
    b.values = {"MIG-0-b": {"DCGM_FI_DEV_FB_USED": 1024}, "GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 30}}
    text = render(b)
    assert 'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-00000000",' in text
    assert 'modelName="NVIDIA H100 80GB HBM3",GPU_I_PROFILE="1g.10gb",GPU_I_ID="5",Hostname=' in text


def test_whole_exposition_parses_and_own_families_are_prometheus_style() -> None:
    b = backend()
    b.lost.add("GPU-00000001")
    text = render(b)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["gpuhealth_device_up"].samples[1].value == 0
    assert families["gpuhealth_build_info"].samples[0].labels["backend"] == "scripted"
    # the lost GPU's DCGM series disappear instead of going stale forever
    assert not [s for s in families["DCGM_FI_DEV_GPU_TEMP"].samples if s.labels["gpu"] == "1"]


def test_default_field_set_renders_faster_than_generate_latest_would_need() -> None:
    # Sanity only (speed is measured in benchmarks/): the default set renders and parses.
    b = backend()
    c = Collector(b, default_counters(), parse_device_selector("f"), 1.0, 0.5)
    r = Renderer(
        RenderContext("Hostname", "n"),
        XidTracker(300, message=str),
        "scripted",
        process_registry=prometheus_client.REGISTRY,
    )
    text = r.render(c.run_once()).plain.decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"DCGM_FI_DEV_GPU_TEMP", "process_resident_memory_bytes"} <= names


# --- one failing part must not freeze /metrics ---


class Flaky:
    """A contributor that renders a counter until told to fail."""

    metrics_part = "flaky"

    def __init__(self) -> None:
        self.fail = False
        self.n = 0

    def render_metrics(self, ctx: RenderContext) -> str:
        if self.fail:
            raise RuntimeError("boom")
        self.n += 1
        head = "# HELP gpuhealth_flaky_total Renders.\n# TYPE gpuhealth_flaky_total counter\n"
        return f"{head}gpuhealth_flaky_total {self.n}\n"


class Unnamed:
    def render_metrics(self, ctx: RenderContext) -> str:
        return ""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def flaky_renderer(clock: Clock | None = None) -> tuple[Renderer, Collector, Flaky]:
    c = Collector(backend(), FIELDS, parse_device_selector("f"), 1.0, 0.5)
    r = Renderer(RenderContext("Hostname", "n"), XidTracker(300, message=str), "scripted", process_registry=None)
    if clock is not None:
        r.reminder = Reminder(60.0, clock=clock)
    flaky = Flaky()
    r.contributors += [flaky, Unnamed()]
    return r, c, flaky


def cycle(r: Renderer, c: Collector) -> dict[str, float]:
    """Render one cycle; the gpuhealth_render_success value per part."""
    text = r.render(c.run_once()).plain.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels["part"]: s.value for s in families["gpuhealth_render_success"].samples}


def value_of(r: Renderer, line_start: str) -> str:
    lines = [x for x in r.current.plain.decode().splitlines() if x.startswith(line_start)]
    assert len(lines) == 1, lines
    return lines[0].rsplit(" ", 1)[1]


def test_failing_contributor_serves_its_last_good_text_and_others_move_on() -> None:
    r, c, flaky = flaky_renderer()
    assert cycle(r, c) == {"dcgm": 1, "core": 1, "flaky": 1, "unnamed": 1}
    assert value_of(r, "gpuhealth_flaky_total") == "1"
    assert value_of(r, "gpuhealth_collections_total") == "1"
    first_at = r.current.rendered_at

    flaky.fail = True
    assert cycle(r, c) == {"dcgm": 1, "core": 1, "flaky": 0, "unnamed": 1}
    assert value_of(r, "gpuhealth_flaky_total") == "1"  # the last good text, not nothing
    assert value_of(r, "gpuhealth_collections_total") == "2"  # the other parts are this cycle's
    assert r.current.rendered_at >= first_at
    cycle(r, c)
    assert value_of(r, "gpuhealth_collections_total") == "3"

    flaky.fail = False
    assert cycle(r, c)["flaky"] == 1
    assert value_of(r, "gpuhealth_flaky_total") == "2"


def test_failing_part_with_no_good_text_yet_is_left_out() -> None:
    r, c, flaky = flaky_renderer()
    flaky.fail = True
    assert cycle(r, c)["flaky"] == 0
    assert "gpuhealth_flaky_total" not in r.current.plain.decode()


def test_failing_builtin_part_is_isolated_too(monkeypatch: pytest.MonkeyPatch) -> None:
    r, c, _ = flaky_renderer()
    cycle(r, c)
    dcgm_before = [x for x in r.current.plain.decode().splitlines() if x.startswith("DCGM_FI_DEV_GPU_TEMP{")]

    def broken(*args: object) -> str:
        raise KeyError("uuid")

    monkeypatch.setattr(r, "render_dcgm", broken)
    success = cycle(r, c)
    assert success == {"dcgm": 0, "core": 1, "flaky": 1, "unnamed": 1}
    text = r.current.plain.decode()
    assert [x for x in text.splitlines() if x.startswith("DCGM_FI_DEV_GPU_TEMP{")] == dcgm_before


@pytest.mark.parametrize(
    "output",
    [
        "gpuhealth_flaky_total 1",  # no newline: would glue its last line to the next part's first
        'gpuhealth_flaky_info{name="\ud800"} 1\n',  # not encodable: would fail the whole render
    ],
)
def test_output_that_would_break_the_exposition_counts_as_failure(output: str) -> None:
    r, c, flaky = flaky_renderer()
    flaky.render_metrics = lambda ctx: output  # type: ignore[method-assign]
    assert cycle(r, c) == {"dcgm": 1, "core": 1, "flaky": 0, "unnamed": 1}


def test_duplicate_part_names_get_distinct_series() -> None:
    r, c, _ = flaky_renderer()
    r.contributors.append(Unnamed())
    assert set(cycle(r, c)) == {"dcgm", "core", "flaky", "unnamed", "unnamed_2"}


def test_part_failure_logs_traceback_once_then_once_a_minute_then_recovery() -> None:
    clock = Clock()
    r, c, flaky = flaky_renderer(clock)
    cycle(r, c)
    flaky.fail = True
    with capture_logs() as logs:
        for _ in range(10):
            cycle(r, c)
            clock.now += 1
        clock.now += 60
        for _ in range(10):
            cycle(r, c)
            clock.now += 1
        flaky.fail = False
        cycle(r, c)
        cycle(r, c)
    failed = [e for e in logs if e["event"] == "render_part_failed"]
    assert [e["part"] for e in failed] == ["flaky", "flaky"]
    assert failed[0]["log_level"] == "error" and failed[0].get("exc_info") is True
    assert "RuntimeError: boom" in failed[0]["error"]
    assert "exc_info" not in failed[1] and failed[1]["failed_cycles"] == 11
    recovered = [e for e in logs if e["event"] == "render_part_recovered"]
    assert len(recovered) == 1 and recovered[0]["part"] == "flaky"
    # a new streak logs its traceback again
    flaky.fail = True
    with capture_logs() as logs:
        cycle(r, c)
    assert [e.get("exc_info") for e in logs if e["event"] == "render_part_failed"] == [True]


def test_whole_render_failure_keeps_the_previous_exposition() -> None:
    class Broken:
        def collect(self) -> list[object]:
            raise RuntimeError("registry broke")

    registry = prometheus_client.CollectorRegistry()
    c = Collector(backend(), FIELDS, parse_device_selector("f"), 1.0, 0.5)
    r = Renderer(RenderContext("Hostname", "n"), XidTracker(300, message=str), "scripted", process_registry=registry)
    good = r.render(c.run_once())
    registry.register(Broken())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        r.render(c.run_once())
    assert r.current is good  # rendered_at did not advance: /ready can tell
