"""GetPreferredAllocation policies over a long random allocate/free sequence: how good the sets stay.

    .venv/bin/python benchmarks/placement.py [--requests 1000] [--seed 7]

For each node topology (an HGX H100 NVSwitch board, a DGX-1 V100 hybrid cube mesh, an L40S-like PCIe
server with two switches), one seeded sequence of requests (sizes 1, 2, 4, 8; frees of a random live
allocation) is played against three policies, each seeing the same events:

- `placement`: the device plugin's policy (`exporter.deviceplugin.rm.preferred_allocation`);
- `go_gpuallocator_like`: NVIDIA's best effort policy as we read it (NVSwitch links invisible to it);
- `baseline_count_pairs`: the rule it replaced, copied here (most NVLinked pairs, then most same-NUMA
  pairs, then lowest device order; exhaustive up to 1000 subsets, else seeded greedy);
- `first_fit`: the lowest free indices.

Figures per policy, over multi-GPU allocations: the share whose every pair is NVLinked (NVLink nodes)
or behind one PCIe switch (the PCIe node), among the sizes the empty node has such a set for; the
share that got the best set the empty node offers for that size (the highest pair score sum); the
mean pair score; and fragmentation: the share of requests
(of sizes the empty node has such a set for) with enough GPUs free but no set among them whose every
pair is NVLinked / behind one switch.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.deviceplugin import DevicePluginConfig
from exporter.deviceplugin.placement import Topology
from exporter.deviceplugin.rm import ResourceDevices, build_plan, preferred_allocation
from exporter.model import (
    TOPOLOGY_HOSTBRIDGE,
    TOPOLOGY_NODE,
    TOPOLOGY_SINGLE,
    TOPOLOGY_SYSTEM,
    Gpu,
    GpuLink,
    Inventory,
)
from exporter.simulate.backend import DGX1_NVLINKS

SIZES = (1, 2, 4, 8)
SIZE_WEIGHTS = (4, 3, 2, 1)
FREE_SHARE = 0.45  # of events that free an allocation (when one is live)


def uuid(i: int) -> str:
    return f"GPU-{i:08d}-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class Node:
    name: str
    inventory: Inventory
    good: str  # what "every pair good" means on this node: "NVLinked" or "same switch"
    nvswitch: bool = False  # its NVLinks go through NVSwitches

    def good_pair(self, a: int, b: int) -> bool:
        link = self._link(a, b)
        if self.good == "NVLinked":
            return link.nvlinks > 0
        return link.pcie == TOPOLOGY_SINGLE

    def _link(self, a: int, b: int) -> GpuLink:
        x, y = sorted((uuid(a), uuid(b)))
        return next(link for link in self.inventory.links if link.a == x and link.b == y)


def make_node(
    name: str, nvlinks: dict[tuple[int, int], int], level: Callable[[int, int], int], good: str, nvswitch: bool = False
) -> Node:
    links = []
    for a in range(8):
        for b in range(a + 1, 8):
            links.append(GpuLink(uuid(a), uuid(b), nvlinks=nvlinks.get((a, b), 0), pcie=level(a, b)))
    gpus = tuple(
        Gpu(index=i, uuid=uuid(i), pci_bus_id=f"00000000:{0x10 + i:02X}:00.0", minor=i, name="GPU", numa_node=i // 4)
        for i in range(8)
    )
    pairs = frozenset((link.a, link.b) for link in links if link.nvlinks)
    inventory = Inventory(driver_version="570", gpus=gpus, nvlink_pairs=pairs, links=tuple(links))
    return Node(name, inventory, good, nvswitch)


DGX1_LINKS = DGX1_NVLINKS  # the simulator's DGX-1 hybrid cube mesh: one table of that fact

NODES = (
    make_node(
        "HGX H100 (NVSwitch, 18 links every pair; PCIe switch per pair)",
        {(a, b): 18 for a in range(8) for b in range(a + 1, 8)},
        lambda a, b: TOPOLOGY_SINGLE if a // 2 == b // 2 else TOPOLOGY_NODE if a // 4 == b // 4 else TOPOLOGY_SYSTEM,
        "NVLinked",
        nvswitch=True,
    ),
    make_node(
        "DGX-1 V100 (hybrid cube mesh: 2, 1 or 0 links)",
        DGX1_LINKS,
        lambda a, b: (
            TOPOLOGY_SINGLE if a // 2 == b // 2 else TOPOLOGY_HOSTBRIDGE if a // 4 == b // 4 else TOPOLOGY_SYSTEM
        ),
        "NVLinked",
    ),
    make_node(
        "L40S-like PCIe (GPUs 0-3 and 4-7 behind two switches, two NUMA nodes)",
        {},
        lambda a, b: TOPOLOGY_SINGLE if a // 4 == b // 4 else TOPOLOGY_SYSTEM,
        "same switch",
    ),
)

# A policy: (resource, plan topology, nvlink pairs, available IDs, size) -> chosen IDs.
Policy = Callable[[ResourceDevices, Topology, frozenset[tuple[str, str]], list[str], int], list[str]]


def placement(
    res: ResourceDevices, topo: Topology, pairs: frozenset[tuple[str, str]], avail: list[str], size: int
) -> list[str]:
    return preferred_allocation(res, topo, avail, [], size)


def first_fit(
    res: ResourceDevices, topo: Topology, pairs: frozenset[tuple[str, str]], avail: list[str], size: int
) -> list[str]:
    order = {d.id: d.order for d in res.devices}
    return sorted(avail, key=lambda i: order[i])[:size]


def baseline_count_pairs(
    res: ResourceDevices, topo: Topology, pairs: frozenset[tuple[str, str]], avail: list[str], size: int
) -> list[str]:
    """The rule `rm._aligned` applied before `placement` (copied as it was): most NVLinked pairs, then
    most same-NUMA pairs, then the lowest device orders; exhaustive up to 1000 subsets, else greedy."""
    candidates = sorted((res.by_id[i] for i in avail), key=lambda d: d.order)
    if len(candidates) <= size:
        return [d.id for d in candidates]

    def linked(a: str, b: str) -> bool:
        return ((a, b) if a <= b else (b, a)) in pairs

    def key(picks: Sequence[str]) -> tuple[int, int, tuple[int, ...]]:
        devs = [res.by_id[p] for p in picks]
        links = sum(linked(a.gpu_uuid, b.gpu_uuid) for a, b in combinations(devs, 2))
        numa = sum(a.numa_node is not None and a.numa_node == b.numa_node for a, b in combinations(devs, 2))
        return (links, numa, tuple(-d.order for d in sorted(devs, key=lambda d: d.order)))

    ids = [d.id for d in candidates]
    if math.comb(len(ids), size) <= 1000:
        chosen: tuple[str, ...] = max(combinations(ids, size), key=key)
        return list(chosen)
    raise NotImplementedError("8-GPU nodes never leave the exhaustive range")


def go_gpuallocator_like(
    res: ResourceDevices, topo: Topology, pairs: frozenset[tuple[str, str]], avail: list[str], size: int
) -> list[str]:
    """go-gpuallocator's best effort policy as we read it (besteffort_policy.go): the best split of
    the available GPUs into sets of `size`, then its best set; ties to the lowest indices. Its NVLink
    count matches remote PCI addresses to GPUs, so NVSwitch links count 0 (`uses_switch` nodes)."""
    ids = sorted(avail, key=lambda i: res.by_id[i].order)
    switch = _USES_SWITCH[0]

    def score(a: str, b: str) -> int:
        return topo.locality(a, b) if switch else topo.score(a, b)

    def set_score(members: Sequence[str]) -> int:
        return sum(score(a, b) for a, b in combinations(members, 2))

    memo: dict[frozenset[str], int] = {}

    def split(rest: tuple[str, ...]) -> int:
        if len(rest) <= size:
            return set_score(rest)
        key = frozenset(rest)
        if key not in memo:
            first, others = rest[0], rest[1:]
            short = len(rest) % size
            widths = [size] + ([short] if short else [])
            memo[key] = max(
                set_score((first, *combo)) + split(tuple(x for x in others if x not in combo))
                for w in widths
                for combo in combinations(others, w - 1)
                if len(rest) - w == 0 or (len(rest) - w) % size in (0, short)
            )
        return memo[key]

    def key(chosen: tuple[str, ...]) -> tuple[int, int, tuple[int, ...]]:
        rest = tuple(i for i in ids if i not in chosen)
        own = set_score(chosen)
        return (own + split(rest), own, tuple(-res.by_id[i].order for i in chosen))

    best: tuple[str, ...] = max(combinations(ids, size), key=key)
    return list(best)


_USES_SWITCH = [False]  # set per node by `play`: go-gpuallocator sees no links behind NVSwitches

POLICIES: dict[str, Policy] = {
    "placement": placement,
    "go_gpuallocator_like": go_gpuallocator_like,
    "baseline_count_pairs": baseline_count_pairs,
    "first_fit": first_fit,
}


def events(n: int, seed: int) -> list[tuple[str, float]]:
    """("alloc", size) or ("free", which live allocation as a fraction): the same for every policy."""
    rnd = random.Random(seed)
    out: list[tuple[str, float]] = []
    for _ in range(n):
        if rnd.random() < FREE_SHARE:
            out.append(("free", rnd.random()))
        else:
            out.append(("alloc", float(rnd.choices(SIZES, SIZE_WEIGHTS)[0])))
    return out


@dataclass
class Figures:
    multi: int = 0
    could_be_good: int = 0  # multi-GPU allocations of a size the empty node has an all-good set for
    good: int = 0
    best: int = 0
    pair_score_sum: float = 0.0
    asked: int = 0
    good_asked: int = 0
    fragmented: int = 0
    refused: int = 0
    seconds: float = 0.0
    calls: int = 0


def play(node: Node, policy: Policy, evs: list[tuple[str, float]]) -> Figures:
    inv = node.inventory
    _USES_SWITCH[0] = node.nvswitch
    plan = build_plan(inv, DevicePluginConfig(plugin_dir="/tmp/dp"))
    res = plan.resources["nvidia.com/gpu"]
    topo = plan.topology
    index = {uuid(i): i for i in range(8)}
    every = [uuid(i) for i in range(8)]
    best_score = {k: max(topo.set_score(s) for s in combinations(every, k)) for k in SIZES}
    # e.g. no 8 GPUs of a DGX-1 are all NVLinked, no 8 of the PCIe node share a switch
    good_exists = {
        k: any(all(node.good_pair(a, b) for a, b in combinations(s, 2)) for s in combinations(range(8), k))
        for k in SIZES
    }
    free = set(range(8))
    live: list[list[int]] = []
    fig = Figures()
    for kind, value in evs:
        if kind == "free":
            if live:
                free.update(live.pop(int(value * len(live))))
            continue
        size = int(value)
        if len(free) < size:
            fig.refused += 1
            continue
        fig.asked += 1
        free_ids = [uuid(i) for i in sorted(free)]
        if good_exists[size]:
            fig.good_asked += 1
            if not any(all(node.good_pair(a, b) for a, b in combinations(s, 2)) for s in combinations(free, size)):
                fig.fragmented += 1
        start = time.perf_counter()
        got = policy(res, topo, plan.nvlink_pairs, free_ids, size)
        fig.seconds += time.perf_counter() - start
        fig.calls += 1
        chosen = [index[g] for g in got]
        assert len(set(chosen)) == size and set(chosen) <= free, (chosen, free)
        free.difference_update(chosen)
        live.append(chosen)
        if size > 1:
            fig.multi += 1
            if good_exists[size]:
                fig.could_be_good += 1
                fig.good += all(node.good_pair(a, b) for a, b in combinations(chosen, 2))
            fig.best += topo.set_score(got) == best_score[size]
            fig.pair_score_sum += topo.set_score(got) / math.comb(size, 2)
    return fig


def add(total: Figures, f: Figures) -> None:
    for name in vars(total):
        setattr(total, name, getattr(total, name) + getattr(f, name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=1000, help="events per sequence")
    parser.add_argument("--seed", type=int, default=1, help="the first sequence's seed")
    parser.add_argument("--sequences", type=int, default=10, help="sequences (seeds seed, seed+1, ...) summed")
    args = parser.parse_args()
    seqs = [events(args.requests, args.seed + k) for k in range(args.sequences)]
    allocs = sum(1 for evs in seqs for kind, _ in evs if kind == "alloc")
    print(
        f"{args.sequences} sequences of {args.requests} events (seeds {args.seed}-{args.seed + args.sequences - 1}): "
        f"{allocs} allocation requests of sizes {SIZES} (weights {SIZE_WEIGHTS}), the rest frees\n"
    )
    for node in NODES:
        print(f"### {node.name}\n")
        print(
            f"| policy | multi-GPU sets, every pair {node.good} | best-scoring sets | mean pair score "
            f"| fragmented (enough free, none every pair {node.good}) | refused (too few free) | mean call |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, policy in POLICIES.items():
            f = Figures()
            for evs in seqs:
                add(f, play(node, policy, evs))
            multi = max(f.multi, 1)
            print(
                f"| `{name}` | {100 * f.good / max(f.could_be_good, 1):.1f}% | {100 * f.best / multi:.1f}% "
                f"| {f.pair_score_sum / multi:.0f} | {100 * f.fragmented / max(f.good_asked, 1):.2f}% "
                f"| {f.refused} | {1e3 * f.seconds / max(f.calls, 1):.2f} ms |"
            )
        print()


if __name__ == "__main__":
    main()
