"""The NVML adapter's process lists (exporter/nvml/processes.py) through the real pynvml on the fake
NVML: listing fallbacks per driver build, de-duplication, memory NOT_AVAILABLE, utilisation samples
and last-seen, MPS, MIG, unsupported queries remembered, failures."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from exporter.backend import DeviceError, DeviceLostError, MonitorError
from exporter.collector import Collector
from exporter.counters import parse_counters
from exporter.devices import parse_device_selector
from exporter.model import GpuProcess
from exporter.nvml import NvmlBackend
from tests.fakenvmllib import FakeNvml

MIB = 1 << 20
GPU0 = "GPU-00000000-0000-4000-8000-000000000000"
GPU1 = "GPU-00000000-0000-4000-8000-000000000001"
MIG_GPU = "GPU-9b0c1d2e-3f4a-4b5c-8d6e-7f8a9b0c1d20"
MIG_3G = "MIG-0c1d2e3f-4a5b-5c6d-9e7f-8a9b0c1d2e31"
MIG_IDLE = "MIG-3f4a5b6c-7d8e-5f9a-8b0c-1d2e3f4a5b64"
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_UNKNOWN = 999

# Fixed sample timestamps (CPU us) make last-seen deterministic; the fake's own advance is tested apart.
SHARED: list[dict[str, Any]] = [
    {"pid": 4100, "used_memory_mib": 20480, "kind": "compute", "sm": 55, "mem": 30, "sample_us": 1_000_000},
    {"pid": 4200, "used_memory_mib": 8192, "kind": "compute+graphics", "sm": 20, "mem": 10, "enc": 5},
    {"pid": 4300, "used_memory_mib": 412, "kind": "graphics"},
    {"pid": 4400, "used_memory_mib": None, "kind": "compute"},
]


def two_gpus(processes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "driver_version": "550.90.07",
        "devices": [
            {"uuid": GPU0, "pci_bus_id": "00000000:18:00.0", "processes": processes},
            {"uuid": GPU1, "pci_bus_id": "00000000:2A:00.0"},
        ],
    }


@pytest.fixture
def start(fake_nvml: FakeNvml) -> Iterator[Callable[..., NvmlBackend]]:
    backends: list[NvmlBackend] = []

    def _start(which: str | dict[str, Any], old_driver: bool = False, pre_r450: bool = False) -> NvmlBackend:
        backend = NvmlBackend(fake_nvml.use(which, old_driver=old_driver, pre_r450=pre_r450))
        backend.start()
        backend.discover()
        backends.append(backend)
        return backend

    yield _start
    for backend in backends:
        backend.shutdown()


def by_pid(processes: tuple[GpuProcess, ...]) -> dict[int, GpuProcess]:
    assert len({p.pid for p in processes}) == len(processes), processes
    return {p.pid: p for p in processes}


# ------------------------------------------------------------------ listing


@pytest.mark.parametrize(
    ("build", "listing"),
    [
        ({}, "_v3"),
        ({"old_driver": True}, "_v2"),  # R470: no _v3 (R510+)
        ({"pre_r450": True}, ""),  # before R450: the unversioned call with the v1 struct
    ],
)
def test_compute_and_graphics_listed_once_each_through_the_newest_form(
    start: Callable[..., NvmlBackend], fake_nvml: FakeNvml, build: dict[str, bool], listing: str
) -> None:
    backend = start(two_gpus(SHARED), **build)
    procs = by_pid(backend.processes(GPU0))
    assert sorted(procs) == [4100, 4200, 4300, 4400]
    assert procs[4100].kind == "compute" and procs[4100].used_memory_bytes == 20480 * MIB
    assert procs[4200].kind == "compute"  # listed by both queries: once, as compute
    assert procs[4300].kind == "graphics" and procs[4300].used_memory_bytes == 412 * MIB
    assert procs[4400].used_memory_bytes is None  # NVML_VALUE_NOT_AVAILABLE
    assert all(p.gpu_instance_id is None and p.compute_instance_id is None for p in procs.values())
    assert backend.processes(GPU1) == ()
    # one listing: the sizing call and the call that fills the array
    assert fake_nvml.calls("nvmlDeviceGetComputeRunningProcesses" + listing, 0) == 2
    assert fake_nvml.calls("nvmlDeviceGetGraphicsRunningProcesses" + listing, 0) == 2
    assert fake_nvml.calls("nvmlDeviceGetComputeRunningProcesses" + listing, 1) == 1  # none: the sizing call says so
    # the missing newer forms are looked up once, not on every read
    backend.processes(GPU0)
    for newer in ("_v3", "_v2")[: ("_v3", "_v2", "").index(listing)]:
        assert fake_nvml.calls("nvmlDeviceGetComputeRunningProcesses" + newer, -1) == 0


def test_mps_clients_listed_as_mps_where_the_driver_has_the_query(
    start: Callable[..., NvmlBackend], fake_nvml: FakeNvml
) -> None:
    listed = [
        {"pid": 900, "used_memory_mib": 64, "kind": "compute"},  # nvidia-cuda-mps-server
        {"pid": 901, "used_memory_mib": 4096, "kind": "mps"},
        {"pid": 902, "used_memory_mib": 2048, "kind": "mps"},
    ]
    procs = by_pid(start(two_gpus(listed)).processes(GPU0))
    assert {pid: p.kind for pid, p in procs.items()} == {900: "compute", 901: "mps", 902: "mps"}
    assert procs[901].used_memory_bytes == 4096 * MIB
    assert fake_nvml.calls("nvmlDeviceGetMPSComputeRunningProcesses_v3", 0) == 2


def test_before_r450_there_is_no_mps_query_and_it_is_not_asked_again(
    start: Callable[..., NvmlBackend], fake_nvml: FakeNvml
) -> None:
    backend = start(two_gpus([{"pid": 901, "used_memory_mib": 4096, "kind": "mps"}]), pre_r450=True)
    assert backend.processes(GPU0) == ()
    backend.processes(GPU0)
    backend.processes(GPU1)
    assert fake_nvml.calls("nvmlDeviceGetMPSComputeRunningProcesses", -1) == 0  # not even looked up: absent
    assert fake_nvml.calls("nvmlDeviceGetComputeRunningProcesses", -1) == 3


def test_a_list_replaced_at_run_time_is_read_next_time(start: Callable[..., NvmlBackend], fake_nvml: FakeNvml) -> None:
    backend = start(two_gpus(SHARED))
    assert len(backend.processes(GPU0)) == 4
    fake_nvml.control("processes", gpu=0, processes=[{"pid": 77, "used_memory_mib": 1}])
    assert [(p.pid, p.used_memory_bytes) for p in backend.processes(GPU0)] == [(77, MIB)]


# -------------------------------------------------------------- utilisation


def test_utilisation_samples_since_the_last_seen_one(start: Callable[..., NvmlBackend], fake_nvml: FakeNvml) -> None:
    pinned = [
        {"pid": 4100, "used_memory_mib": 100, "sm": 55, "mem": 30, "enc": 2, "dec": 1, "sample_us": 1_000_000},
        {"pid": 4300, "used_memory_mib": 100},  # no sample: idle
    ]
    backend = start(two_gpus(pinned))
    first = by_pid(backend.processes(GPU0))
    assert (first[4100].sm_util, first[4100].mem_util, first[4100].enc_util, first[4100].dec_util) == (55, 30, 2, 1)
    assert first[4300].sm_util is None
    # Asked again with lastSeenTimeStamp = 1000000: nothing newer, so no value (not the old one).
    again = by_pid(backend.processes(GPU0))
    assert again[4100].sm_util is None and again[4100].used_memory_bytes == 100 * MIB
    pinned[0] |= {"sm": 80, "sample_us": 2_000_000}
    fake_nvml.control("processes", gpu=0, processes=pinned)
    assert by_pid(backend.processes(GPU0))[4100].sm_util == 80
    # sizing + fill when there are samples, one NOT_FOUND call when there are none
    assert fake_nvml.calls("nvmlDeviceGetProcessesUtilizationInfo", 0) == 2 + 1 + 2
    assert fake_nvml.calls("nvmlDeviceGetProcessUtilization", 0) == 0


def test_an_old_driver_gives_utilisation_through_nvmlDeviceGetProcessUtilization(
    start: Callable[..., NvmlBackend], fake_nvml: FakeNvml
) -> None:
    backend = start(two_gpus(SHARED), old_driver=True)
    procs = by_pid(backend.processes(GPU0))
    assert procs[4100].sm_util == 55 and procs[4200].enc_util == 5 and procs[4300].sm_util is None
    assert fake_nvml.calls("nvmlDeviceGetProcessUtilization", 0) == 2
    assert fake_nvml.calls("nvmlDeviceGetProcessesUtilizationInfo", -1) == 0  # NVML 12.4+: absent in R470


def test_samples_that_the_driver_renews_are_read_again_once_newer(start: Callable[..., NvmlBackend]) -> None:
    backend = start(two_gpus([{"pid": 4200, "used_memory_mib": 100, "sm": 20}]))
    assert by_pid(backend.processes(GPU0))[4200].sm_util == 20
    # The fake stamps a new sample every 100 ms: a read in the same period sees none, a later one the next.
    deadline = time.monotonic() + 5
    seen_none = seen_again = False
    while time.monotonic() < deadline and not (seen_none and seen_again):
        util = by_pid(backend.processes(GPU0))[4200].sm_util
        seen_none |= util is None
        seen_again |= seen_none and util == 20
    assert seen_none and seen_again


def test_mig_handles_list_their_instance_and_are_not_asked_for_utilisation(
    start: Callable[..., NvmlBackend], fake_nvml: FakeNvml
) -> None:
    backend = start("mig")
    assert backend.processes(MIG_3G) == (GpuProcess(7312, "compute", 11264 * MIB, 2, 0),)
    assert backend.processes(MIG_IDLE) == ()
    # The GPU handle aggregates its instances' processes with their ids (a privileged caller).
    assert {(p.pid, p.gpu_instance_id) for p in backend.processes(MIG_GPU)} == {(7312, 2), (7388, 3), (7420, 9)}
    # NVML: no process utilisation on MIG-enabled GPUs. A MIG handle is never asked; the GPU's
    # NOT_SUPPORTED is remembered, not asked again each read.
    backend.processes(MIG_GPU)
    assert fake_nvml.calls("nvmlDeviceGetProcessesUtilizationInfo", 0) == 1


# ---------------------------------------------------------- support, faults


def test_an_unsupported_query_is_remembered_and_the_others_still_answer(
    start: Callable[..., NvmlBackend], fake_nvml: FakeNvml
) -> None:
    backend = start(two_gpus(SHARED))
    fake_nvml.control(
        "error", gpu=0, call="nvmlDeviceGetGraphicsRunningProcesses", code=NVML_ERROR_NOT_SUPPORTED, count=-1
    )
    assert sorted(p.pid for p in backend.processes(GPU0)) == [4100, 4200, 4400]  # graphics-only 4300 unseen
    backend.processes(GPU0)
    assert fake_nvml.calls("nvmlDeviceGetGraphicsRunningProcesses_v3", 0) == 1  # not asked again
    backend.processes(GPU1)
    assert fake_nvml.calls("nvmlDeviceGetGraphicsRunningProcesses_v3", 1) == 1  # per device


@pytest.mark.parametrize(
    ("error", "raised", "name"),
    [
        ({"code": NVML_ERROR_UNKNOWN}, DeviceError, "NVMLError_Unknown"),
        ({"code": NVML_ERROR_NO_PERMISSION}, MonitorError, "NVMLError_NoPermission"),
    ],
)
def test_a_failed_listing_raises_a_device_or_monitor_error(
    start: Callable[..., NvmlBackend], fake_nvml: FakeNvml, error: dict[str, int], raised: type[DeviceError], name: str
) -> None:
    backend = start(two_gpus(SHARED))
    fake_nvml.control("error", gpu=0, call="nvmlDeviceGetComputeRunningProcesses", **error)
    with pytest.raises(raised) as caught:
        backend.processes(GPU0)
    assert type(caught.value) is raised and caught.value.error == name and GPU0 in str(caught.value)
    assert len(backend.processes(GPU0)) == 4  # one failure: the next read answers


def test_a_utilisation_failure_keeps_the_listing(start: Callable[..., NvmlBackend], fake_nvml: FakeNvml) -> None:
    backend = start(two_gpus(SHARED))
    fake_nvml.control("error", gpu=0, call="nvmlDeviceGetProcessesUtilizationInfo", code=NVML_ERROR_UNKNOWN)
    procs = by_pid(backend.processes(GPU0))
    assert len(procs) == 4 and all(p.sm_util is None for p in procs.values())
    assert by_pid(backend.processes(GPU0))[4100].sm_util == 55  # last-seen unchanged by the failure


def test_a_lost_gpu_raises_device_lost(start: Callable[..., NvmlBackend], fake_nvml: FakeNvml) -> None:
    backend = start(two_gpus(SHARED))
    fake_nvml.control("lost", gpu=0)
    with pytest.raises(DeviceLostError):
        backend.processes(GPU0)
    assert backend.processes(GPU1) == ()


# ------------------------------------------------------- through the collector


def collector(backend: NvmlBackend, process_interval: int, timeout: float = 0.5) -> Collector:
    counters = parse_counters("DCGM_FI_DEV_GPU_TEMP, gauge, t\n", "t.csv")
    return Collector(
        backend,
        counters,
        parse_device_selector("f"),
        interval_s=1.0,
        device_timeout_s=timeout,
        process_interval=process_interval,
    )


PROCESS_SYMBOLS = (
    "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetGraphicsRunningProcesses_v3",
    "nvmlDeviceGetMPSComputeRunningProcesses_v3",
    "nvmlDeviceGetProcessesUtilizationInfo",
    "nvmlDeviceGetProcessUtilization",
)


def test_process_metrics_off_makes_no_process_call_on_nvml(
    start: Callable[..., NvmlBackend], fake_nvml: FakeNvml
) -> None:
    backend = start(two_gpus(SHARED))
    c = collector(backend, 0)
    try:
        for _ in range(3):
            snap = c.run_once()
    finally:
        c.stop()
    assert snap.processes == {} and all(s.up for s in snap.samples)
    assert {s: fake_nvml.calls(s) for s in PROCESS_SYMBOLS} == dict.fromkeys(PROCESS_SYMBOLS, 0)


def test_a_hung_process_query_on_nvml_holds_up_neither_the_cycle_nor_the_samples(
    start: Callable[..., NvmlBackend], fake_nvml: FakeNvml
) -> None:
    backend = start(two_gpus(SHARED))
    c = collector(backend, 1, timeout=0.5)
    try:
        snap = c.run_once()
        assert sorted(p.pid for p in snap.processes[GPU0]) == [4100, 4200, 4300, 4400]
        fake_nvml.control("hang", gpu=0, call="nvmlDeviceGetComputeRunningProcesses", seconds=30)
        t0 = time.monotonic()
        snap = c.run_once()
        assert time.monotonic() - t0 < 2.0  # the deadline, not the 30 s hang
        assert GPU0 not in snap.processes and snap.processes[GPU1] == ()
        assert all(s.up and not s.stale for s in snap.samples)
        fake_nvml.control("clear", gpu=0, call="nvmlDeviceGetComputeRunningProcesses")
        deadline = time.monotonic() + 10
        while GPU0 not in snap.processes:
            assert time.monotonic() < deadline, "the released query never answered"
            snap = c.run_once()
        assert len(snap.processes[GPU0]) == 4
    finally:
        c.stop()


def test_each_driver_build_has_the_process_symbols_of_its_driver(fakenvml_build: Any) -> None:
    new, old, r418 = (
        ctypes.CDLL(str(p)) for p in (fakenvml_build.lib, fakenvml_build.old_lib, fakenvml_build.r418_lib)
    )
    kinds = ("Compute", "Graphics", "MPSCompute")
    v3 = [f"nvmlDeviceGet{k}RunningProcesses_v3" for k in kinds]  # R510
    v2 = [f"nvmlDeviceGet{k}RunningProcesses_v2" for k in kinds] + ["nvmlDeviceGetMPSComputeRunningProcesses"]
    always = ["nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"]
    always.append("nvmlDeviceGetProcessUtilization")
    for symbol in [*v3, *v2, *always, "nvmlDeviceGetProcessesUtilizationInfo"]:
        assert hasattr(new, symbol), symbol
    for symbol in [*v3, "nvmlDeviceGetProcessesUtilizationInfo"]:  # NVML 12.4 (R550) for the latter
        assert not hasattr(old, symbol) and not hasattr(r418, symbol), symbol
    for symbol in v2:  # NVML 11.4's nvml.h declares them, 11.0's does not
        assert hasattr(old, symbol) and not hasattr(r418, symbol), symbol
    for symbol in always:
        assert hasattr(old, symbol) and hasattr(r418, symbol), symbol
