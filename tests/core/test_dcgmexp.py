"""exporter/dcgmexp.py: the DCGM_EXP_* families, served only when the counters file lists them."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
from structlog.testing import capture_logs

from exporter.collector import Collector
from exporter.counters import CounterSet, ExporterCounter
from exporter.dcgmexp import (
    CLOCK_EVENTS_COUNT,
    GPU_HEALTH_STATUS,
    HEALTH_WATCHES,
    P2P_STATUS,
    XID_ERRORS_COUNT,
    DcgmExpFamilies,
)
from exporter.devices import parse_device_selector
from exporter.fields import FieldSpec, lookup
from exporter.health.verdict import HealthState, Reason, Verdict
from exporter.labels import RenderContext
from exporter.model import EVENT_XID, DeviceEvent, Gpu, Inventory, MigDevice
from exporter.render import Renderer
from exporter.snapshot import DeviceSample, Snapshot
from exporter.xid import XidTracker
from tests.core.fakebackend import ScriptedBackend

CLOCK_FIELD = "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"
GPU0, GPU1 = "GPU-00000000", "GPU-00000001"
DCGM0 = (
    'gpu="0",UUID="GPU-00000000",pci_bus_id="00000000:18:00.0",device="nvidia0",'
    'modelName="NVIDIA H100 80GB HBM3",Hostname="node"'
)

XID_LINE = ExporterCounter(XID_ERRORS_COUNT, "counter", "XIDs in the window (the CSV's words).")
CLOCK_LINE = ExporterCounter(CLOCK_EVENTS_COUNT, "gauge", "Clock events in the window.")
HEALTH_LINE = ExporterCounter(GPU_HEALTH_STATUS, "gauge", "Health per watch.")
P2P_LINE = ExporterCounter(P2P_STATUS, "gauge", "P2P status.")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHealth:
    def __init__(self) -> None:
        self.by_uuid: dict[str, Verdict] = {}

    def verdict(self, uuid: str) -> Verdict:
        return self.by_uuid.get(uuid, Verdict(uuid, HealthState.HEALTHY))

    def subscribe(self, callback: Callable[[], None]) -> None:
        pass

    def verdicts(self) -> Mapping[str, Verdict]:
        return self.by_uuid


def spec(name: str) -> FieldSpec:
    found = lookup(name)
    assert found is not None
    return found


def counters(*lines: ExporterCounter, fields: tuple[str, ...] = ("DCGM_FI_DEV_GPU_TEMP",)) -> CounterSet:
    return CounterSet(tuple(spec(f) for f in fields), "test.csv", exporter_counters=lines)


def gpu(i: int, migs: tuple[MigDevice, ...] = ()) -> Gpu:
    return Gpu(i, f"GPU-{i:08d}", f"00000000:{i + 0x18:02X}:00.0", i, "NVIDIA H100 80GB HBM3", bool(migs), migs)


def snapshot(
    values: dict[str, dict[str, float]],
    gpus: tuple[Gpu, ...] = (gpu(0), gpu(1)),
    fields: tuple[str, ...] = ("DCGM_FI_DEV_GPU_TEMP",),
    stale: frozenset[str] = frozenset(),
    p2p: tuple[tuple[str, str, int], ...] = (),
) -> Snapshot:
    samples: list[DeviceSample] = []
    for g in gpus:
        samples.append(DeviceSample(g, None, values.get(g.uuid, {}), up=True, stale=g.uuid in stale))
        samples += [DeviceSample(g, m, {}, up=True) for m in g.migs]
    inv = Inventory(driver_version="570.1", gpus=gpus, p2p_status=p2p)
    return Snapshot(inv, tuple(samples), 0.0, 0.0, fields=tuple(spec(f) for f in fields))


class Setup:
    def __init__(self, *lines: ExporterCounter, gpus: tuple[Gpu, ...] = (gpu(0), gpu(1))) -> None:
        self.clock = Clock()
        self.xids = XidTracker(300, clock=self.clock)
        self.health = FakeHealth()
        self.exp = DcgmExpFamilies(counters(*lines), self.xids, self.health, 60, clock=self.clock)
        self.ctx = RenderContext("Hostname", "node")
        self.ctx.rebuild(Inventory("570.1", gpus))
        self.gpus = gpus

    def cycle(self, values: dict[str, dict[str, float]] | None = None, **kw: object) -> str:
        self.exp.on_snapshot(snapshot(values or {}, self.gpus, **kw))  # type: ignore[arg-type]
        return self.exp.render_metrics(self.ctx)


def series(text: str, family: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(family + "{")]


# ------------------------------------------------------------------------------- not listed


def test_nothing_listed_nothing_served() -> None:
    s = Setup()
    s.xids.on_events([DeviceEvent(GPU0, EVENT_XID, 79)])
    assert s.cycle({GPU0: {CLOCK_FIELD: 8}}) == ""


# ------------------------------------------------------------------------------- XID count


def test_xid_count_takes_type_and_help_from_the_csv_and_zero_series_lacks_the_xid_label() -> None:
    s = Setup(XID_LINE)
    s.xids.on_events([DeviceEvent(GPU1, EVENT_XID, 79), DeviceEvent(GPU1, EVENT_XID, 79)])
    s.xids.on_events([DeviceEvent(GPU1, EVENT_XID, 13)])
    text = s.cycle()
    assert text.startswith(
        "# HELP DCGM_EXP_XID_ERRORS_COUNT XIDs in the window (the CSV's words).\n"
        "# TYPE DCGM_EXP_XID_ERRORS_COUNT counter\n"
    )
    assert series(text, XID_ERRORS_COUNT) == [
        f'DCGM_EXP_XID_ERRORS_COUNT{{{DCGM0},window_size_in_ms="300000"}} 0',
        'DCGM_EXP_XID_ERRORS_COUNT{gpu="1",UUID="GPU-00000001",pci_bus_id="00000000:19:00.0",device="nvidia1",'
        'modelName="NVIDIA H100 80GB HBM3",Hostname="node",window_size_in_ms="300000",xid="13"} 1',
        'DCGM_EXP_XID_ERRORS_COUNT{gpu="1",UUID="GPU-00000001",pci_bus_id="00000000:19:00.0",device="nvidia1",'
        'modelName="NVIDIA H100 80GB HBM3",Hostname="node",window_size_in_ms="300000",xid="79"} 2',
    ]


def test_xid_count_forgets_xids_past_the_window() -> None:
    s = Setup(XID_LINE)
    s.xids.on_events([DeviceEvent(GPU0, EVENT_XID, 48)])
    assert 'xid="48"} 1' in s.cycle()
    s.clock.now += 301
    assert (
        series(s.cycle(), XID_ERRORS_COUNT)[0] == f'DCGM_EXP_XID_ERRORS_COUNT{{{DCGM0},window_size_in_ms="300000"}} 0'
    )


def test_label_fields_of_the_csv_come_first_sorted_with_the_familys_labels() -> None:
    s = Setup(XID_LINE)
    s.xids.on_events([DeviceEvent(GPU0, EVENT_XID, 48)])
    text = s.cycle(fields=("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DRIVER_VERSION"))
    assert f'{{{DCGM0},DCGM_FI_DRIVER_VERSION="570.1",window_size_in_ms="300000",xid="48"}} 1' in text


def test_mig_gpu_is_served_as_its_instances_with_the_parents_count() -> None:
    parent = "GPU-00000000"
    migs = (
        MigDevice("MIG-a", parent, 0, 1, 0, "3g.40gb", 0),
        MigDevice("MIG-b", parent, 0, 5, 0, "1g.10gb", 1),
    )
    s = Setup(XID_LINE, gpus=(gpu(0, migs),))
    s.xids.on_events([DeviceEvent(parent, EVENT_XID, 31, gpu_instance_id=1)])
    lines = series(s.cycle(), XID_ERRORS_COUNT)
    assert len(lines) == 2
    assert 'UUID="GPU-00000000"' in lines[0] and 'GPU_I_PROFILE="3g.40gb",GPU_I_ID="1"' in lines[0]
    assert 'GPU_I_ID="5"' in lines[1]
    assert all(line.endswith('xid="31"} 1') for line in lines)


def test_parent_layout_serves_the_gpu() -> None:
    migs = (MigDevice("MIG-a", GPU0, 0, 1, 0, "3g.40gb", 0),)
    s = Setup(XID_LINE, gpus=(gpu(0, migs),))
    s.exp.mig_layout = "parent"
    s.xids.on_events([DeviceEvent(GPU0, EVENT_XID, 31, gpu_instance_id=1)])
    assert series(s.cycle(), XID_ERRORS_COUNT) == [
        f'DCGM_EXP_XID_ERRORS_COUNT{{{DCGM0},window_size_in_ms="300000",xid="31"}} 1'
    ]


# ------------------------------------------------------------------------------- clock events


def test_clock_events_count_each_cycle_with_the_bit_set() -> None:
    s = Setup(CLOCK_LINE)
    s.cycle({GPU0: {CLOCK_FIELD: 0x1}, GPU1: {CLOCK_FIELD: 0x0}})
    s.cycle({GPU0: {CLOCK_FIELD: 0x1 | 0x40}, GPU1: {CLOCK_FIELD: 0x0}})
    text = s.cycle({GPU0: {CLOCK_FIELD: 0x40 | 0x200}, GPU1: {CLOCK_FIELD: 0x0}})  # 0x200: no name, not counted
    assert text.startswith("# HELP DCGM_EXP_CLOCK_EVENTS_COUNT Clock events in the window.\n")
    assert "# TYPE DCGM_EXP_CLOCK_EVENTS_COUNT gauge\n" in text
    assert series(text, CLOCK_EVENTS_COUNT) == [
        f'DCGM_EXP_CLOCK_EVENTS_COUNT{{{DCGM0},clock_event="gpu_idle",window_size_in_ms="60000"}} 2',
        f'DCGM_EXP_CLOCK_EVENTS_COUNT{{{DCGM0},clock_event="hw_thermal",window_size_in_ms="60000"}} 2',
    ]  # GPU 1 was sampled but never had a reason: no series, as upstream


def test_clock_events_zero_series_when_nothing_was_sampled_in_the_window() -> None:
    s = Setup(CLOCK_LINE)
    s.cycle({GPU0: {CLOCK_FIELD: 0x8}})
    lines = series(s.cycle({GPU0: {CLOCK_FIELD: 0x8}}), CLOCK_EVENTS_COUNT)
    assert lines[0].endswith('clock_event="hw_slowdown",window_size_in_ms="60000"} 2')
    assert lines[1].endswith('Hostname="node",window_size_in_ms="60000"} 0')  # GPU 1: field not supported
    s.clock.now += 61
    lines = series(s.cycle({}), CLOCK_EVENTS_COUNT)
    assert lines[0] == f'DCGM_EXP_CLOCK_EVENTS_COUNT{{{DCGM0},window_size_in_ms="60000"}} 0'


def test_stale_reads_are_not_new_samples() -> None:
    s = Setup(CLOCK_LINE)
    s.cycle({GPU0: {CLOCK_FIELD: 0x4}})
    text = s.cycle({GPU0: {CLOCK_FIELD: 0x4}}, stale=frozenset({GPU0}))
    assert 'clock_event="power_cap",window_size_in_ms="60000"} 1' in text


# ------------------------------------------------------------------------------- health status


def reason(signal: str, code: str, state: HealthState) -> Reason:
    return Reason(signal, code, "m", 1.0, 1.0, 1, "none", state)


def test_health_status_has_every_watch_per_gpu_pass_by_default() -> None:
    s = Setup(HEALTH_LINE)
    lines = series(s.cycle(), GPU_HEALTH_STATUS)
    assert len(lines) == 2 * len(HEALTH_WATCHES)
    assert lines[0] == f'DCGM_EXP_GPU_HEALTH_STATUS{{{DCGM0},health_error_code="DCGM_FR_OK",health_watch="PCIE"}} 0'
    assert [line.split('health_watch="')[1].split('"')[0] for line in lines[:11]] == list(HEALTH_WATCHES)


@pytest.mark.parametrize(
    ("reasons", "watch", "value", "code"),
    [
        ([("xid", "79", HealthState.UNHEALTHY)], "ALL", 20, "DCGM_FR_FALLEN_OFF_BUS"),
        ([("xid", "94", HealthState.DEGRADED)], "ALL", 10, "DCGM_FR_UNKNOWN(131)"),
        ([("xid", "64", HealthState.UNHEALTHY)], "MEM", 20, "DCGM_FR_ROW_REMAP_FAILURE"),
        ([("xid", "74", HealthState.UNHEALTHY)], "ALL", 20, "DCGM_FR_XID_ERROR"),
        ([("xid", "121", HealthState.DEGRADED)], "NVLINK", 10, "DCGM_FR_XID_ERROR"),
        ([("xid", "109", HealthState.UNHEALTHY)], "ALL", 20, "DCGM_FR_XID_ERROR"),  # no DCGM watch: ALL
        ([("dbe", "", HealthState.UNHEALTHY)], "MEM", 20, "DCGM_FR_VOLATILE_DBE_DETECTED"),
        ([("row_remap_pending", "", HealthState.DEGRADED)], "MEM", 10, "DCGM_FR_PENDING_ROW_REMAP"),
        ([("recovery_action", "2", HealthState.UNHEALTHY)], "DRIVER", 20, "DCGM_FR_GPU_RECOVERY_REBOOT"),
        ([("hw_slowdown", "", HealthState.DEGRADED)], "THERMAL", 10, "DCGM_FR_CLOCK_THROTTLE_THERMAL"),
        # the worst reason on a watch wins
        (
            [("retired_pages_pending", "", HealthState.DEGRADED), ("dbe", "", HealthState.UNHEALTHY)],
            "MEM",
            20,
            "DCGM_FR_VOLATILE_DBE_DETECTED",
        ),
    ],
)
def test_health_reasons_map_to_dcgm_watches(
    reasons: list[tuple[str, str, HealthState]], watch: str, value: int, code: str
) -> None:
    s = Setup(HEALTH_LINE)
    rs = tuple(reason(*r) for r in reasons)
    s.health.by_uuid[GPU0] = Verdict(GPU0, max(r.state for r in rs), rs)
    lines = series(s.cycle(), GPU_HEALTH_STATUS)[: len(HEALTH_WATCHES)]
    failing = [line for line in lines if not line.endswith(" 0")]
    assert failing == [
        f'DCGM_EXP_GPU_HEALTH_STATUS{{{DCGM0},health_error_code="{code}",health_watch="{watch}"}} {value}'
    ]


def test_healthy_and_blind_spot_reasons_are_no_incident_and_unknown_gpus_are_left_out() -> None:
    s = Setup(HEALTH_LINE)
    s.health.by_uuid[GPU0] = Verdict(
        GPU0,
        HealthState.DEGRADED,
        (reason("xid", "13", HealthState.HEALTHY), reason("unmonitored", "", HealthState.DEGRADED)),
    )
    s.health.by_uuid[GPU1] = Verdict(GPU1, HealthState.UNKNOWN, (reason("monitor_fault", "x", HealthState.UNKNOWN),))
    lines = series(s.cycle(), GPU_HEALTH_STATUS)
    assert len(lines) == len(HEALTH_WATCHES)  # GPU 1 left out
    assert all(line.endswith(" 0") and 'gpu="0"' in line for line in lines)


def test_mig_instance_reasons_count_for_their_gpu() -> None:
    migs = (MigDevice("MIG-a", GPU0, 0, 1, 0, "3g.40gb", 0),)
    s = Setup(HEALTH_LINE, gpus=(gpu(0, migs),))
    s.health.by_uuid["MIG-a"] = Verdict("MIG-a", HealthState.DEGRADED, (reason("xid", "31", HealthState.DEGRADED),))
    lines = series(s.cycle(), GPU_HEALTH_STATUS)
    assert len(lines) == len(HEALTH_WATCHES)
    assert 'health_error_code="DCGM_FR_XID_ERROR",health_watch="MEM"} 10' in "\n".join(lines)
    assert "GPU_I_ID" not in "\n".join(lines)  # per GPU only


# ------------------------------------------------------------------------------- P2P, reload


def test_p2p_status_per_gpu_pair_as_dcgm_exporter_writes_it() -> None:
    """Value nvmlGpuP2PStatus_t, labels peer_gpu (the peer's index) and link_status (upstream's text)."""
    s = Setup(P2P_LINE)
    p2p = ((GPU0, GPU1, 0), (GPU1, GPU0, 0))
    lines = series(s.cycle(p2p=p2p), P2P_STATUS)
    assert len(lines) == 2
    assert lines[0].startswith(f'DCGM_EXP_P2P_STATUS{{gpu="0",UUID="{GPU0}"')
    assert lines[0].endswith(',link_status="OK",peer_gpu="1"} 0')
    assert lines[1].startswith('DCGM_EXP_P2P_STATUS{gpu="1"') and lines[1].endswith(',link_status="OK",peer_gpu="0"} 0')
    not_linked = series(s.cycle(p2p=((GPU0, GPU1, 5), (GPU1, GPU0, 5))), P2P_STATUS)
    assert all(line.endswith('link_status="NotSupported",peer_gpu="1"} 5') for line in not_linked[:1])
    odd = series(s.cycle(p2p=((GPU0, GPU1, 42),)), P2P_STATUS)
    assert odd == [odd[0]] and odd[0].endswith('link_status="Unknown",peer_gpu="1"} 42')


def test_p2p_status_without_an_answer_from_the_driver_serves_nothing() -> None:
    with capture_logs() as logs:
        s = Setup(P2P_LINE, XID_LINE)
    assert not [e for e in logs if e["event"] == "counter_skipped"]
    text = s.cycle()  # a driver without nvmlDeviceGetP2PStatus: no pair known
    assert "DCGM_EXP_P2P_STATUS" not in text
    assert "DCGM_EXP_XID_ERRORS_COUNT" in text


def test_set_counters_swaps_the_families_served() -> None:
    s = Setup(XID_LINE)
    assert XID_ERRORS_COUNT in s.cycle()
    s.exp.set_counters(counters(CLOCK_LINE))
    text = s.cycle()
    assert XID_ERRORS_COUNT not in text and CLOCK_EVENTS_COUNT in text
    s.exp.set_counters(counters())
    assert s.cycle() == ""


# ------------------------------------------------------------------------------- collector


def collector_with(cs: CounterSet) -> tuple[ScriptedBackend, Collector]:
    b = ScriptedBackend(gpus=1)
    b.values = {GPU0: {"DCGM_FI_DEV_GPU_TEMP": 40, CLOCK_FIELD: 0x1}}
    return b, Collector(b, cs, parse_device_selector("f"), 1.0, 0.5)


def test_collector_reads_the_clock_field_for_the_family_without_exporting_it() -> None:
    b, c = collector_with(counters(CLOCK_LINE))
    snap = c.run_once()
    assert CLOCK_FIELD in dict(b.asked)[GPU0]  # read ...
    assert snap.samples[0].values[CLOCK_FIELD] == 0x1
    assert [f.name for f in snap.fields] == ["DCGM_FI_DEV_GPU_TEMP"]  # ... but not a field of the file
    r = Renderer(RenderContext("Hostname", "node"), XidTracker(300), "scripted", process_registry=None)
    exp = DcgmExpFamilies(counters(CLOCK_LINE), XidTracker(300), FakeHealth(), 60)
    r.contributors.append(exp)
    exp.on_snapshot(snap)
    text = r.render(snap).plain.decode()
    assert f"# TYPE {CLOCK_FIELD} " not in text
    assert 'DCGM_EXP_CLOCK_EVENTS_COUNT{gpu="0"' in text and 'clock_event="gpu_idle"' in text


def test_collector_reads_the_clock_field_once_when_it_is_listed_too() -> None:
    b, c = collector_with(counters(CLOCK_LINE, fields=("DCGM_FI_DEV_GPU_TEMP", CLOCK_FIELD)))
    c.run_once()
    assert list(dict(b.asked)[GPU0]).count(CLOCK_FIELD) == 1


def test_collector_does_not_read_the_clock_field_without_the_family() -> None:
    b, c = collector_with(counters(XID_LINE))
    c.run_once()
    assert CLOCK_FIELD not in dict(b.asked)[GPU0]


class OnePod:
    """GPU 1 is held by pod ml/train (container c); nothing else."""

    def labels_for(self, gpu_uuid: str, gpu_instance_id: int | None) -> tuple[tuple[tuple[str, str], ...], ...]:
        if gpu_uuid == GPU1 and gpu_instance_id is None:
            return ((("container", "c"), ("namespace", "ml"), ("pod", "train")),)
        return ()


def test_pod_labels_are_sorted_with_the_familys_labels() -> None:
    """dcgm-exporter's pod mapper labels these families too; its template writes the attributes sorted."""
    s = Setup(XID_LINE, P2P_LINE)
    s.exp.pods = OnePod()
    s.xids.on_events([DeviceEvent(GPU1, EVENT_XID, 79)])
    text = s.cycle(p2p=((GPU0, GPU1, 0), (GPU1, GPU0, 0)))
    (held,) = [line for line in series(text, XID_ERRORS_COUNT) if f'UUID="{GPU1}"' in line]
    assert held.endswith(',container="c",namespace="ml",pod="train",window_size_in_ms="300000",xid="79"} 1')
    (free,) = [line for line in series(text, XID_ERRORS_COUNT) if f'UUID="{GPU0}"' in line]
    assert "pod=" not in free
    (p2p,) = [line for line in series(text, P2P_STATUS) if f'UUID="{GPU1}"' in line]
    assert p2p.endswith(',container="c",link_status="OK",namespace="ml",peer_gpu="0",pod="train"} 0')
