"""Tests of the simulated backend (`--simulate`)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from exporter.backend import BackendError, DeviceError, DeviceLostError
from exporter.fields import BY_NAME, CATALOGUE, DCGM_DEFAULT_SET, Dcp, FieldSpec, is_polled
from exporter.model import EVENT_DOUBLE_BIT_ECC, EVENT_XID, DeviceEvent
from exporter.simulate import SimulatedBackend
from tests.simulate.simnode import Clock, make

POLLED = tuple(f for f in CATALOGUE if is_polled(f))
DEFAULT_POLLED = tuple(BY_NAME[n] for n in DCGM_DEFAULT_SET if is_polled(BY_NAME[n]))
COUNTERS = (
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
    "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "DCGM_FI_DEV_POWER_VIOLATION",
    "DCGM_FI_DEV_THERMAL_VIOLATION",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
)


def read_all(b: SimulatedBackend, uuid: str, fields: tuple[FieldSpec, ...] = POLLED) -> dict[str, float]:
    return b.read(uuid, fields).values


# --- inventory ---------------------------------------------------------------


def test_default_node_inventory() -> None:
    b, _ = make()
    assert b.name == "simulated"
    b.start()
    inv = b.discover()
    assert inv.driver_version == "570.124.06"
    assert len(inv.gpus) == 8
    assert [g.index for g in inv.gpus] == list(range(8))
    assert [g.minor for g in inv.gpus] == list(range(8))
    assert {g.name for g in inv.gpus} == {"NVIDIA H100 80GB HBM3"}
    assert [g.numa_node for g in inv.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    uuids = [g.uuid for g in inv.gpus]
    assert len(set(uuids)) == 8
    for u in uuids:
        assert re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", u)
    assert inv.gpus[0].pci_bus_id == "00000000:18:00.0"
    assert len({g.pci_bus_id for g in inv.gpus}) == 8
    for g in inv.gpus:
        assert re.fullmatch(r"[0-9A-F]{8}:[0-9A-F]{2}:00\.0", g.pci_bus_id)
        assert not g.mig_enabled and g.migs == ()
    # NVSwitch: all-to-all.
    assert len(inv.nvlink_pairs) == 28
    assert all(a < b for a, b in inv.nvlink_pairs)
    assert b.discover() is inv  # cached while nothing changes
    b.shutdown()


def test_spec_equivalents_of_default() -> None:
    a, _ = make()
    for spec in ("", "h100x8", "model=h100,gpus=8", " h100x8 , seed=0 "):
        b, _ = make(spec)
        assert b.discover() == a.discover(), spec


@pytest.mark.parametrize(
    ("spec", "n", "name", "pairs"),
    [
        ("a100x4", 4, "NVIDIA A100-SXM4-80GB", 6),
        ("l4x2", 2, "NVIDIA L4", 0),
        ("rtx4090", 8, "NVIDIA GeForce RTX 4090", 0),
        ("model=v100", 8, "Tesla V100-SXM2-32GB", 16),  # DGX-1 hybrid cube mesh
        ("gpus=16", 16, "NVIDIA H100 80GB HBM3", 56),  # two 8-GPU boards
    ],
)
def test_models_and_sizes(spec: str, n: int, name: str, pairs: int) -> None:
    b, _ = make(spec)
    inv = b.discover()
    assert len(inv.gpus) == n
    assert inv.gpus[0].name == name
    assert len(inv.nvlink_pairs) == pairs
    assert len({g.pci_bus_id for g in inv.gpus}) == n


# --- values ------------------------------------------------------------------

RANGES = {
    "DCGM_FI_DEV_SM_CLOCK": (300, 1980),
    "DCGM_FI_DEV_MEM_CLOCK": (2619, 2619),
    "DCGM_FI_DEV_MEMORY_TEMP": (20, 95),
    "DCGM_FI_DEV_GPU_TEMP": (20, 90),
    "DCGM_FI_DEV_POWER_USAGE": (50, 700),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": (1e9, 1e13),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": (0, 100),
    "DCGM_FI_DEV_GPU_UTIL": (0, 100),
    "DCGM_FI_DEV_MEM_COPY_UTIL": (0, 100),
    "DCGM_FI_DEV_ENC_UTIL": (0, 100),
    "DCGM_FI_DEV_DEC_UTIL": (0, 100),
    "DCGM_FI_DEV_FB_FREE": (0, 81559),
    "DCGM_FI_DEV_FB_USED": (0, 81559),
    "DCGM_FI_DEV_FB_RESERVED": (1, 2048),
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": (0, 1e16),
    "DCGM_FI_DEV_VGPU_LICENSE_STATUS": (0, 0),
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": (0, 0),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": (0, 10),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": (0, 0),
    "DCGM_FI_PROF_PCIE_TX_BYTES": (1, 64e9),
    "DCGM_FI_PROF_PCIE_RX_BYTES": (1, 64e9),
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": (0, 1),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": (0, 1),
    "DCGM_FI_PROF_DRAM_ACTIVE": (0, 1),
}


def test_default_node_gives_every_non_dcp_default_field() -> None:
    expected = {f.name for f in DEFAULT_POLLED}
    assert "DCGM_FI_DEV_XID_ERRORS" not in expected and "DCGM_FI_DRIVER_VERSION" not in expected
    assert len(expected) == 24  # 19 DEV fields + PCIe TX/RX bytes from NVML counters + 3 GPM fields (H100)
    b, clock = make()
    inv = b.discover()
    for _ in range(3):
        for g in inv.gpus:
            res = b.read(g.uuid, DEFAULT_POLLED)
            assert set(res.values) == expected, g.index
            assert not res.unsupported and not res.errors
            for name, v in res.values.items():
                lo, hi = RANGES[name]
                assert lo <= v <= hi, (g.index, name, v)
        clock.advance(97.3)


def test_h100_health_fields_like_nvml() -> None:
    b, _ = make()
    uuid = b.discover().gpus[0].uuid
    res = b.read(uuid, POLLED)
    # Passive cooling, row-remapping GPU: no fan, no retired pages.
    assert res.unsupported == {
        "DCGM_FI_DEV_FAN_SPEED",
        "DCGM_FI_DEV_RETIRED_SBE",
        "DCGM_FI_DEV_RETIRED_DBE",
        "DCGM_FI_DEV_RETIRED_PENDING",
    }
    v = res.values
    assert v["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"] == 0 == v["DCGM_FI_DEV_ECC_DBE_AGG_TOTAL"]
    assert v["DCGM_FI_DEV_ECC_SBE_AGG_TOTAL"] >= v["DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"]
    assert v["DCGM_FI_DEV_POWER_MGMT_LIMIT"] == 700
    assert v["DCGM_FI_DEV_ROW_REMAP_PENDING"] == 0
    assert v["DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION"] == 0
    assert v["DCGM_FI_DEV_PCIE_TX_THROUGHPUT"] == int(v["DCGM_FI_PROF_PCIE_TX_BYTES"] / 1024)
    # DCP fields are never produced.
    dcp = tuple(f for f in CATALOGUE if isinstance(f.reader, Dcp))
    assert b.read(uuid, dcp).unsupported == {f.name for f in dcp}


def test_other_models_support_matrix() -> None:
    v100, _ = make("v100x2")
    res = v100.read(v100.discover().gpus[0].uuid, POLLED)
    assert "DCGM_FI_DEV_RETIRED_SBE" in res.values and "DCGM_FI_DEV_RETIRED_PENDING" in res.values
    assert "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS" in res.unsupported
    rtx, _ = make("rtx4090x1")
    res = rtx.read(rtx.discover().gpus[0].uuid, POLLED)
    assert 30 <= res.values["DCGM_FI_DEV_FAN_SPEED"] <= 100
    for name in (
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "DCGM_FI_DEV_MEMORY_TEMP",
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_VGPU_LICENSE_STATUS",
    ):
        assert name in res.unsupported
    l4, _ = make("l4x1")
    res = l4.read(l4.discover().gpus[0].uuid, POLLED)
    assert res.values["DCGM_FI_DEV_POWER_MGMT_LIMIT"] == 72
    assert "DCGM_FI_DEV_FAN_SPEED" in res.unsupported


def test_workloads_busy_and_idle() -> None:
    b, clock = make()
    inv = b.discover()
    idle_seen, busy_seen = set(), set()
    for _ in range(60):
        for g in inv.gpus:
            v = read_all(b, g.uuid)
            util, power = v["DCGM_FI_DEV_GPU_UTIL"], v["DCGM_FI_DEV_POWER_USAGE"]
            assert 0 < power <= v["DCGM_FI_DEV_POWER_MGMT_LIMIT"]
            if util == 0:
                idle_seen.add(g.index)
                assert v["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"] == 1  # GpuIdle
                assert power < 100
            if util >= 80:
                busy_seen.add(g.index)
                assert v["DCGM_FI_DEV_PSTATE"] == 0
                assert v["DCGM_FI_DEV_SM_CLOCK"] >= 1500
                assert power > 300
        clock.advance(10)
    assert {3, 7} <= idle_seen  # "hold" and "idle" GPUs: allocated-but-idle dashboards have data
    assert {0, 1, 4} <= busy_seen  # training GPUs
    # GPU 3 holds memory while idle; GPU 7 holds none.
    assert read_all(b, inv.gpus[3].uuid)["DCGM_FI_DEV_FB_USED"] > 1000
    assert read_all(b, inv.gpus[7].uuid)["DCGM_FI_DEV_FB_USED"] == 0


def test_values_change_over_time() -> None:
    b, clock = make()
    uuid = b.discover().gpus[2].uuid  # inference: wanders
    seen: dict[str, set[float]] = {}
    for _ in range(30):
        for k, v in read_all(b, uuid).items():
            seen.setdefault(k, set()).add(v)
        clock.advance(7)
    for name in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
    ):
        assert len(seen[name]) > 5, name


def test_counters_monotonic_and_energy_is_power_times_time() -> None:
    b, clock = make()
    inv = b.discover()
    prev = {g.uuid: read_all(b, g.uuid) for g in inv.gpus}
    for step in range(400):
        clock.advance(0.37 + (step % 7) * 1.1)
        for g in inv.gpus:
            cur = read_all(b, g.uuid)
            for name in COUNTERS:
                assert cur[name] >= prev[g.uuid][name], (g.index, name)
            prev[g.uuid] = cur
    # Energy grows by about power * dt (mJ): check over one quiet second on an idle GPU.
    uuid = inv.gpus[7].uuid
    clock.t = float(int(clock.t) + 1)
    e0 = read_all(b, uuid)
    clock.advance(0.5)
    e1 = read_all(b, uuid)
    energy = e1["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] - e0["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]
    assert energy == pytest.approx(e0["DCGM_FI_DEV_POWER_USAGE"] * 500, abs=2)


def test_power_capping_grows_power_violation() -> None:
    b, clock = make("workload=all:train,gpus=2")
    uuid = b.discover().gpus[0].uuid
    v0 = read_all(b, uuid)
    capped = 0
    for _ in range(300):
        clock.advance(1)
        v = read_all(b, uuid)
        if v["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"] == 4:  # SwPowerCap
            capped += 1
            assert v["DCGM_FI_DEV_POWER_USAGE"] >= 0.98 * 700
    assert capped > 0
    assert read_all(b, uuid)["DCGM_FI_DEV_POWER_VIOLATION"] > v0["DCGM_FI_DEV_POWER_VIOLATION"]


def test_memory_sums_to_total() -> None:
    b, clock = make("mig=1:3g.40gb+2g.20gb+1g.10gb*2")
    inv = b.discover()
    uuids = [g.uuid for g in inv.gpus] + [m.uuid for g in inv.gpus for m in g.migs]
    for _ in range(20):
        for u in uuids:
            v = read_all(b, u)
            assert v["DCGM_FI_DEV_FB_USED"] >= 0 and v["DCGM_FI_DEV_FB_FREE"] >= 0
            total = v["DCGM_FI_DEV_FB_FREE"] + v["DCGM_FI_DEV_FB_USED"] + v["DCGM_FI_DEV_FB_RESERVED"]
            assert total == v["DCGM_FI_DEV_FB_TOTAL"], u
        clock.advance(13)


# --- MIG -------------------------------------------------------------------


def test_mig_layout_discovered() -> None:
    b, _ = make("mig=0:3g.40gb+2g.20gb+1g.10gb+1g.10gb;2:1g.10gb*7")
    inv = b.discover()
    g0 = inv.gpus[0]
    assert g0.mig_enabled
    assert [(m.profile, m.gpu_instance_id, m.compute_instance_id, m.slot) for m in g0.migs] == [
        ("3g.40gb", 2, 0, 0),
        ("2g.20gb", 3, 0, 1),
        ("1g.10gb", 9, 0, 2),
        ("1g.10gb", 10, 0, 3),
    ]
    for m in g0.migs:
        assert m.parent_uuid == g0.uuid and m.parent_index == 0
        assert re.fullmatch(r"MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", m.uuid)
    assert [m.gpu_instance_id for m in inv.gpus[2].migs] == list(range(7, 14))
    assert not inv.gpus[1].mig_enabled
    all_migs = [m.uuid for g in inv.gpus for m in g.migs]
    assert len(set(all_migs)) == 11
    assert inv.mig_by_uuid(g0.migs[1].uuid) == g0.migs[1]
    # Per-instance memory.
    totals = [b.read(m.uuid, POLLED).values["DCGM_FI_DEV_FB_TOTAL"] for m in g0.migs]
    assert totals == [40448, 20096, 9984, 9984]


def test_mig_reads() -> None:
    b, _ = make("mig=0:3g.40gb+4g.40gb")
    g0 = b.discover().gpus[0]
    parent = b.read(g0.uuid, POLLED)
    for name in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "DCGM_FI_DEV_ENC_UTIL",
        "DCGM_FI_DEV_DEC_UTIL",
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
    ):
        assert name in parent.unsupported
    # GPU-wide values are still there on the parent.
    for name in (
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_FB_USED",
    ):
        assert name in parent.values
    mig = b.read(g0.migs[0].uuid, POLLED)
    instance = {f.name for f in POLLED if f.scope == "instance"}
    assert set(mig.values) == instance
    assert mig.unsupported == {f.name for f in POLLED} - instance
    # The parent's used memory is the instances' used memory.
    used = sum(b.read(m.uuid, POLLED).values["DCGM_FI_DEV_FB_USED"] for m in g0.migs)
    assert parent.values["DCGM_FI_DEV_FB_USED"] == used
    # A non-MIG GPU on the same node keeps utilisation.
    assert "DCGM_FI_DEV_GPU_UTIL" in b.read(b.discover().gpus[1].uuid, POLLED).values


def test_mig_enabled_without_instances() -> None:
    b, _ = make("mig=0:")
    g0 = b.discover().gpus[0]
    assert g0.mig_enabled and g0.migs == ()
    res = b.read(g0.uuid, POLLED)
    assert "DCGM_FI_DEV_GPU_UTIL" in res.unsupported
    assert res.values["DCGM_FI_DEV_FB_USED"] == 0


# --- spec parsing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("gpus=0", "gpus='0'"),
        ("gpus=many", "gpus='many'"),
        ("model=b200", "model='b200'"),
        ("colour=red", "'colour'"),
        ("h200x8", "'h200x8'"),
        ("seed=-1", "seed='-1'"),
        ("driver=latest", "driver='latest'"),
        ("mig=0:9g.90gb", "'9g.90gb'"),
        ("mig=0:3g.40gb*3", "3g.40gb does not fit"),
        ("mig=0", "mig item '0'"),
        ("mig=8:1g.10gb", "GPU 8 does not exist"),
        ("model=l4,mig=0:1g.10gb", "does not support MIG"),
        ("workload=0:sleep", "workload item '0:sleep'"),
        ("faults=xid:9:31@1", "fault 'xid:9:31@1'"),
        ("faults=xid:0:abc@1", "XID 'abc'"),
        ("faults=xid:0:31@soon", "bad time 'soon'"),
        ("faults=explode:0@1", "unknown kind 'explode'"),
        ("faults=lost:0:7@1", "expected lost:GPU@T"),
        ("faults=dbe:0@1+5", "dbe takes no +duration"),
        ("faults=xid:0/gi1:31@10", "GPU 0 has no MIG layout"),
        ("mig=0:1g.10gb,faults=xid:0/gi1:31@10", "has no GPU instance 1 (it has 7)"),
        ("faults=recovery:0:pray@1", "unknown recovery action 'pray'"),
        ("file:/nonexistent/sim.json", "file:/nonexistent/sim.json"),
    ],
)
def test_spec_errors_name_the_bad_part(spec: str, bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(bad)):
        SimulatedBackend.from_spec(spec)


def test_spec_order_does_not_matter_and_repeats_accumulate() -> None:
    a, _ = make("faults=xid:9:31@1,gpus=10")
    assert len(a.discover().gpus) == 10
    b, _ = make("mig=0:1g.10gb,mig=1:7g.80gb,faults=xid:0:31@1,faults=lost:1@5")
    inv = b.discover()
    assert inv.gpus[0].mig_enabled and inv.gpus[1].migs[0].profile == "7g.80gb"
    assert len(b.config.faults) == 2


def test_file_spec(tmp_path: Path) -> None:
    path = tmp_path / "node.json"
    path.write_text(
        json.dumps(
            {
                "model": "a100",
                "gpus": 4,
                "seed": 7,
                "driver": "550.90.07",
                "mig": {"1": ["3g.40gb", "4g.40gb"]},
                "workload": {"0-1": "idle"},
                "faults": ["xid:2:79@30", "lost:2@31"],
            }
        )
    )
    b, _ = make(f"file:{path}")
    inv = b.discover()
    assert inv.driver_version == "550.90.07" and len(inv.gpus) == 4
    assert [(m.profile, m.gpu_instance_id) for m in inv.gpus[1].migs] == [("4g.40gb", 1), ("3g.40gb", 2)]
    assert b.config.seed == 7 and len(b.config.faults) == 2
    # Later items override the file.
    c, _ = make(f"file:{path},gpus=2,faults=")
    assert len(c.discover().gpus) == 2
    path.write_text('{"gpus": 4, "colour": "red"}')
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        SimulatedBackend.from_spec(f"file:{path}")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SimulatedBackend.from_spec(f"file:{path}")


# --- events ------------------------------------------------------------------


def test_scheduled_xids_with_attribution() -> None:
    b, clock = make("mig=0:3g.40gb+2g.20gb+1g.10gb+1g.10gb,faults=xid:0/gi9:31@10;xid:5:79@20;dbe:3@15")
    inv = b.discover()
    es = b.open_events(inv)
    assert es.wait(0) == []
    clock.advance(10.5)
    ev = es.wait(0.2)
    assert ev == [DeviceEvent(inv.gpus[0].uuid, EVENT_XID, 31, 9, 0, ev[0].timestamp)]
    assert abs(ev[0].timestamp - time.time()) < 5
    clock.advance(10)
    ev = es.wait(0.2)
    assert [(e.gpu_uuid, e.event_type, e.xid) for e in ev] == [
        (inv.gpus[3].uuid, EVENT_DOUBLE_BIT_ECC, 0),
        (inv.gpus[3].uuid, EVENT_XID, 48),
        (inv.gpus[5].uuid, EVENT_XID, 79),
    ]
    assert all(e.gpu_instance_id is None and e.compute_instance_id is None for e in ev)
    assert es.wait(0.05) == []  # delivered once
    es.close()


def test_scheduled_event_wakes_a_waiting_wait_as_time_passes() -> None:
    b, clock = make("faults=xid:1:13@5")
    es = b.open_events(b.discover())
    threading.Timer(0.1, clock.advance, args=(6,)).start()
    t0 = time.monotonic()
    ev = es.wait(5)
    assert [e.xid for e in ev] == [13]
    assert time.monotonic() - t0 < 1.0


def test_scheduled_event_with_the_real_clock() -> None:
    b = SimulatedBackend.from_spec("faults=xid:2:43@200ms")
    es = b.open_events(b.discover())
    t0 = time.monotonic()
    ev = es.wait(3)
    assert [e.xid for e in ev] == [43]
    assert 0.1 < time.monotonic() - t0 < 1.5


def test_injected_xid_wakes_wait_promptly() -> None:
    b, _ = make("mig=2:1g.10gb*7")
    inv = b.discover()
    es = b.open_events(inv)
    got: list[DeviceEvent] = []
    waited: list[float] = []

    def waiter() -> None:
        t0 = time.monotonic()
        got.extend(es.wait(10))
        waited.append(time.monotonic() - t0)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    b.inject_xid(2, 31, gi=11)
    th.join(5)
    assert not th.is_alive()
    assert waited[0] < 1.0
    assert [(e.gpu_uuid, e.xid, e.gpu_instance_id, e.compute_instance_id) for e in got] == [
        (inv.gpus[2].uuid, 31, 11, 0)
    ]
    b.inject_xid(4, 94)
    assert [(e.gpu_uuid, e.xid, e.gpu_instance_id) for e in es.wait(0)] == [(inv.gpus[4].uuid, 94, None)]
    with pytest.raises(ValueError, match="GPU 8"):
        b.inject_xid(8, 31)
    with pytest.raises(ValueError, match="no GPU instance 1"):
        b.inject_xid(2, 31, gi=1)


def test_events_only_for_registered_gpus_and_close_wakes() -> None:
    b, _ = make()
    inv = b.discover()
    partial = type(inv)(inv.driver_version, inv.gpus[:2])
    es = b.open_events(partial)
    b.inject_xid(5, 31)
    b.inject_xid(1, 32)
    assert [e.xid for e in es.wait(0)] == [32]
    th = threading.Thread(target=lambda: es.wait(10))
    th.start()
    time.sleep(0.05)
    es.close()
    th.join(2)
    assert not th.is_alive()


def test_shutdown_wakes_event_wait_with_backend_error() -> None:
    b, _ = make()
    es = b.open_events(b.discover())
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            es.wait(10)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    b.shutdown()
    th.join(2)
    assert not th.is_alive() and isinstance(errors[0], BackendError)


# --- faults -------------------------------------------------------------------


def test_lost_gpu() -> None:
    b, clock = make("faults=xid:3:79@10;lost:3@10")
    inv = b.discover()
    uuid = inv.gpus[3].uuid
    es = b.open_events(inv)
    assert b.read(uuid, POLLED).values
    clock.advance(11)
    with pytest.raises(DeviceLostError):
        b.read(uuid, POLLED)
    assert b.discover().gpu_by_uuid(uuid) is not None  # still listed
    assert read_all(b, inv.gpus[2].uuid)  # others fine
    assert [e.xid for e in es.wait(0)] == [79]  # the XID first...
    with pytest.raises(DeviceLostError) as info:
        es.wait(0)  # ...then the wait reports the loss (the event thread turns it into EVENT_GPU_LOST)
    assert info.value.args[0] == uuid
    assert es.wait(0) == []


def test_lost_for_a_while_comes_back_and_injected_loss() -> None:
    b, clock = make("faults=lost:1@5+10")
    uuid = b.discover().gpus[1].uuid
    clock.advance(6)
    with pytest.raises(DeviceLostError):
        b.read(uuid, POLLED)
    clock.advance(10)
    assert b.read(uuid, POLLED).values
    b.inject("lost:0")
    with pytest.raises(DeviceLostError):
        b.read(b.discover().gpus[0].uuid, POLLED)


def test_vanish_removes_gpu() -> None:
    b, clock = make("faults=vanish:6@30,mig=6:7g.80gb")
    uuid = b.discover().gpus[6].uuid
    mig = b.discover().gpus[6].migs[0].uuid
    before = b.discover()
    clock.advance(31)
    inv = b.discover()
    assert inv.gpu_by_uuid(uuid) is None and len(inv.gpus) == 7
    assert inv.layout_key() != before.layout_key()
    assert not any(uuid in pair for pair in inv.nvlink_pairs)
    assert len(inv.nvlink_pairs) == 21
    with pytest.raises(DeviceLostError):
        b.read(uuid, POLLED)
    with pytest.raises(DeviceLostError):
        b.read(mig, POLLED)
    with pytest.raises(DeviceLostError):
        b.read("GPU-not-there", POLLED)


def test_hang_blocks_until_it_ends() -> None:
    b, clock = make("faults=hang:2@5+20")
    uuid = b.discover().gpus[2].uuid
    clock.advance(6)
    done = threading.Event()

    def reader() -> None:
        b.read(uuid, POLLED)
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    assert not done.wait(0.3)  # blocked
    assert read_all(b, b.discover().gpus[1].uuid)  # other GPUs are not blocked
    clock.advance(20)
    assert done.wait(2)


def test_hang_is_interrupted_by_shutdown() -> None:
    b, clock = make("faults=hang:0@1")
    uuid = b.discover().gpus[0].uuid
    clock.advance(2)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            b.read(uuid, POLLED)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=reader)
    th.start()
    time.sleep(0.2)
    assert th.is_alive()
    t0 = time.monotonic()
    b.shutdown()
    th.join(2)
    assert not th.is_alive() and time.monotonic() - t0 < 1
    assert isinstance(errors[0], DeviceError)


def test_dbe_remap_failure_recovery_faults() -> None:
    b, clock = make("faults=dbe:1@10;remap-failure:2@10;recovery:2:reset@12;recovery:4:7@1")
    inv = b.discover()
    v1 = read_all(b, inv.gpus[1].uuid)
    assert v1["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"] == 0 and v1["DCGM_FI_DEV_ROW_REMAP_PENDING"] == 0
    unc = v1["DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"]
    clock.advance(10)
    v1 = read_all(b, inv.gpus[1].uuid)
    assert v1["DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"] == 1 == v1["DCGM_FI_DEV_ECC_DBE_AGG_TOTAL"]
    assert v1["DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"] == unc + 1
    assert v1["DCGM_FI_DEV_ROW_REMAP_PENDING"] == 1
    v2 = read_all(b, inv.gpus[2].uuid)
    assert v2["DCGM_FI_DEV_ROW_REMAP_FAILURE"] == 1 and v2["DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION"] == 0
    clock.advance(2)
    assert read_all(b, inv.gpus[2].uuid)["DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION"] == 1
    assert read_all(b, inv.gpus[4].uuid)["DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION"] == 7
    ev = b.open_events(inv).wait(0)
    assert {(e.gpu_uuid, e.event_type, e.xid) for e in ev} == {
        (inv.gpus[1].uuid, EVENT_DOUBLE_BIT_ECC, 0),
        (inv.gpus[1].uuid, EVENT_XID, 48),
        (inv.gpus[2].uuid, EVENT_XID, 64),
    }


def test_dbe_on_a_retired_pages_gpu() -> None:
    b, clock = make("v100x2,faults=dbe:0@1")
    uuid = b.discover().gpus[0].uuid
    clock.advance(2)
    v = read_all(b, uuid)
    assert v["DCGM_FI_DEV_RETIRED_DBE"] == 1 and v["DCGM_FI_DEV_RETIRED_PENDING"] == 1


def test_thermal_slowdown() -> None:
    b, clock = make("workload=0:infer,faults=thermal:0@60+600")
    uuid = b.discover().gpus[0].uuid
    before = read_all(b, uuid)
    clock.advance(300)
    v = read_all(b, uuid)
    assert int(v["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"]) & 0x48 == 0x48  # HW slowdown + HW thermal
    assert v["DCGM_FI_DEV_GPU_TEMP"] > before["DCGM_FI_DEV_GPU_TEMP"] + 15
    assert v["DCGM_FI_DEV_THERMAL_VIOLATION"] >= before["DCGM_FI_DEV_THERMAL_VIOLATION"] + 230e6
    clock.advance(600)
    assert int(read_all(b, uuid)["DCGM_FI_DEV_CLOCKS_EVENT_REASONS"]) & 0x40 == 0


def test_inject_fault_bad_text() -> None:
    b, _ = make()
    with pytest.raises(ValueError, match="unknown kind"):
        b.inject("melt:0")
    clock = b._clock
    assert isinstance(clock, Clock)
    clock.advance(100)
    hang = b.inject("hang:2+30s")
    assert hang.at == pytest.approx(100) and hang.duration == 30
    f = b.inject("recovery:3:drain-reset")
    assert f.action == 4
    assert read_all(b, b.discover().gpus[3].uuid)["DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION"] == 4


# --- determinism and cost -----------------------------------------------------


def _trace(spec: str, times: list[float]) -> list[dict[str, float]]:
    b, clock = make(spec, t=50.0)
    inv = b.discover()
    out = []
    for t in times:
        clock.t = 50.0 + t
        for g in inv.gpus:
            out.append(read_all(b, g.uuid))
            for m in g.migs:
                out.append(read_all(b, m.uuid))
    return out


def test_deterministic_given_seed_and_elapsed_time() -> None:
    spec = "seed=42,mig=1:2g.20gb*3+1g.10gb"
    a = _trace(spec, [0, 3.5, 10, 250.25, 1000])
    b = _trace(spec, [0, 3.5, 10, 250.25, 1000])
    assert a == b
    # The read history does not matter: only the elapsed time does.
    c = _trace(spec, [1000])
    assert c == a[-len(c) :]
    # Another seed is another node.
    d = _trace("seed=43,mig=1:2g.20gb*3+1g.10gb", [0, 3.5, 10, 250.25, 1000])
    assert d != a
    assert make("seed=42")[0].discover().gpus[0].uuid != make("seed=43")[0].discover().gpus[0].uuid


def test_clock_going_backwards_recomputes_the_same_values() -> None:
    b, clock = make()
    uuid = b.discover().gpus[0].uuid
    clock.advance(500)
    first = read_all(b, uuid)
    clock.advance(100)
    read_all(b, uuid)
    clock.advance(-100)
    assert read_all(b, uuid) == first


def test_read_is_cheap() -> None:
    b, clock = make()
    inv = b.discover()
    for g in inv.gpus:
        read_all(b, g.uuid)
    n = 400
    start = time.process_time()
    for _ in range(n):
        clock.advance(5)  # a collection cycle every 5 s: each read steps five seconds of simulation
        for g in inv.gpus:
            b.read(g.uuid, POLLED)
    per_read = (time.process_time() - start) / (n * len(inv.gpus))
    assert per_read < 100e-6, f"{per_read * 1e6:.1f} us per read"
