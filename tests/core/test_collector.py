from __future__ import annotations

import threading
import time

from exporter.collector import Collector
from exporter.counters import parse_counters
from exporter.devices import parse_device_selector
from exporter.model import GpuProcess
from tests.core.fakebackend import ScriptedBackend

FIELDS = parse_counters(
    "DCGM_FI_DEV_GPU_TEMP, gauge, t\nDCGM_FI_DEV_FB_USED, gauge, fb\nDCGM_FI_DEV_XID_ERRORS, gauge, x\n", "t.csv"
)


def make(backend: ScriptedBackend, devices: str = "f", timeout: float = 0.3) -> Collector:
    return Collector(backend, FIELDS, parse_device_selector(devices), interval_s=1.0, device_timeout_s=timeout)


def test_values_flow_into_the_snapshot() -> None:
    b = ScriptedBackend()
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 40}, "GPU-00000001": {"DCGM_FI_DEV_GPU_TEMP": 41}}
    snap = make(b).run_once()
    assert [(s.uuid, s.values.get("DCGM_FI_DEV_GPU_TEMP"), s.up) for s in snap.samples] == [
        ("GPU-00000000", 40, True),
        ("GPU-00000001", 41, True),
    ]
    # event-sourced fields are never polled
    assert all("DCGM_FI_DEV_XID_ERRORS" not in names for _, names in b.asked)


def test_hung_device_served_stale_while_others_stay_fresh() -> None:
    b = ScriptedBackend()
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 40}, "GPU-00000001": {"DCGM_FI_DEV_GPU_TEMP": 41}}
    c = make(b)
    c.run_once()
    b.hang["GPU-00000001"] = threading.Event()
    b.values["GPU-00000000"]["DCGM_FI_DEV_GPU_TEMP"] = 50
    t0 = time.monotonic()
    snap = c.run_once()
    assert time.monotonic() - t0 < 1.0  # bounded by the deadline, not by the hang
    fresh, hung = snap.samples
    assert fresh.values["DCGM_FI_DEV_GPU_TEMP"] == 50 and not fresh.stale
    assert hung.stale and hung.values["DCGM_FI_DEV_GPU_TEMP"] == 41 and hung.error == "timeout"
    asked_before = len(b.asked)
    snap = c.run_once()  # no second read is queued behind the hung one
    assert snap.samples[1].stale and snap.samples[1].age_s > 0
    assert [u for u, _ in b.asked[asked_before:]] == ["GPU-00000000"]
    b.hang["GPU-00000001"].set()
    time.sleep(0.05)
    b.hang.clear()
    snap = c.run_once()
    assert not snap.samples[1].stale


def test_lost_gpu_is_down_and_others_keep_going() -> None:
    b = ScriptedBackend()
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 40}, "GPU-00000001": {"DCGM_FI_DEV_GPU_TEMP": 41}}
    b.lost.add("GPU-00000000")
    c = make(b)
    snap = c.run_once()
    assert (snap.samples[0].up, snap.samples[0].error) == (False, "lost")
    assert snap.samples[1].up
    assert c.nvml_errors[("*", "GpuIsLost")] == 1


def test_unsupported_fields_are_not_asked_again() -> None:
    b = ScriptedBackend(gpus=1)
    b.unsupported = {"GPU-00000000": {"DCGM_FI_DEV_FB_USED"}}
    c = make(b)
    c.run_once()
    c.run_once()
    assert "DCGM_FI_DEV_FB_USED" in b.asked[0][1]
    assert "DCGM_FI_DEV_FB_USED" not in b.asked[1][1]


def test_mig_devices_read_with_instance_fields_only() -> None:
    b = ScriptedBackend(gpus=1, mig_on=0)
    snap = make(b).run_once()
    assert [s.uuid for s in snap.samples] == ["GPU-00000000", "MIG-0-a", "MIG-0-b"]
    mig_asks = [names for uuid, names in b.asked if uuid.startswith("MIG-")]
    assert mig_asks == [("DCGM_FI_DEV_FB_USED",), ("DCGM_FI_DEV_FB_USED",)]
    # -d g: no instances; -d i:5: only GPU instance 5, plus its GPU read for the GPU-wide values only
    assert [s.uuid for s in make(ScriptedBackend(gpus=1, mig_on=0), "g").run_once().samples] == ["GPU-00000000"]
    only_5 = make(ScriptedBackend(gpus=1, mig_on=0), "i:5").run_once().samples
    assert [(s.uuid, s.exported) for s in only_5] == [("GPU-00000000", False), ("MIG-0-b", True)]


def test_vanished_gpu_is_reported() -> None:
    b = ScriptedBackend(gpus=2)
    c = make(b)
    c.run_once()
    b.inventory = type(b.inventory)(driver_version="570.1", gpus=b.inventory.gpus[:1])
    c.request_rediscovery()
    snap = c.run_once()
    assert snap.vanished == ("GPU-00000001",)


def test_a_failing_listener_does_not_stop_collection() -> None:
    b = ScriptedBackend(gpus=1)
    c = make(b)
    seen: list[int] = []

    def broken(_snap: object) -> None:
        raise RuntimeError("bug")

    c.add_listener(broken)
    c.add_listener(lambda s: seen.append(len(s.samples)))
    c.run_once()
    assert seen == [1]


def test_unsupported_fields_are_asked_again_after_a_layout_change() -> None:
    # GPU_UTIL is NOT_SUPPORTED while MIG is on; after MIG is turned off it must come back.
    b = ScriptedBackend(gpus=1, mig_on=0)
    b.unsupported = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP"}}
    c = make(b)
    c.run_once()
    c.run_once()
    gpu_asks = [names for uuid, names in b.asked if uuid == "GPU-00000000"]
    assert "DCGM_FI_DEV_GPU_TEMP" not in gpu_asks[-1]
    b.inventory = ScriptedBackend(gpus=1).inventory  # MIG off: a new layout
    b.unsupported = {}
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 33}}
    c.request_rediscovery()
    snap = c.run_once()
    assert snap.samples[0].values["DCGM_FI_DEV_GPU_TEMP"] == 33


def test_a_read_hung_since_an_earlier_cycle_is_not_waited_for_again() -> None:
    b = ScriptedBackend()
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 40}, "GPU-00000001": {"DCGM_FI_DEV_GPU_TEMP": 41}}
    c = make(b, timeout=1.0)
    c.run_once()
    b.hang["GPU-00000001"] = threading.Event()
    try:
        assert c.run_once().samples[1].stale  # the cycle that submitted the read waits its deadline
        t0 = time.monotonic()
        for _ in range(3):
            snap = c.run_once()
            assert snap.samples[1].stale and not snap.samples[0].stale
        assert time.monotonic() - t0 < 0.5  # three cycles, none waiting the 1 s deadline again
    finally:
        b.hang["GPU-00000001"].set()


def test_not_supported_is_asked_again_after_the_retry_interval() -> None:
    from exporter.collector import UNSUPPORTED_RETRY_S

    now = [1000.0]
    b = ScriptedBackend(gpus=1)
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 40}}
    b.unsupported = {"GPU-00000000": {"DCGM_FI_DEV_FB_USED"}}
    c = Collector(b, FIELDS, parse_device_selector("f"), interval_s=1.0, device_timeout_s=0.3, clock=lambda: now[0])
    snap = c.run_once()
    assert snap.samples[0].unsupported == {"DCGM_FI_DEV_FB_USED"}
    c.run_once()
    assert "DCGM_FI_DEV_FB_USED" not in b.asked[-1][1]  # remembered
    b.unsupported = {}
    b.values["GPU-00000000"]["DCGM_FI_DEV_FB_USED"] = 7
    now[0] += UNSUPPORTED_RETRY_S
    snap = c.run_once()
    assert "DCGM_FI_DEV_FB_USED" in b.asked[-1][1]  # asked again: supported now
    assert snap.samples[0].values["DCGM_FI_DEV_FB_USED"] == 7
    assert snap.samples[0].unsupported == frozenset()


def test_a_hung_first_device_hands_the_others_to_another_reader() -> None:
    # Reads of a cycle run in order on one reader thread; the one queued behind a hung read is
    # handed to another reader, so it is read fresh well inside the deadline.
    b = ScriptedBackend(gpus=4)
    b.values = {f"GPU-0000000{i}": {"DCGM_FI_DEV_GPU_TEMP": 40 + i} for i in range(4)}
    c = make(b, timeout=1.0)
    c.run_once()
    b.hang["GPU-00000000"] = threading.Event()
    b.hang["GPU-00000002"] = threading.Event()
    b.values["GPU-00000003"]["DCGM_FI_DEV_GPU_TEMP"] = 50
    try:
        snap = c.run_once()
        stale = [s.stale for s in snap.samples]
        assert stale == [True, False, True, False]
        assert snap.samples[3].values["DCGM_FI_DEV_GPU_TEMP"] == 50
        t0 = time.monotonic()
        for _ in range(3):  # the hung ones are not asked again, the others stay fresh
            assert [s.stale for s in c.run_once().samples] == [True, False, True, False]
        assert time.monotonic() - t0 < 0.5
    finally:
        for ev in b.hang.values():
            ev.set()
    time.sleep(0.05)
    b.hang.clear()
    assert not any(s.stale for s in c.run_once().samples)


def test_healthy_devices_share_one_reader_thread() -> None:
    before = {t.name for t in threading.enumerate()}
    b = ScriptedBackend(gpus=8)
    c = make(b)
    for _ in range(5):
        c.run_once()
    readers = {t.name for t in threading.enumerate()} - before
    assert len(readers) <= 2, readers  # one reader (plus discovery), not a thread per device
    c.stop()


def test_reads_queued_behind_more_hung_reads_than_the_deadline_fits_are_still_read() -> None:
    # 12 hung GPUs and a 0.1 s deadline: more hand-offs than fit in one cycle. The healthy GPUs
    # queued behind them are handed on in the following cycles, not left waiting for the hangs.
    b = ScriptedBackend(gpus=14)
    b.values = {f"GPU-{i:08d}": {"DCGM_FI_DEV_GPU_TEMP": 40 + i} for i in range(14)}
    c = make(b, timeout=0.1)
    c.run_once()
    for i in range(12):
        b.hang[f"GPU-{i:08d}"] = threading.Event()
    try:
        fresh_after = None
        for cycle in range(30):
            snap = c.run_once()
            if not snap.samples[12].stale and not snap.samples[13].stale and cycle > 0:
                fresh_after = cycle
                break
            time.sleep(0.02)
        assert fresh_after is not None
        assert all(s.stale for s in snap.samples[:12])
    finally:
        for ev in b.hang.values():
            ev.set()
        c.stop()


# ------------------------------------------------------------- process lists (--process-metrics)


def _proc(pid: int, mib: int, gi: int | None = None) -> GpuProcess:
    return GpuProcess(pid, "compute", mib << 20, gpu_instance_id=gi, compute_instance_id=0 if gi is not None else None)


def with_processes(backend: ScriptedBackend, interval: int = 1, devices: str = "f", timeout: float = 0.3) -> Collector:
    return Collector(
        backend,
        FIELDS,
        parse_device_selector(devices),
        interval_s=1.0,
        device_timeout_s=timeout,
        process_interval=interval,
    )


def test_process_metrics_off_never_asks_and_leaves_the_snapshot_empty() -> None:
    b = ScriptedBackend()
    b.process_lists = {"GPU-00000000": (_proc(10, 100),)}
    c = make(b)
    for _ in range(3):
        snap = c.run_once()
    assert b.process_asked == []
    assert snap.processes == {} and snap.processes_read_at == 0.0


def test_processes_reach_the_snapshot_every_interval_and_are_carried_between() -> None:
    b = ScriptedBackend()
    b.process_lists = {"GPU-00000000": (_proc(10, 100), _proc(11, 200)), "GPU-00000001": ()}
    c = with_processes(b, interval=3)
    snap = c.run_once()
    assert dict(snap.processes) == {"GPU-00000000": (_proc(10, 100), _proc(11, 200)), "GPU-00000001": ()}
    assert snap.processes_read_at > 0
    read_at = snap.processes_read_at
    b.process_lists["GPU-00000001"] = (_proc(12, 300),)
    for _ in range(2):  # not due: no query, the last lists carried
        snap = c.run_once()
        assert snap.processes["GPU-00000001"] == () and snap.processes_read_at == read_at
    assert b.process_asked == ["GPU-00000000", "GPU-00000001"]
    snap = c.run_once()  # the 4th cycle: due again
    assert snap.processes["GPU-00000001"] == (_proc(12, 300),)
    assert b.process_asked[2:] == ["GPU-00000000", "GPU-00000001"]


def test_a_failed_process_query_leaves_the_device_absent_and_its_sample_up() -> None:
    b = ScriptedBackend()
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 40}}
    b.process_lists = {"GPU-00000000": (_proc(10, 100),), "GPU-00000001": (_proc(20, 100),)}
    b.process_errors = {"GPU-00000000": "NVMLError_Unknown"}
    c = with_processes(b)
    snap = c.run_once()
    assert "GPU-00000000" not in snap.processes and snap.processes["GPU-00000001"] == (_proc(20, 100),)
    sample = snap.sample("GPU-00000000")
    assert sample is not None and sample.up and not sample.stale and sample.values["DCGM_FI_DEV_GPU_TEMP"] == 40
    del b.process_errors["GPU-00000000"]
    assert c.run_once().processes["GPU-00000000"] == (_proc(10, 100),)


def test_a_hung_process_query_keeps_the_cycle_within_the_deadline_and_the_sample_fresh() -> None:
    b = ScriptedBackend()
    b.values = {"GPU-00000000": {"DCGM_FI_DEV_GPU_TEMP": 40}, "GPU-00000001": {"DCGM_FI_DEV_GPU_TEMP": 41}}
    b.process_lists = {"GPU-00000000": (_proc(10, 100),), "GPU-00000001": (_proc(20, 100),)}
    c = with_processes(b, timeout=0.3)
    c.run_once()
    gate = b.process_hang["GPU-00000000"] = threading.Event()
    t0 = time.monotonic()
    snap = c.run_once()
    assert time.monotonic() - t0 < 1.0  # bounded by the deadline, not by the hang
    assert "GPU-00000000" not in snap.processes  # a late list is not served as current
    assert snap.processes["GPU-00000001"] == (_proc(20, 100),)
    assert all(s.up and not s.stale for s in snap.samples)  # the device's own read was not held up
    asked = len(b.process_asked)
    snap = c.run_once()  # no second query queued behind the hung one
    assert b.process_asked[asked:] == ["GPU-00000001"]
    b.process_lists["GPU-00000000"] = (_proc(10, 150),)
    del b.process_hang["GPU-00000000"]
    gate.set()
    deadline = time.monotonic() + 5
    while "GPU-00000000" not in snap.processes and time.monotonic() < deadline:
        snap = c.run_once()
    # the hung query's answer (asked before the change) arrives, then the next query's
    assert snap.processes["GPU-00000000"] in ((_proc(10, 100),), (_proc(10, 150),))


def test_a_mig_enabled_gpu_is_asked_per_selected_instance_or_split_by_instance() -> None:
    b = ScriptedBackend(gpus=2, mig_on=1)
    b.process_lists = {
        "GPU-00000000": (_proc(10, 100),),
        "GPU-00000001": (_proc(30, 300, gi=1), _proc(31, 100, gi=5)),
        "MIG-1-a": (_proc(30, 300, gi=1),),
        "MIG-1-b": (_proc(31, 100, gi=5),),
    }
    snap = with_processes(b, devices="f").run_once()  # the instances are selected: asked one by one
    assert sorted(b.process_asked) == ["GPU-00000000", "MIG-1-a", "MIG-1-b"]
    assert dict(snap.processes) == {
        "GPU-00000000": (_proc(10, 100),),
        "MIG-1-a": (_proc(30, 300, gi=1),),
        "MIG-1-b": (_proc(31, 100, gi=5),),
    }
    b.process_asked.clear()
    snap = with_processes(b, devices="g").run_once()  # GPUs only: the GPU's list, split by instance
    assert sorted(b.process_asked) == ["GPU-00000000", "GPU-00000001"]
    assert snap.processes["MIG-1-a"] == (_proc(30, 300, gi=1),)
    assert snap.processes["MIG-1-b"] == (_proc(31, 100, gi=5),)
    assert snap.processes["GPU-00000001"] == ()
