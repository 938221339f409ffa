"""DCGM profiling fields from NVML's GPM API, through the real pynvml binding against the fake."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from exporter.fields import BY_NAME, CATALOGUE, FieldSpec, Gpm
from exporter.nvml import NvmlBackend
from tests.fakenvmllib import load_scenario

GPM_FIELDS = [spec for spec in CATALOGUE if isinstance(spec.reader, Gpm)]
ACTIVITY = [spec for spec in GPM_FIELDS if spec.scope == "instance"]
# DCGM field: (GPM value in percent or MiB/s, exported value)
VALUES: dict[str, tuple[float, float]] = {
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": (87, 0.87),
    "DCGM_FI_PROF_SM_ACTIVE": (71.5, 0.715),
    "DCGM_FI_PROF_SM_OCCUPANCY": (35, 0.35),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": (42, 0.42),
    "DCGM_FI_PROF_DRAM_ACTIVE": (55, 0.55),
    "DCGM_FI_PROF_PIPE_FP64_ACTIVE": (1, 0.01),
    "DCGM_FI_PROF_PIPE_FP32_ACTIVE": (12, 0.12),
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE": (6, 0.06),
    "DCGM_FI_PROF_NVLINK_TX_BYTES": (1500, 1500 * 1048576),
    "DCGM_FI_PROF_NVLINK_RX_BYTES": (250.5, 250.5 * 1048576),
}
GAP_S = 0.12  # NVML wants >100 ms between two samples


@pytest.fixture
def start(fake_nvml: Any) -> Iterator[Callable[..., NvmlBackend]]:
    backends: list[NvmlBackend] = []

    def _start(which: str | dict[str, Any], old_driver: bool = False) -> NvmlBackend:
        backend = NvmlBackend(fake_nvml.use(which, old_driver=old_driver))
        backend.start()
        backends.append(backend)
        return backend

    yield _start
    for backend in backends:
        backend.shutdown()


def live_samples(fake_nvml: Any) -> int:
    lib = ctypes.CDLL(str(fake_nvml.lib_path))
    lib.fakenvml_gpm_samples_live.restype = ctypes.c_ulonglong
    return int(lib.fakenvml_gpm_samples_live())


def gpm_scenario(**device: Any) -> dict[str, Any]:
    fields = {name: raw for name, (raw, _) in VALUES.items()}
    dev: dict[str, Any] = {"uuid": "GPU-c0000000-0000-4000-8000-000000000000", "gpm_supported": True, "fields": fields}
    dev.update(device)
    return {"driver_version": "560.35.03", "devices": [dev]}


def two_reads(backend: NvmlBackend, uuid: str, fields: list[FieldSpec]) -> tuple[Any, Any]:
    first = backend.read(uuid, fields)
    time.sleep(GAP_S)
    return first, backend.read(uuid, fields)


def test_catalogue_maps_dcp_fields_to_gpm() -> None:
    assert {spec.name for spec in GPM_FIELDS} == set(VALUES)
    for spec in ACTIVITY:
        assert spec.scale == 0.01 and spec.type == "gauge"
    assert BY_NAME["DCGM_FI_PROF_SM_ACTIVE"].reader == Gpm(2)
    assert BY_NAME["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"].reader == Gpm(5)  # any tensor pipe
    assert BY_NAME["DCGM_FI_PROF_NVLINK_TX_BYTES"].scope == "gpu"


def test_values_and_scale_after_first_read(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start(gpm_scenario())
    uuid = backend.discover().gpus[0].uuid
    first, second = two_reads(backend, uuid, GPM_FIELDS)
    assert first.values == {} and first.unsupported == set() and first.errors == {}  # needs two samples
    assert second.errors == {} and second.unsupported == set()
    assert second.values == pytest.approx({name: exported for name, (_, exported) in VALUES.items()})
    assert second.values["DCGM_FI_PROF_SM_OCCUPANCY"] == 0.35  # exact: percent / 100
    assert fake_nvml.calls("nvmlGpmQueryDeviceSupport") == 1
    assert fake_nvml.calls("nvmlGpmSampleGet") == 2
    assert fake_nvml.calls("nvmlGpmMetricsGet") == 1  # one call for every requested metric
    time.sleep(GAP_S)
    backend.read(uuid, GPM_FIELDS)
    assert fake_nvml.calls("nvmlGpmQueryDeviceSupport") == 1  # asked once
    assert fake_nvml.calls("nvmlGpmSampleAlloc") == 2  # two samples, reused
    assert live_samples(fake_nvml) == 2
    backend.shutdown()
    assert live_samples(fake_nvml) == 0


def test_values_follow_changes(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start(gpm_scenario())
    uuid = backend.discover().gpus[0].uuid
    fields = [BY_NAME["DCGM_FI_PROF_SM_ACTIVE"]]
    two_reads(backend, uuid, fields)
    fake_nvml.control("set", gpu=0, field="DCGM_FI_PROF_SM_ACTIVE", value=3)
    time.sleep(GAP_S)
    assert backend.read(uuid, fields).values == {"DCGM_FI_PROF_SM_ACTIVE": 0.03}
    fake_nvml.control("set", gpu=0, field="DCGM_FI_PROF_SM_ACTIVE", value=None)
    time.sleep(GAP_S)
    result = backend.read(uuid, fields)
    assert result.values == {} and result.unsupported == {"DCGM_FI_PROF_SM_ACTIVE"}


def test_metric_missing_on_device_is_unsupported(start: Callable[..., NvmlBackend]) -> None:
    scenario = gpm_scenario()
    del scenario["devices"][0]["fields"]["DCGM_FI_PROF_NVLINK_TX_BYTES"]
    backend = start(scenario)
    uuid = backend.discover().gpus[0].uuid
    _, second = two_reads(backend, uuid, GPM_FIELDS)
    assert second.unsupported == {"DCGM_FI_PROF_NVLINK_TX_BYTES"}
    assert len(second.values) == len(GPM_FIELDS) - 1


def test_unsupported_device(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start(gpm_scenario(gpm_supported=False))
    uuid = backend.discover().gpus[0].uuid
    first, second = two_reads(backend, uuid, GPM_FIELDS)
    assert first.unsupported == {spec.name for spec in GPM_FIELDS} and first.values == {}
    assert second.unsupported == first.unsupported and second.values == {}
    assert fake_nvml.calls("nvmlGpmQueryDeviceSupport") == 1
    assert fake_nvml.calls("nvmlGpmSampleAlloc") == 0
    assert fake_nvml.calls("nvmlGpmSampleGet") == 0


def test_shipped_consumer_has_no_gpm(start: Callable[..., NvmlBackend]) -> None:
    backend = start("consumer")
    uuid = backend.discover().gpus[0].uuid
    _, second = two_reads(backend, uuid, GPM_FIELDS)
    assert second.unsupported == {spec.name for spec in GPM_FIELDS}


def test_shipped_h100_values_are_plausible(start: Callable[..., NvmlBackend]) -> None:
    backend = start("h100x8")
    uuid = backend.discover().gpus[3].uuid
    _, second = two_reads(backend, uuid, GPM_FIELDS)
    assert second.errors == {} and second.unsupported == set()
    for spec in ACTIVITY:
        assert 0 <= second.values[spec.name] <= 1, spec.name
    assert 0 < second.values["DCGM_FI_PROF_NVLINK_TX_BYTES"] < 900e9


def test_mig_instances_sampled_per_gpu_instance(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("mig")
    inv = backend.discover()
    gpu0 = inv.gpus[0]
    cfg = load_scenario("mig")["devices"][0]["mig"]["instances"]
    for _ in range(2):
        results = {dev: backend.read(dev, GPM_FIELDS) for dev in [gpu0.uuid, *(m.uuid for m in gpu0.migs)]}
        time.sleep(GAP_S)
    for mig, inst in zip(gpu0.migs, cfg, strict=True):
        result = results[mig.uuid]
        assert result.errors == {}
        # NVLink rates are GPU-wide: not read per MIG device.
        assert result.unsupported == {spec.name for spec in GPM_FIELDS if spec.scope == "gpu"}
        for name, raw in inst["fields"].items():
            assert result.values[name] == pytest.approx(raw / 100), (mig.gpu_instance_id, name)
    # The MIG-enabled parent reports GPU-wide activity.
    parent = results[gpu0.uuid]
    assert parent.errors == {} and parent.unsupported == set()
    assert fake_nvml.calls("nvmlGpmMigSampleGet", 0) == 2 * len(gpu0.migs)
    assert fake_nvml.calls("nvmlGpmSampleGet", 0) == 2
    assert fake_nvml.calls("nvmlGpmQueryDeviceSupport") == 1  # asked once, on the parent


def test_mig_reconfiguration_frees_samples(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("mig")
    gpu0 = backend.discover().gpus[0]
    for mig in gpu0.migs:
        backend.read(mig.uuid, ACTIVITY)
    assert live_samples(fake_nvml) == 2 * len(gpu0.migs)
    fake_nvml.control("mig", gpu=0, enabled=True, instances=[{"gi": 1, "profile": "7g.80gb"}])
    gpu0 = backend.discover().gpus[0]
    assert [m.gpu_instance_id for m in gpu0.migs] == [1]
    assert live_samples(fake_nvml) == 0
    first, second = two_reads(backend, gpu0.migs[0].uuid, ACTIVITY)
    assert first.values == {}
    assert 0.2 <= second.values["DCGM_FI_PROF_SM_ACTIVE"] <= 0.76  # the parent's scenario value (48 ± 28 %)


def test_old_driver_without_gpm_symbols(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start("olddriver", old_driver=True)
    gpus = backend.discover().gpus
    for gpu in gpus:
        first, second = two_reads(backend, gpu.uuid, GPM_FIELDS)
        assert first.unsupported == {spec.name for spec in GPM_FIELDS}
        assert first.errors == {} and second.values == {}


def test_old_driver_gpm_capable_gpu_still_unsupported(start: Callable[..., NvmlBackend]) -> None:
    backend = start(gpm_scenario(), old_driver=True)  # GPU could, driver lacks nvmlGpm*: FunctionNotFound
    uuid = backend.discover().gpus[0].uuid
    _, second = two_reads(backend, uuid, GPM_FIELDS)
    assert second.unsupported == {spec.name for spec in GPM_FIELDS} and second.errors == {}


def test_sample_error_restarts_baseline(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    backend = start(gpm_scenario())
    uuid = backend.discover().gpus[0].uuid
    fields = [BY_NAME["DCGM_FI_PROF_GR_ENGINE_ACTIVE"]]
    two_reads(backend, uuid, fields)
    fake_nvml.control("error", gpu=0, call="nvmlGpmSampleGet", code=999)
    time.sleep(GAP_S)
    failed = backend.read(uuid, fields)
    assert failed.errors == {"DCGM_FI_PROF_GR_ENGINE_ACTIVE": "NVMLError_Unknown"}
    time.sleep(GAP_S)
    assert backend.read(uuid, fields).values == {}  # new baseline
    time.sleep(GAP_S)
    assert backend.read(uuid, fields).values == {"DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.87}


def test_lost_gpu_raises(start: Callable[..., NvmlBackend], fake_nvml: Any) -> None:
    from exporter.backend import DeviceLostError

    backend = start(gpm_scenario())
    uuid = backend.discover().gpus[0].uuid
    backend.read(uuid, GPM_FIELDS)
    fake_nvml.control("lost", gpu=0)
    with pytest.raises(DeviceLostError):
        backend.read(uuid, GPM_FIELDS)
