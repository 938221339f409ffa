"""Resource managers, health mapping, preferred allocation and config validation (no gRPC)."""

from __future__ import annotations

import time

import pytest

from exporter.deviceplugin import DevicePluginConfig
from exporter.deviceplugin.config import mig_resource_name, socket_name
from exporter.deviceplugin.rm import build_plan, device_health, preferred_allocation
from exporter.health.verdict import HealthState, Verdict

from .fakes import FakeHealth, gpu, inventory, mig_uuid, uuid


def cfg(**kw: object) -> DevicePluginConfig:
    return DevicePluginConfig(plugin_dir="/tmp/dp", **kw)  # type: ignore[arg-type]


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"replicas": 0}, "replicas must be an integer >= 1"),
        ({"replicas": True}, "replicas must be an integer >= 1"),
        ({"replicas": 5000}, "maximum"),
        ({"mig_strategy": "both"}, "mig strategy 'both' is not one of none, single, mixed"),
        ({"device_list_strategy": "bogus"}, "device list strategy"),
        ({"resource_name": "gpu"}, "must look like <domain>/<name>"),
        ({"resource_name": "Nvidia.com/gpu"}, "not a lower-case DNS subdomain"),
        ({"resource_name": "kubernetes.io/gpu"}, "reserved"),
        ({"resource_name": "nvidia.com/-gpu"}, "must be 1-63 characters"),
        ({"plugin_dir": "relative/dir"}, "absolute path"),
        ({"plugin_dir": "/" + "x" * 100}, "unix sockets allow at most 107"),
    ],
)
def test_config_rejects_invalid(kw: dict[str, object], message: str) -> None:
    kw.setdefault("plugin_dir", "/tmp/dp")
    with pytest.raises(ValueError, match=message):
        DevicePluginConfig(**kw)  # type: ignore[arg-type]


def test_config_defaults_and_names() -> None:
    c = DevicePluginConfig()
    assert (c.resource_name, c.plugin_dir, c.mig_strategy, c.replicas, c.device_list_strategy) == (
        "nvidia.com/gpu",
        "/var/lib/kubelet/device-plugins",
        "none",
        1,
        "envvar",
    )
    assert socket_name("nvidia.com/gpu") == "gpu-health-exporter-nvidia.com-gpu.sock"
    assert mig_resource_name("nvidia.com/gpu", "1g.10gb+me") == "nvidia.com/mig-1g.10gb.me"
    assert mig_resource_name("example.com/accel", "3g.40gb") == "example.com/mig-3g.40gb"


# --- MIG strategies ----------------------------------------------------------------------------------


def ids(plan_res: object) -> list[str]:
    return [d.id for d in plan_res.devices]  # type: ignore[attr-defined]


def test_none_advertises_whole_gpus_even_with_mig_and_numa() -> None:
    inv = inventory([gpu(0, numa=0), gpu(1, numa=1, migs=("1g.10gb",)), gpu(2, numa=-1)])
    plan = build_plan(inv, cfg())
    assert list(plan.resources) == ["nvidia.com/gpu"]
    res = plan.resources["nvidia.com/gpu"]
    assert ids(res) == [uuid(0), uuid(1), uuid(2)]
    assert [d.numa_node for d in res.devices] == [0, 1, None]  # -1 = unknown NUMA
    assert plan.problems == ()


def test_single_all_mig_one_profile() -> None:
    inv = inventory([gpu(0, migs=("1g.10gb", "1g.10gb")), gpu(1, migs=("1g.10gb",))])
    plan = build_plan(inv, cfg(mig_strategy="single"))
    assert ids(plan.resources["nvidia.com/gpu"]) == [mig_uuid(0, 0), mig_uuid(0, 1), mig_uuid(1, 0)]
    assert plan.problems == ()


def test_single_without_mig_is_none() -> None:
    plan = build_plan(inventory([gpu(0), gpu(1)]), cfg(mig_strategy="single"))
    assert ids(plan.resources["nvidia.com/gpu"]) == [uuid(0), uuid(1)]


@pytest.mark.parametrize(
    ("gpus", "problem"),
    [
        ([gpu(0, migs=("1g.10gb",)), gpu(1)], "MIG enabled on every GPU or on none"),
        ([gpu(0, migs=("1g.10gb", "2g.20gb"))], "one MIG profile"),
        ([gpu(0, migs=("1g.10gb",)), gpu(1, migs=())], "no MIG devices"),
    ],
)
def test_single_invalid_layout_advertises_nothing(gpus: list[object], problem: str) -> None:
    plan = build_plan(inventory(gpus), cfg(mig_strategy="single"))  # type: ignore[arg-type]
    assert ids(plan.resources["nvidia.com/gpu"]) == []
    assert any(problem in p for p in plan.problems), plan.problems


def test_mixed_one_resource_per_profile() -> None:
    inv = inventory([gpu(0), gpu(1, migs=("1g.10gb", "1g.10gb", "3g.40gb")), gpu(2, migs=())])
    plan = build_plan(inv, cfg(mig_strategy="mixed"))
    assert sorted(plan.resources) == ["nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"]
    assert ids(plan.resources["nvidia.com/gpu"]) == [uuid(0)]
    assert ids(plan.resources["nvidia.com/mig-1g.10gb"]) == [mig_uuid(1, 0), mig_uuid(1, 1)]
    assert ids(plan.resources["nvidia.com/mig-3g.40gb"]) == [mig_uuid(1, 2)]
    assert any("no MIG devices" in p for p in plan.problems)


# --- replicas and health -----------------------------------------------------------------------------


def test_replicas_ids_and_fenced_gpu_fences_every_replica() -> None:
    plan = build_plan(inventory([gpu(0), gpu(1)]), cfg(replicas=3))
    res = plan.resources["nvidia.com/gpu"]
    assert ids(res) == [f"{uuid(g)}::{n}" for g in (0, 1) for n in range(3)]
    assert all(len(i) <= 63 for i in ids(res))
    health = device_health(plan, FakeHealth(unhealthy=(uuid(1),)))["nvidia.com/gpu"]
    assert [health[f"{uuid(0)}::{n}"] for n in range(3)] == [True] * 3
    assert [health[f"{uuid(1)}::{n}"] for n in range(3)] == [False] * 3


def test_mig_device_unhealthy_when_parent_fenced_and_degraded_stays_schedulable() -> None:
    plan = build_plan(inventory([gpu(0, migs=("1g.10gb", "1g.10gb")), gpu(1)]), cfg(mig_strategy="mixed"))
    h = FakeHealth(unhealthy=(uuid(0),))
    h.set(uuid(1), HealthState.DEGRADED)
    health = device_health(plan, h)
    assert health["nvidia.com/mig-1g.10gb"] == {mig_uuid(0, 0): False, mig_uuid(0, 1): False}
    assert health["nvidia.com/gpu"] == {uuid(1): True}


def test_verdict_error_counts_as_unhealthy() -> None:
    class Broken(FakeHealth):
        def verdict(self, uuid: str) -> Verdict:
            raise RuntimeError("engine bug")

    plan = build_plan(inventory([gpu(0)]), cfg())
    assert device_health(plan, Broken()) == {"nvidia.com/gpu": {uuid(0): False}}


# --- GetPreferredAllocation --------------------------------------------------------------------------


def eight_gpus() -> object:
    # Two NVLink islands {0,1,2,3} and {4,5,6,7} (all-to-all inside), NUMA 0 for 0-3, 1 for 4-7,
    # but interleaved in index order with a lone link 1-6 to tempt a naive picker.
    links = [(a, b) for isl in ((0, 1, 2, 3), (4, 5, 6, 7)) for i, a in enumerate(isl) for b in isl[i + 1 :]]
    return inventory([gpu(i, numa=0 if i < 4 else 1) for i in range(8)], [*links, (1, 6)])


def test_preferred_picks_nvlink_island() -> None:
    inv = eight_gpus()
    plan = build_plan(inv, cfg())  # type: ignore[arg-type]
    res = plan.resources["nvidia.com/gpu"]
    available = [uuid(i) for i in (0, 4, 5, 1, 6, 7)]
    got = preferred_allocation(res, plan.topology, available, [], 3)
    # {4,5,6} and {4,5,7} are both mutually linked; taking 7 leaves {0,1,6} with two links (0-1, 1-6)
    # for the next request, taking 6 only one (go-gpuallocator's best split of the available GPUs).
    assert sorted(got) == [uuid(4), uuid(5), uuid(7)]
    # A bare set of NVLinked pairs (the older argument) still works, with the same answer.
    assert preferred_allocation(res, plan.nvlink_pairs, available, [], 3) == got
    got = preferred_allocation(res, plan.nvlink_pairs, available, [uuid(0)], 2)
    assert got == [uuid(0), uuid(1)]  # must_include first, then its NVLink peer


def test_preferred_honours_must_include_and_falls_back_to_numa() -> None:
    # No NVLink at all: same NUMA node wins.
    inv = inventory([gpu(i, numa=i % 2) for i in range(6)])
    plan = build_plan(inv, cfg())
    res = plan.resources["nvidia.com/gpu"]
    got = preferred_allocation(res, plan.nvlink_pairs, [uuid(i) for i in range(6)], [uuid(3)], 3)
    assert got[0] == uuid(3)
    assert sorted(got) == [uuid(1), uuid(3), uuid(5)]
    # size <= must_include: exactly must_include
    assert preferred_allocation(res, plan.nvlink_pairs, [uuid(0), uuid(1)], [uuid(1)], 1) == [uuid(1)]


def test_preferred_large_node_uses_greedy_and_is_fast() -> None:
    # 16 GPUs choose 8 is beyond the exhaustive limit; two 8-GPU NVLink islands.
    links = [(a, b) for base in (0, 8) for a in range(base, base + 8) for b in range(a + 1, base + 8)]
    inv = inventory([gpu(i, numa=i // 8) for i in range(16)], links)
    plan = build_plan(inv, cfg())
    res = plan.resources["nvidia.com/gpu"]
    available = [uuid(i) for i in (0, 1, 2, 8, 9, 10, 11, 12, 13, 14, 15, 3)]
    start = time.perf_counter()
    got = preferred_allocation(res, plan.nvlink_pairs, available, [], 8)
    assert time.perf_counter() - start < 0.5
    assert sorted(got) == sorted(uuid(i) for i in range(8, 16))


def test_preferred_replicas_spread_over_least_loaded_gpus() -> None:
    plan = build_plan(inventory([gpu(0), gpu(1), gpu(2)]), cfg(replicas=4))
    res = plan.resources["nvidia.com/gpu"]
    # GPU 0 has 3 replicas in use, GPU 1 has 1, GPU 2 none.
    available = [f"{uuid(0)}::3"] + [f"{uuid(1)}::{n}" for n in (1, 2, 3)] + [f"{uuid(2)}::{n}" for n in range(4)]
    got = preferred_allocation(res, plan.nvlink_pairs, available, [], 2)
    assert {g.split("::")[0] for g in got} == {uuid(2), uuid(1)}  # spread, least loaded first
    got = preferred_allocation(res, plan.nvlink_pairs, available, [], 1)
    assert got[0].startswith(uuid(2))
    got = preferred_allocation(res, plan.nvlink_pairs, available, [f"{uuid(1)}::1"], 2)
    assert got[0] == f"{uuid(1)}::1" and got[1].startswith(uuid(2))
