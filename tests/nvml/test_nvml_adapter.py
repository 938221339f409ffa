"""exporter.nvml.NvmlBackend through the real pynvml binding against the fake libnvidia-ml.so.1."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.backend import BackendError, DeviceError, DeviceLostError, MonitorError
from exporter.fields import BY_NAME, CATALOGUE, FieldSpec, is_polled
from exporter.model import EVENT_MIG_CONFIG_CHANGE, EVENT_XID, Inventory
from exporter.nvml import NvmlBackend

SCENARIOS = Path(__file__).resolve().parent.parent / "fakenvml" / "scenarios"
POLLED = [spec for spec in CATALOGUE if is_polled(spec)]
GPU_SCOPE_FIELDS = [spec for spec in POLLED if spec.scope == "gpu"]
# Symbols newer than R470 (NVML 11.4): build/old lacks them.
NEW_SYMBOLS = (
    "nvmlDeviceGetTemperatureV",
    "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetNumaNodeId",
)
# The forms NVML has declared since R450 (an R470 driver has them): build/r418 lacks them.
R450_SYMBOLS = (
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetPciInfo_v3",
    "nvmlEventSetWait_v2",
)


def scenario(name: str) -> dict[str, Any]:
    with open(SCENARIOS / f"{name}.json", encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def specs(*names: str) -> list[FieldSpec]:
    return [BY_NAME[name] for name in names]


@pytest.fixture
def start(fake_nvml: Any) -> Iterator[Callable[..., NvmlBackend]]:
    """start(scenario, old_driver=False) -> a started NvmlBackend on the fake; shut down after the test."""
    backends: list[NvmlBackend] = []

    def _start(which: str | dict[str, Any], old_driver: bool = False, pre_r450: bool = False) -> NvmlBackend:
        lib = fake_nvml.use(which, old_driver=old_driver, pre_r450=pre_r450)
        backend = NvmlBackend(lib)
        backend.start()
        backends.append(backend)
        return backend

    yield _start
    for backend in backends:
        backend.shutdown()


# ---------------------------------------------------------------- discovery


def test_discovery_h100x8(start: Callable[..., NvmlBackend]) -> None:
    backend = start("h100x8")
    inv = backend.discover()
    assert backend.name == "nvml"
    assert inv.driver_version == "550.90.07"
    assert len(inv.gpus) == 8
    cfg = scenario("h100x8")["devices"]
    for i, gpu in enumerate(inv.gpus):
        assert gpu.index == i
        assert gpu.uuid == cfg[i]["uuid"]
        assert gpu.pci_bus_id == cfg[i]["pci_bus_id"]
        assert gpu.minor == i
        assert gpu.device == f"nvidia{i}"
        assert gpu.name == "NVIDIA H100 80GB HBM3"
        assert gpu.numa_node == (0 if i < 4 else 1)
        assert not gpu.mig_enabled and gpu.migs == ()
    assert len(inv.nvlink_pairs) == 28  # all-to-all
    assert all(a < b for a, b in inv.nvlink_pairs)
    assert backend.discover() == inv


def test_discovery_mig(start: Callable[..., NvmlBackend]) -> None:
    inv = start("mig").discover()
    gpu0, gpu1 = inv.gpus
    assert gpu0.mig_enabled and not gpu1.mig_enabled and gpu1.migs == ()
    got = [(m.profile, m.gpu_instance_id, m.compute_instance_id, m.slot) for m in gpu0.migs]
    assert got == [("3g.40gb", 2, 0, 0), ("2g.20gb", 3, 0, 1), ("1g.10gb", 9, 0, 2), ("1g.10gb", 10, 0, 3)]
    cfg = scenario("mig")["devices"][0]["mig"]["instances"]
    assert [m.uuid for m in gpu0.migs] == [i["uuid"] for i in cfg]
    assert all(m.parent_uuid == gpu0.uuid and m.parent_index == 0 for m in gpu0.migs)
    assert inv.mig_by_uuid(cfg[1]["uuid"]) == gpu0.migs[1]
    assert inv.nvlink_pairs == frozenset({tuple(sorted((gpu0.uuid, gpu1.uuid)))})


def test_discovery_consumer(start: Callable[..., NvmlBackend]) -> None:
    inv = start("consumer").discover()
    (gpu,) = inv.gpus
    assert gpu.name == "NVIDIA GeForce RTX 4090"
    assert gpu.pci_bus_id == "00000000:01:00.0"
    assert gpu.numa_node is None
    assert not gpu.mig_enabled
    assert inv.nvlink_pairs == frozenset()


def test_discovery_pre_r450_driver_uses_fallbacks(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("olddriver", pre_r450=True)
    inv = backend.discover()
    assert inv.driver_version == "470.256.02"
    assert [g.name for g in inv.gpus] == ["Tesla V100-SXM2-16GB"] * 2
    assert [g.pci_bus_id for g in inv.gpus] == ["00000000:06:00.0", "00000000:07:00.0"]
    assert all(g.numa_node is None and not g.mig_enabled for g in inv.gpus)
    assert len(inv.nvlink_pairs) == 1
    assert fake_nvml.calls("nvmlDeviceGetCount") >= 1
    assert fake_nvml.calls("nvmlDeviceGetHandleByIndex") >= 2
    assert fake_nvml.calls("nvmlDeviceGetPciInfo_v2") == 2


# ------------------------------------------------------------------- values

NVLINK_KIB_RATE = 2_000_000  # KiB/s over all links

CONSTANTS: dict[str, tuple[float, float]] = {
    # DCGM field: (value in the NVML unit, expected exported value)
    "DCGM_FI_DEV_SM_CLOCK": (1980, 1980),
    "DCGM_FI_DEV_MEM_CLOCK": (2619, 2619),
    "DCGM_FI_DEV_MEMORY_TEMP": (51, 51),
    "DCGM_FI_DEV_GPU_TEMP": (43, 43),
    "DCGM_FI_DEV_POWER_USAGE": (350500, 350.5),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": (123456789012, 123456789012),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": (7, 7),
    "DCGM_FI_DEV_GPU_UTIL": (87, 87),
    "DCGM_FI_DEV_MEM_COPY_UTIL": (41, 41),
    "DCGM_FI_DEV_ENC_UTIL": (3, 3),
    "DCGM_FI_DEV_DEC_UTIL": (4, 4),
    "DCGM_FI_DEV_VGPU_LICENSE_STATUS": (1, 0),  # bare metal: 0 whatever the license says
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": (2, 2),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": (5, 5),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": (0, 0),
    "DCGM_FI_DEV_ROW_REMAP_PENDING": (1, 1),
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": (11, 11),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": (1, 1),
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL": (111, 111),
    "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL": (3, 3),
    "DCGM_FI_DEV_RETIRED_SBE": (6, 6),
    "DCGM_FI_DEV_RETIRED_DBE": (2, 2),
    "DCGM_FI_DEV_RETIRED_PENDING": (1, 1),
    "DCGM_FI_DEV_CLOCKS_EVENT_REASONS": (0x48, 0x48),
    "DCGM_FI_DEV_POWER_VIOLATION": (5_000_000, 5_000_000),
    "DCGM_FI_DEV_THERMAL_VIOLATION": (7_000, 7_000),
    "DCGM_FI_DEV_SYNC_BOOST_VIOLATION": (1_000, 1_000),
    "DCGM_FI_DEV_BOARD_LIMIT_VIOLATION": (2_000, 2_000),
    "DCGM_FI_DEV_LOW_UTIL_VIOLATION": (3_000_000_000, 3_000_000_000),
    "DCGM_FI_DEV_RELIABILITY_VIOLATION": (4_000, 4_000),
    "DCGM_FI_DEV_POWER_MGMT_LIMIT": (700000, 700),
    "DCGM_FI_DEV_PSTATE": (2, 2),
    "DCGM_FI_DEV_FAN_SPEED": (55, 55),
    "DCGM_FI_DEV_BAR1_USED": (64 * (1 << 20), 64),
    "DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION": (1, 1),
    # GPM (percent -> ratio, MiB/s -> bytes/s); more in tests/nvml/test_gpm.py
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": (90, 0.9),
    "DCGM_FI_PROF_SM_ACTIVE": (80, 0.8),
    "DCGM_FI_PROF_SM_OCCUPANCY": (40, 0.4),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": (50, 0.5),
    "DCGM_FI_PROF_DRAM_ACTIVE": (60, 0.6),
    "DCGM_FI_PROF_PIPE_FP64_ACTIVE": (2, 0.02),
    "DCGM_FI_PROF_PIPE_FP32_ACTIVE": (20, 0.2),
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE": (10, 0.1),
    "DCGM_FI_PROF_NVLINK_TX_BYTES": (1000, 1000 * 1048576),
    "DCGM_FI_PROF_NVLINK_RX_BYTES": (2000, 2000 * 1048576),
}
MEMORY = {"total": 81559 * (1 << 20), "reserved": 542 * (1 << 20), "used": 30000 * (1 << 20)}
PCIE_TX_RATE = 2_000_000_000  # bytes/s
PCIE_RX_RATE = 1_000_000_000


def constant_scenario(**device: Any) -> dict[str, Any]:
    """One GPU where every catalogue field is a constant (PCIe byte counters grow)."""
    fields: dict[str, Any] = {name: value for name, (value, _) in CONSTANTS.items()}
    fields["DCGM_FI_DEV_PCIE_TX_THROUGHPUT"] = {"start": 10**12, "rate": PCIE_TX_RATE}
    fields["DCGM_FI_DEV_PCIE_RX_THROUGHPUT"] = {"start": 10**12, "rate": PCIE_RX_RATE}
    fields["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] = {"start": 10**9, "rate": NVLINK_KIB_RATE}
    dev: dict[str, Any] = {"uuid": "GPU-c0000000-0000-4000-8000-000000000000", "memory": MEMORY, "fields": fields}
    dev["bar1"] = {"total": 128 << 30}
    dev["gpm_supported"] = True
    dev.update(device)
    return {"driver_version": "560.35.03", "devices": [dev]}


def test_every_catalogue_field_converted(start: Callable[..., NvmlBackend]) -> None:
    backend = start(constant_scenario())
    uuid = backend.discover().gpus[0].uuid
    first = backend.read(uuid, POLLED)
    time.sleep(0.3)
    result = backend.read(uuid, POLLED)
    assert result.errors == {} and result.unsupported == set()
    expected = {name: exported for name, (_, exported) in CONSTANTS.items()}
    expected["DCGM_FI_DEV_FB_TOTAL"] = 81559
    expected["DCGM_FI_DEV_FB_RESERVED"] = 542
    expected["DCGM_FI_DEV_FB_USED"] = 30000
    expected["DCGM_FI_DEV_FB_FREE"] = 81559 - 542 - 30000
    for name, value in expected.items():
        assert result.values[name] == pytest.approx(value), name
    # DCGM's NVLink throughput: 0 on the first read, then KiB/s / 1000 (whole).
    assert first.values["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] == 0
    assert result.values["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"].is_integer()
    rates = {
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": NVLINK_KIB_RATE / 1000,
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT": PCIE_TX_RATE / 1024,
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT": PCIE_RX_RATE / 1024,
        "DCGM_FI_PROF_PCIE_TX_BYTES": PCIE_TX_RATE,
        "DCGM_FI_PROF_PCIE_RX_BYTES": PCIE_RX_RATE,
    }
    for name, rate in rates.items():
        assert name == "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL" or name not in first.values  # a rate needs two reads
        assert result.values[name] == pytest.approx(rate, rel=0.1), name
    assert set(result.values) == {spec.name for spec in POLLED}  # nothing in the catalogue left out


def test_shipped_h100_values_are_plausible(start: Callable[..., NvmlBackend]) -> None:
    backend = start("h100x8")
    uuid = backend.discover().gpus[0].uuid
    result = backend.read(uuid, POLLED)
    assert result.errors == {}
    assert result.unsupported == {
        "DCGM_FI_DEV_RETIRED_SBE",
        "DCGM_FI_DEV_RETIRED_DBE",
        "DCGM_FI_DEV_RETIRED_PENDING",
        "DCGM_FI_DEV_FAN_SPEED",
    }
    v = result.values
    assert 70 <= v["DCGM_FI_DEV_POWER_USAGE"] <= 700
    assert v["DCGM_FI_DEV_POWER_MGMT_LIMIT"] == 700
    assert v["DCGM_FI_DEV_FB_TOTAL"] == 81559
    # whole MiB each (bytes // 2**20, as DCGM reports), so the parts may floor 1-2 MiB below the total
    parts = v["DCGM_FI_DEV_FB_FREE"] + v["DCGM_FI_DEV_FB_USED"] + v["DCGM_FI_DEV_FB_RESERVED"]
    assert 81559 - 2 <= parts <= 81559
    assert 0 <= v["DCGM_FI_DEV_GPU_UTIL"] <= 100


def test_consumer_not_supported_fields(start: Callable[..., NvmlBackend]) -> None:
    backend = start("consumer")
    uuid = backend.discover().gpus[0].uuid
    result = backend.read(uuid, POLLED)
    assert result.errors == {}
    for name in (
        "DCGM_FI_DEV_MEMORY_TEMP",
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_RETIRED_SBE",
    ):
        assert name in result.unsupported
    assert 35 <= result.values["DCGM_FI_DEV_FAN_SPEED"] <= 55
    assert result.values["DCGM_FI_DEV_ENC_UTIL"] == 12


def test_not_supported_is_reported_for_the_collector_to_remember(
    start: Callable[..., NvmlBackend], fake_nvml: Any
) -> None:
    # The adapter keeps no memory of NOT_SUPPORTED (the collector owns it and decides when to
    # ask again): it asks what it is asked and says what is unsupported, every time.
    backend = start("h100x8")
    uuid = backend.discover().gpus[0].uuid
    fields = specs(
        "DCGM_FI_DEV_FAN_SPEED", "DCGM_FI_DEV_RETIRED_SBE", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"
    )
    for _ in range(3):
        result = backend.read(uuid, fields)
        assert result.unsupported == {"DCGM_FI_DEV_FAN_SPEED", "DCGM_FI_DEV_RETIRED_SBE"}
        assert set(result.values) == {"DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"}
    assert fake_nvml.calls("nvmlDeviceGetFanSpeed", 0) == 3
    assert fake_nvml.field_requests(0, 29) == 3  # NVML_FI_DEV_RETIRED_SBE
    assert fake_nvml.calls("nvmlDeviceGetFieldValues", 0) == 3  # one batched call per read


def test_whole_call_not_supported_is_an_error_not_a_verdict_on_support(
    start: Callable[..., NvmlBackend], fake_nvml: Any
) -> None:
    backend = start("h100x8")
    uuid = backend.discover().gpus[0].uuid
    fields = specs("DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_GPU_TEMP")
    fake_nvml.control("error", gpu=0, call="nvmlDeviceGetFieldValues", code=3, count=1)
    first = backend.read(uuid, fields)
    assert first.unsupported == set()
    assert first.errors == {
        "DCGM_FI_DEV_ROW_REMAP_FAILURE": "NVMLError_NotSupported",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": "NVMLError_NotSupported",
    }
    assert set(backend.read(uuid, fields).values) == {f.name for f in fields}


@pytest.mark.parametrize(
    ("code", "error"), [(999, DeviceError), (1, MonitorError), (4, MonitorError), (18, MonitorError)]
)
def test_every_field_failing_is_a_whole_device_failure(
    code: int, error: type[Exception], start: Callable[..., NvmlBackend], fake_nvml: Any
) -> None:
    backend = start("h100x8")
    uuid = backend.discover().gpus[0].uuid
    fields = specs("DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE")
    fake_nvml.control("error", gpu=0, call="nvmlDevice*", code=code, count=-1)
    with pytest.raises(error) as info:
        backend.read(uuid, fields)
    assert type(info.value) is error  # NVML_ERROR_UNKNOWN is the device's; the others are ours
    assert isinstance(info.value, DeviceError) and info.value.error.startswith("NVMLError_")


def test_ecc_off_entries_are_unsupported(start: Callable[..., NvmlBackend]) -> None:
    backend = start(constant_scenario(ecc=False))
    uuid = backend.discover().gpus[0].uuid
    ecc = [f"DCGM_FI_DEV_ECC_{k}_TOTAL" for k in ("SBE_VOL", "DBE_VOL", "SBE_AGG", "DBE_AGG")]
    result = backend.read(uuid, specs(*ecc, "DCGM_FI_DEV_MEMORY_TEMP"))
    assert result.unsupported == set(ecc)
    assert result.values == {"DCGM_FI_DEV_MEMORY_TEMP": 51}


def test_memory_temp_out_of_range_is_an_error(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start(constant_scenario())
    uuid = backend.discover().gpus[0].uuid
    fake_nvml.control("set", gpu=0, field="DCGM_FI_DEV_MEMORY_TEMP", value=255)
    result = backend.read(uuid, specs("DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_GPU_TEMP"))
    assert result.errors == {"DCGM_FI_DEV_MEMORY_TEMP": "InvalidValue"}
    assert result.values == {"DCGM_FI_DEV_GPU_TEMP": 43}


def test_set_op_changes_values(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start(constant_scenario())
    uuid = backend.discover().gpus[0].uuid
    fake_nvml.control("set", gpu=0, field="DCGM_FI_DEV_POWER_USAGE", value=123000)
    fake_nvml.control("set", gpu=0, field="DCGM_FI_DEV_ROW_REMAP_FAILURE", value=1)
    result = backend.read(uuid, specs("DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_ROW_REMAP_FAILURE"))
    assert result.values == {"DCGM_FI_DEV_POWER_USAGE": 123.0, "DCGM_FI_DEV_ROW_REMAP_FAILURE": 1}


def test_vgpu_license_counts_only_the_vgpu_feature(start: Callable[..., NvmlBackend]) -> None:
    # The fake guest holds a licensed Virtual Compute Server feature (code 4), not the vGPU one (1):
    # DCGM reports 1 only for a licensed vGPU feature.
    backend = start(constant_scenario(virtualization_mode=2))
    uuid = backend.discover().gpus[0].uuid
    assert backend.read(uuid, specs("DCGM_FI_DEV_VGPU_LICENSE_STATUS")).values == {
        "DCGM_FI_DEV_VGPU_LICENSE_STATUS": 0.0
    }


def test_dcgm_value_rules(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    """Power limit in whole watts, P-state 32 passed through, a GPU temperature above 200 C dropped."""
    backend = start(constant_scenario())
    uuid = backend.discover().gpus[0].uuid
    fake_nvml.control("set", gpu=0, field="DCGM_FI_DEV_POWER_MGMT_LIMIT", value=299_500)
    fake_nvml.control("set", gpu=0, field="DCGM_FI_DEV_PSTATE", value=32)
    fake_nvml.control("set", gpu=0, field="DCGM_FI_DEV_GPU_TEMP", value=255)
    result = backend.read(uuid, specs("DCGM_FI_DEV_POWER_MGMT_LIMIT", "DCGM_FI_DEV_PSTATE", "DCGM_FI_DEV_GPU_TEMP"))
    assert result.values == {"DCGM_FI_DEV_POWER_MGMT_LIMIT": 299.0, "DCGM_FI_DEV_PSTATE": 32.0}
    assert result.errors == {} and result.unsupported == set()


def test_old_driver_reads_through_fallbacks(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("olddriver", old_driver=True)
    uuid = backend.discover().gpus[1].uuid
    result = backend.read(uuid, POLLED)
    assert result.errors == {}
    assert {
        "DCGM_FI_DEV_FB_RESERVED",  # needs nvmlDeviceGetMemoryInfo_v2
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
        "DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION",
    } <= result.unsupported
    v = result.values
    assert v["DCGM_FI_DEV_RETIRED_SBE"] == 1
    assert v["DCGM_FI_DEV_ECC_SBE_AGG_TOTAL"] == 2
    assert v["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"] == 1
    assert 32 <= v["DCGM_FI_DEV_GPU_TEMP"] <= 48
    assert v["DCGM_FI_DEV_FB_TOTAL"] == 16945512448 // (1 << 20)  # whole MiB, as DCGM reports
    assert v["DCGM_FI_DEV_FB_FREE"] + v["DCGM_FI_DEV_FB_USED"] == pytest.approx(v["DCGM_FI_DEV_FB_TOTAL"], abs=2)
    assert fake_nvml.calls("nvmlDeviceGetTemperature", 1) == 1
    assert fake_nvml.calls("nvmlDeviceGetCurrentClocksThrottleReasons", 1) == 1
    assert fake_nvml.calls("nvmlDeviceGetMemoryInfo", 1) == 1


def test_mig_device_reads_instance_fields_only(start: Callable[..., NvmlBackend]) -> None:
    backend = start("mig")
    inv = backend.discover()
    mig = inv.gpus[0].migs[0]  # 3g.40gb
    result = backend.read(mig.uuid, POLLED)
    assert result.errors == {}
    assert result.unsupported == {spec.name for spec in GPU_SCOPE_FIELDS}
    assert result.values == {
        "DCGM_FI_DEV_FB_TOTAL": 40192,
        "DCGM_FI_DEV_FB_RESERVED": 20,
        "DCGM_FI_DEV_FB_USED": 12000,
        "DCGM_FI_DEV_FB_FREE": 40192 - 20 - 12000,
        "DCGM_FI_DEV_BAR1_USED": 2,
    }
    parent = backend.read(inv.gpus[0].uuid, specs("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_POWER_USAGE"))
    assert parent.unsupported == {"DCGM_FI_DEV_GPU_UTIL"}  # not on a MIG-enabled GPU
    assert "DCGM_FI_DEV_POWER_USAGE" in parent.values


def test_rate_fields(start: Callable[..., NvmlBackend]) -> None:
    backend = start(constant_scenario())
    uuid = backend.discover().gpus[0].uuid
    tx = specs("DCGM_FI_DEV_PCIE_TX_THROUGHPUT")
    assert backend.read(uuid, tx).values == {}
    values = []
    for _ in range(2):
        time.sleep(0.2)
        values.append(backend.read(uuid, tx).values["DCGM_FI_DEV_PCIE_TX_THROUGHPUT"])
    assert values == [pytest.approx(PCIE_TX_RATE / 1024, rel=0.1)] * 2


# ------------------------------------------------------------------- faults


def test_lost_gpu_raises_while_others_read(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("h100x8")
    inv = backend.discover()
    temp = specs("DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL")
    fake_nvml.control("lost", gpu=3)
    with pytest.raises(DeviceLostError) as info:
        backend.read(inv.gpus[3].uuid, temp)
    assert info.value.args == (inv.gpus[3].uuid,)
    for i in (0, 2, 7):
        assert "DCGM_FI_DEV_GPU_TEMP" in backend.read(inv.gpus[i].uuid, temp).values
    assert backend.discover().gpus == inv.gpus  # still listed with its last known identity
    fake_nvml.control("recover", gpu=3)
    assert "DCGM_FI_DEV_GPU_TEMP" in backend.read(inv.gpus[3].uuid, temp).values


def test_vanished_gpu_leaves_the_inventory(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("h100x8")
    inv = backend.discover()
    fake_nvml.control("vanish", gpu=7)
    after = backend.discover()
    assert [g.uuid for g in after.gpus] == [g.uuid for g in inv.gpus[:7]]
    with pytest.raises(DeviceLostError):
        backend.read(inv.gpus[7].uuid, specs("DCGM_FI_DEV_GPU_TEMP"))
    with pytest.raises(DeviceLostError):
        backend.read("GPU-does-not-exist", specs("DCGM_FI_DEV_GPU_TEMP"))


def test_hang_blocks_only_that_thread(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("h100x8")
    inv = backend.discover()
    power = specs("DCGM_FI_DEV_POWER_USAGE")
    fake_nvml.control("hang", gpu=0, call="nvmlDeviceGetPowerUsage", seconds=1.5, count=1)
    hung: dict[str, float] = {}

    def read_gpu0() -> None:
        t0 = time.monotonic()
        backend.read(inv.gpus[0].uuid, power)
        hung["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=read_gpu0, daemon=True)
    thread.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    for gpu in inv.gpus[1:]:
        assert "DCGM_FI_DEV_POWER_USAGE" in backend.read(gpu.uuid, power).values
    assert time.monotonic() - t0 < 0.5
    assert thread.is_alive()
    thread.join(5)
    assert hung["elapsed"] >= 1.3
    t0 = time.monotonic()
    backend.read(inv.gpus[0].uuid, power)  # count=1: only the next call hung
    assert time.monotonic() - t0 < 0.5


def test_hang_released_by_clear(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("h100x8")
    uuid = backend.discover().gpus[1].uuid
    fake_nvml.control("hang", gpu=1, call="nvmlDeviceGetFieldValues", seconds=30)
    done = threading.Event()

    def read() -> None:
        backend.read(uuid, specs("DCGM_FI_DEV_MEMORY_TEMP"))
        done.set()

    thread = threading.Thread(target=read)
    thread.start()
    assert not done.wait(0.3)
    fake_nvml.control("hang", gpu=1, call="nvmlDeviceGetFieldValues", seconds=0)
    assert done.wait(2)
    thread.join()


def test_error_op(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("h100x8")
    uuid = backend.discover().gpus[0].uuid
    fields = specs(
        "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_SM_CLOCK"
    )
    fake_nvml.control("error", gpu=0, call="nvmlDeviceGetFieldValues", code=999, count=1)
    fake_nvml.control("error", gpu=0, call="nvmlDeviceGetPowerUsage", code=10, count=2)
    first = backend.read(uuid, fields)
    assert first.errors == {
        "DCGM_FI_DEV_MEMORY_TEMP": "NVMLError_Unknown",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": "NVMLError_Unknown",
        "DCGM_FI_DEV_POWER_USAGE": "NVMLError_Timeout",
    }
    assert set(first.values) == {"DCGM_FI_DEV_SM_CLOCK"}  # one field read: not a whole-device failure
    second = backend.read(uuid, fields)
    assert second.errors == {"DCGM_FI_DEV_POWER_USAGE": "NVMLError_Timeout"}
    assert set(second.values) == {"DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "DCGM_FI_DEV_SM_CLOCK"}
    third = backend.read(uuid, fields)
    assert third.errors == {} and len(third.values) == 4
    fake_nvml.control("error", gpu=0, call="nvmlDeviceGetFieldValues", code=15)
    with pytest.raises(DeviceLostError):
        backend.read(uuid, fields)


def test_start_failures(fake_nvml: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BackendError, match="cannot load NVML library"):
        NvmlBackend(str(tmp_path / "missing" / "libnvidia-ml.so.1")).start()
    lib = fake_nvml.use("h100x8")
    monkeypatch.delenv("FAKENVML_CONFIG")
    with pytest.raises(BackendError, match="driver not loaded"):
        NvmlBackend(lib).start()
    broken = scenario("h100x8")
    broken["init_error"] = 18
    lib = fake_nvml.use(broken)
    with pytest.raises(BackendError, match="versions differ"):
        NvmlBackend(lib).start()


def test_scenarios_switch_in_one_process(start: Callable[..., NvmlBackend]) -> None:
    first = start("consumer")
    assert len(first.discover().gpus) == 1
    first.shutdown()
    second = start("olddriver", old_driver=True)
    assert len(second.discover().gpus) == 2
    second.shutdown()
    third = start("h100x8")
    assert len(third.discover().gpus) == 8


# ------------------------------------------------------------------- events


def wait_for(source: Any, count: int, timeout_s: float = 2.0) -> list[Any]:
    events: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(events) < count and time.monotonic() < deadline:
        events += source.wait(0.2)
    return events


def test_xid_events_with_mig_attribution(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("mig")
    inv: Inventory = backend.discover()
    source = backend.open_events(inv)
    try:
        t0 = time.monotonic()
        assert source.wait(0.05) == []
        assert time.monotonic() - t0 < 0.5
        fake_nvml.control("xid", gpu=0, xid=31, gi=3, ci=0)
        t0 = time.monotonic()
        (event,) = source.wait(2.0)
        assert time.monotonic() - t0 < 0.1  # control ops are delivered promptly
        assert event.gpu_uuid == inv.gpus[0].uuid
        assert (event.event_type, event.xid) == (EVENT_XID, 31)
        assert (event.gpu_instance_id, event.compute_instance_id) == (3, 0)
        assert event.timestamp > 0
        fake_nvml.control("xid", gpu=1, xid=79)
        fake_nvml.control("xid", gpu=0, xid=48)
        events = wait_for(source, 2)
        assert [(e.gpu_uuid, e.xid, e.gpu_instance_id, e.compute_instance_id) for e in events] == [
            (inv.gpus[1].uuid, 79, None, None),
            (inv.gpus[0].uuid, 48, None, None),
        ]
    finally:
        source.close()
        source.close()


def test_event_wait_gpu_lost_and_rebuild(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("h100x8")
    inv = backend.discover()
    source = backend.open_events(inv)
    fake_nvml.control("lost", gpu=5)
    with pytest.raises(DeviceLostError) as info:
        source.wait(1.0)
    assert info.value.args == (inv.gpus[5].uuid,)
    source.close()
    rebuilt = backend.open_events(backend.discover())
    try:
        assert inv.gpus[5].uuid not in rebuilt.registered
        assert len(rebuilt.registered) == 7
        assert rebuilt.wait(0.05) == []
        fake_nvml.control("xid", gpu=2, xid=94)
        (event,) = wait_for(rebuilt, 1)
        assert (event.gpu_uuid, event.xid) == (inv.gpus[2].uuid, 94)
    finally:
        rebuilt.close()


def test_mig_reconfiguration_event(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("mig")
    inv = backend.discover()
    source = backend.open_events(inv)
    try:
        layout: dict[str, Any] = {
            "gi": 1,
            "ci": 0,
            "profile": "7g.80gb",
            "uuid": "MIG-aaaaaaaa-0000-5000-8000-000000000001",
            "memory": {"total": 81559 << 20},  # DCGM's name: 7 slices, ceil(81559 MiB / 1024) GiB
        }
        fake_nvml.control("mig", gpu=0, enabled=True, instances=[layout])
        (event,) = wait_for(source, 1)
        assert (event.gpu_uuid, event.event_type) == (inv.gpus[0].uuid, EVENT_MIG_CONFIG_CHANGE)
        after = backend.discover()
        assert [(m.uuid, m.profile) for m in after.gpus[0].migs] == [(layout["uuid"], "7g.80gb")]
        assert after.layout_key() != inv.layout_key()
        with pytest.raises(DeviceLostError):
            backend.read(inv.gpus[0].migs[0].uuid, specs("DCGM_FI_DEV_FB_USED"))
        assert "DCGM_FI_DEV_FB_TOTAL" in backend.read(layout["uuid"], specs("DCGM_FI_DEV_FB_TOTAL")).values
    finally:
        source.close()


def test_event_mask_follows_supported_types(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("consumer")  # no ECC: SBE/DBE are not supported event types
    inv = backend.discover()
    source = backend.open_events(inv)
    try:
        assert source.registered == (inv.gpus[0].uuid,)
        fake_nvml.control("event", gpu=0, type=2)  # DBE: not registered, not delivered
        fake_nvml.control("xid", gpu=0, xid=13)
        (event,) = wait_for(source, 1)
        assert event.xid == 13
        assert source.wait(0.1) == []
    finally:
        source.close()


def test_pre_r450_driver_events(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("olddriver", pre_r450=True)  # nvmlEventSetWait v1: no instance ids
    inv = backend.discover()
    source = backend.open_events(inv)
    try:
        fake_nvml.control("xid", gpu=1, xid=63)
        fake_nvml.control("event", gpu=0, type=2)
        events = wait_for(source, 2)
        assert [(e.gpu_uuid, e.event_type, e.xid, e.gpu_instance_id) for e in events] == [
            (inv.gpus[1].uuid, EVENT_XID, 63, None),
            (inv.gpus[0].uuid, 2, 0, None),
        ]
        assert fake_nvml.calls("nvmlEventSetWait") >= 1
    finally:
        source.close()


# ------------------------------------------------------------- the library


def test_old_driver_build_lacks_new_symbols(fakenvml_build: Any) -> None:
    new = ctypes.CDLL(str(fakenvml_build.lib))
    old = ctypes.CDLL(str(fakenvml_build.old_lib))
    r418 = ctypes.CDLL(str(fakenvml_build.r418_lib))
    for symbol in NEW_SYMBOLS:
        assert hasattr(new, symbol), symbol
        assert not hasattr(old, symbol), symbol
        assert not hasattr(r418, symbol), symbol
    for symbol in R450_SYMBOLS:  # an R470 driver has them (NVML 11.4's nvml.h declares them)
        assert hasattr(new, symbol) and hasattr(old, symbol), symbol
        assert not hasattr(r418, symbol), symbol
    for symbol in ("nvmlInitWithFlags", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlEventSetWait"):
        assert hasattr(old, symbol) and hasattr(r418, symbol), symbol


def test_loads_through_ld_library_path_in_a_subprocess(fake_nvml: Any) -> None:
    fake_nvml.use("mig")
    code = (
        "from exporter.nvml import NvmlBackend\n"
        "b = NvmlBackend(); b.start(); inv = b.discover()\n"
        "print(len(inv.gpus), len(inv.gpus[0].migs), inv.driver_version); b.shutdown()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=fake_nvml.env(), capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "4", "550.90.07"]
