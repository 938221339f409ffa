"""GetPreferredAllocation's placement rules (exporter.deviceplugin.placement) on real node topologies.

Every expected set is reasoned from the rules in placement's docstring: pair score = 100 per NVLink link
+ PCIe points (same switch 50, host bridge 30, same NUMA node 20, across sockets 10); whole GPUs: the
set S with the best score(S) + best split of the GPUs left (go-gpuallocator), then the best score(S),
then closeness to GPUs in use, then device order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import pytest

from exporter.deviceplugin import DevicePluginConfig
from exporter.deviceplugin.placement import Topology, pair_score
from exporter.deviceplugin.rm import build_plan, preferred_allocation
from exporter.model import (
    TOPOLOGY_HOSTBRIDGE,
    TOPOLOGY_NODE,
    TOPOLOGY_SINGLE,
    TOPOLOGY_SYSTEM,
    GpuLink,
    Inventory,
)

from .fakes import gpu, mig_uuid, uuid

Level = Callable[[int, int], int]


def node(n: int, nvlinks: Mapping[tuple[int, int], int], level: Level, numa: Callable[[int], int]) -> Inventory:
    links = []
    for a in range(n):
        for b in range(a + 1, n):
            x, y = sorted((uuid(a), uuid(b)))
            links.append(GpuLink(x, y, nvlinks=nvlinks.get((a, b), 0), pcie=level(a, b)))
    pairs = frozenset((link.a, link.b) for link in links if link.nvlinks)
    gpus = tuple(gpu(i, numa=numa(i)) for i in range(n))
    return Inventory(driver_version="570.124.06", gpus=gpus, nvlink_pairs=pairs, links=tuple(links))


def pick(inv: Inventory, available: Iterable[int], must: Iterable[int], size: int, **cfg: object) -> list[int]:
    plan = build_plan(inv, DevicePluginConfig(plugin_dir="/tmp/dp", **cfg))  # type: ignore[arg-type]
    res = plan.resources["nvidia.com/gpu"]
    got = preferred_allocation(res, plan.topology, [uuid(i) for i in available], [uuid(i) for i in must], size)
    index = {uuid(i): i for i in range(len(inv.gpus))}
    return [index[g] for g in got]


def everything_but(*used: int) -> list[int]:
    return [i for i in range(8) if i not in used]


# --- an HGX H100: NVSwitch, 18 links between every pair; PCIe switch per pair, NUMA 0 for 0-3 ---------


def hgx_level(a: int, b: int) -> int:
    return TOPOLOGY_SINGLE if a // 2 == b // 2 else TOPOLOGY_NODE if a // 4 == b // 4 else TOPOLOGY_SYSTEM


HGX = node(8, {(a, b): 18 for a in range(8) for b in range(a + 1, 8)}, hgx_level, lambda i: i // 4)


@pytest.mark.parametrize(
    ("available", "must", "size", "expected"),
    [
        # All 8: the whole board.
        (everything_but(), [], 8, [0, 1, 2, 3, 4, 5, 6, 7]),
        # NVLink ties everywhere; PCIe: {0,1,2,3} and {4,5,6,7} (two switch pairs + one socket each) split
        # the node best; the lower device order takes the first.
        (everything_but(), [], 4, [0, 1, 2, 3]),
        # GPU 2 in use: the best split pairs 0-1, 4-5, 6-7 (each a switch), 3 left alone; of those pairs
        # {0,1} shares the socket with GPU 2 (closeness 20+20 against 10+10): the other socket stays whole.
        (everything_but(2), [], 2, [0, 1]),
        # GPU 5 in use: one GPU goes next to it on its PCIe switch (GPU 4), keeping every other switch
        # pair whole. go-gpuallocator takes the lowest index (GPU 0) and breaks a fresh pair.
        (everything_but(5), [], 1, [4]),
        # must_include 6: its switch mate 7 (1800 + 50 beats 1800 + 20).
        (everything_but(), [6], 2, [6, 7]),
        # must_include 1 and 6 of 4: the split {1,6,x,y} + the rest; 0 and 7 (their switch mates) win.
        (everything_but(), [1, 6], 4, [1, 6, 0, 7]),
    ],
)
def test_nvswitch_node(available: list[int], must: list[int], size: int, expected: list[int]) -> None:
    got = pick(HGX, available, must, size)
    assert got[: len(must)] == must
    assert sorted(got) == sorted(expected)


# --- an L40S-like PCIe server: no NVLink, GPUs 0-3 behind switch A (NUMA 0), 4-7 behind switch B --------


def l40s_level(a: int, b: int) -> int:
    return TOPOLOGY_SINGLE if a // 4 == b // 4 else TOPOLOGY_SYSTEM


L40S = node(8, {}, l40s_level, lambda i: i // 4)


@pytest.mark.parametrize(
    ("available", "must", "size", "expected"),
    [
        # One switch each: {0,1,2,3} (lower order of the two equal halves).
        (everything_but(), [], 4, [0, 1, 2, 3]),
        # GPU 3 in use, 2 wanted: every same-switch pair scores 50 and splits the rest equally well;
        # closeness to GPU 3 takes {0,1} from the partly used switch A, switch B stays whole for a 4.
        (everything_but(3), [], 2, [0, 1]),
        # GPU 3 in use, 4 wanted: only switch B still has 4 (6 x 50), the rest {0,1,2} keeps its 3 x 50.
        (everything_but(3), [], 4, [4, 5, 6, 7]),
        # GPU 5 in use, 1 wanted: a GPU of switch B (4, lowest of 4, 6, 7); go-gpuallocator takes GPU 0.
        (everything_but(5), [], 1, [4]),
        # must_include 0: its switch mates.
        (everything_but(), [0], 3, [0, 1, 2]),
        # must_include 2 and 5 (one per switch), 4 wanted: {2,5,0,1} (3 switch-A pairs + 3 cross = 180)
        # leaves {3,4,6,7} (3 switch-B pairs + 3 cross = 180): 360; one more per switch ({2,5,0,4}) is
        # only 140 + 140. {2,5,4,6} ties at 360; the lower device order takes 0 and 1.
        (everything_but(), [2, 5], 4, [2, 5, 0, 1]),
    ],
)
def test_pcie_two_switch_node(available: list[int], must: list[int], size: int, expected: list[int]) -> None:
    got = pick(L40S, available, must, size)
    assert got[: len(must)] == must
    assert sorted(got) == sorted(expected)


# --- DGX-1 (V100): hybrid cube mesh, 2 or 1 links between some pairs, none between others ---------------
# go-gpuallocator's NewDGX1VoltaNode (gpuallocator/common_test.go): the same links and PCIe levels.

DGX1_LINKS = {
    (0, 1): 1, (0, 2): 1, (0, 3): 2, (0, 4): 2,
    (1, 2): 2, (1, 3): 1, (1, 5): 2,
    (2, 3): 2, (2, 6): 1,
    (3, 7): 1,
    (4, 5): 1, (4, 6): 1, (4, 7): 2,
    (5, 6): 2, (5, 7): 1,
    (6, 7): 2,
}  # fmt: skip


def dgx1_level(a: int, b: int) -> int:
    return TOPOLOGY_SINGLE if a // 2 == b // 2 else TOPOLOGY_HOSTBRIDGE if a // 4 == b // 4 else TOPOLOGY_SYSTEM


DGX1 = node(8, DGX1_LINKS, dgx1_level, lambda i: i // 4)


@pytest.mark.parametrize(
    ("available", "must", "size", "expected"),
    [
        # go-gpuallocator's own cases (besteffort_test.go TestBestEffortAllocate), same answers:
        # "Single NVLINK, prefer same switch": {0,2}+{4,5} = 130 + 150 splits best; {4,5} scores higher.
        ([0, 2, 4, 5], [], 2, [4, 5]),
        # "Single NVLINK, prefer same socket": {0,4} (210) + {5,6} (230) is the best split.
        ([0, 4, 5, 6], [], 2, [5, 6]),
        # "Prefer dual NVLINK same socket": 0-3 has 2 links (230), 0-1 one link + switch (150).
        ([0, 3, 1], [], 2, [0, 3]),
        # "Prefer dual NVLINK cross socket": 0-4 two links across sockets (210) beats 0-1 (150).
        ([0, 1, 4], [], 2, [0, 4]),
        # "Must include with allocation size 1/2/4".
        (everything_but(), [4], 1, [4]),
        (everything_but(), [4], 2, [4, 7]),
        (everything_but(), [4], 4, [4, 5, 6, 7]),
        # "Must include with full set specified".
        (everything_but(), [0, 2, 4, 6], 4, [0, 2, 4, 6]),
        # Ours: two quads are the best split of 8 into 4s (each quad: 6 links of NVLink + PCIe).
        (everything_but(), [], 4, [0, 1, 2, 3]),
        # Ours: GPU 3 in use, 1 wanted: closeness on PCIe first: GPU 2 (its switch mate, 50) beats 0 and
        # 1 (host bridge, 30); go-gpuallocator takes GPU 0.
        (everything_but(3), [], 1, [2]),
    ],
)
def test_dgx1_hybrid_cube_mesh(available: list[int], must: list[int], size: int, expected: list[int]) -> None:
    got = pick(DGX1, available, must, size)
    assert got[: len(must)] == must
    assert sorted(got) == sorted(expected)


def test_sixteen_gpus_stay_fast() -> None:
    # Two 8-GPU NVSwitch boards (HGX-2-like), 12 available, 8 wanted: beyond the exact search.
    links = {(a, b): 12 for a in range(16) for b in range(a + 1, 16) if a // 8 == b // 8}
    inv = node(16, links, lambda a, b: TOPOLOGY_NODE if a // 8 == b // 8 else TOPOLOGY_SYSTEM, lambda i: i // 8)
    start = time.perf_counter()
    got = pick(inv, [0, 1, 2, 8, 9, 10, 11, 12, 13, 14, 15, 3], [], 8)
    assert time.perf_counter() - start < 0.5
    assert sorted(got) == list(range(8, 16))


def test_exact_search_on_eight_gpus_is_fast() -> None:
    start = time.perf_counter()
    for size in (2, 3, 4, 5, 6):
        pick(DGX1, everything_but(), [], size)
    assert time.perf_counter() - start < 0.5


# --- MIG and replicas --------------------------------------------------------------------------------


def test_mig_devices_stay_on_few_parents_best_fit() -> None:
    # Two GPUs with seven 1g.10gb each (mig-strategy single); GPU 0 has four in use.
    inv = Inventory(driver_version="570", gpus=(gpu(0, migs=("1g.10gb",) * 7), gpu(1, migs=("1g.10gb",) * 7)))
    plan = build_plan(inv, DevicePluginConfig(plugin_dir="/tmp/dp", mig_strategy="single"))
    res = plan.resources["nvidia.com/gpu"]
    available = [mig_uuid(0, j) for j in (4, 5, 6)] + [mig_uuid(1, j) for j in range(7)]

    def parents(ids: list[str]) -> list[int]:
        return [int(i[4:12]) for i in ids]

    # 3 fit on GPU 0 exactly (best fit): GPU 1 stays whole.
    assert parents(preferred_allocation(res, plan.topology, available, [], 3)) == [0, 0, 0]
    # 4 fit only on GPU 1.
    assert parents(preferred_allocation(res, plan.topology, available, [], 4)) == [1, 1, 1, 1]
    # 8 fit nowhere: the parent with the most free first (7 of GPU 1), then 1 on GPU 0: two parents.
    assert sorted(parents(preferred_allocation(res, plan.topology, available, [], 8))) == [0] + [1] * 7
    # must_include on GPU 1: the second comes from the same parent.
    got = preferred_allocation(res, plan.topology, available, [mig_uuid(1, 3)], 2)
    assert got[0] == mig_uuid(1, 3) and parents(got) == [1, 1]


def test_replicas_spread_and_ties_go_to_close_gpus() -> None:
    # 4 GPUs, 2 replicas each, NUMA 0 for 0-1 and 1 for 2-3; GPU 2's replica ::0 must be included.
    inv = node(4, {}, lambda a, b: TOPOLOGY_NODE if a // 2 == b // 2 else TOPOLOGY_SYSTEM, lambda i: i // 2)
    plan = build_plan(inv, DevicePluginConfig(plugin_dir="/tmp/dp", replicas=2))
    res = plan.resources["nvidia.com/gpu"]
    available = [f"{uuid(i)}::{n}" for i in range(4) for n in range(2)]
    got = preferred_allocation(res, plan.topology, available, [f"{uuid(2)}::0"], 2)
    # GPUs 0, 1, 3 have no replica in use (GPU 2 has the required one): GPU 3 shares GPU 2's NUMA node.
    assert got == [f"{uuid(2)}::0", f"{uuid(3)}::0"]
    # 3 more: one per unused GPU before any GPU gets a second.
    got = preferred_allocation(res, plan.topology, available, [], 4)
    assert sorted(g.split("::")[0] for g in got) == [uuid(i) for i in range(4)]


def test_pair_score_and_fallbacks() -> None:
    assert pair_score(18, TOPOLOGY_SINGLE) == 1850
    assert pair_score(1, None) == 100 > pair_score(0, 0) == 60  # one link outweighs any PCIe locality
    # No link counts, only NVLinked pairs and NUMA nodes (older inventories): 1 link, NUMA levels.
    topo = Topology(nvlink_pairs=[("b", "a")], numa={"a": 0, "b": 1, "c": 0})
    assert topo.score("a", "b") == 110 and topo.score("a", "c") == 20 and topo.score("c", "a") == 20
    assert topo.score("a", "a") == 0 and topo.set_score(["a", "b", "c"]) == 110 + 20 + 10
