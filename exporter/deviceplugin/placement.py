"""Which GPUs a multi-device request should get: pair scores and the choice (pure, no gRPC, no NVML).

Rules, after NVIDIA's go-gpuallocator best-effort policy (`gpuallocator/besteffort_policy.go`), which
NVIDIA's device plugin uses for whole GPUs, with its gaps closed:

1. Pair score (`pair_score`): 100 per NVLink link between the two GPUs, plus the PCIe locality:
   same board 60, one PCIe switch 50, several switches 40, host bridge 30, same NUMA node 20, across
   sockets 10 (upstream's `calculateGPUPairScore`). One link outweighs any PCIe locality. Where NVML
   gave no PCIe level we fall back on the NUMA nodes (20 same, 10 different), and where the inventory
   has no per-pair link count but says the pair is NVLinked, 1 link. Upstream counts NVLink links by
   matching each link's remote PCI address to the peer, which finds nothing behind an NVSwitch (the
   remote is the switch: its "TODO: Handle NVSwitch semantics"); our topology reader counts switch
   links, so an HGX node's GPUs score as the NVLinked peers they are.
2. Set score: the sum of the pair scores of every pair in the set (upstream's `calculateGPUSetScore`).
3. Whole GPUs (`choose_aligned`): upstream splits all available GPUs into sets of the requested size
   (the last one smaller when it does not divide), keeps the split with the highest total score among
   those with a set holding every required GPU, and returns that split's best set. That keeps a good
   set for the next request instead of grabbing the best one now and stranding the rest. We choose
   the set S maximising `score(S) + best split score of the GPUs left`, which reaches the same best
   total, then (a) the higher `score(S)` (upstream's choice inside the split), then (b) the closeness
   of S to GPUs already in use (their PCIe/NUMA points, then their NVLink links): take from partly
   used PCIe switches, sockets and NVLink islands, leave whole ones free (upstream takes the lowest
   index), then (c) the lowest device order. Exact up to `_EXACT_WORK`; beyond it (16-GPU nodes) a
   seeded greedy search for S and a greedy split of the rest, so that the kubelet's call (which has
   no timeout) stays fast.
4. MIG devices (`choose_mig`): upstream spreads them like replicas, blind to their parents. We keep a
   request on as few parent GPUs as possible: parents already in the request first, then a parent
   that can hold the rest alone (the one with the fewest free devices that fits: best fit, so whole
   GPUs stay free for large requests), then the parent with the most free devices; ties go to
   parents already partly in use, then NVLink/PCIe closeness to the parents chosen, then order.
5. Replicas (`choose_distributed`, time-slicing): upstream's distributed policy (`internal/rm/
   allocate.go` `greedyAlloc`): the device with the fewest replicas in use, then the one picked least
   in this request; our ties then go to devices close to the ones already picked, then order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from exporter.model import (
    TOPOLOGY_HOSTBRIDGE,
    TOPOLOGY_INTERNAL,
    TOPOLOGY_MULTIPLE,
    TOPOLOGY_NODE,
    TOPOLOGY_SINGLE,
    TOPOLOGY_SYSTEM,
    GpuLink,
    Inventory,
)

NVLINK_POINTS = 100  # per link: more than the best PCIe locality, so links always decide first
PCIE_POINTS: Mapping[int, int] = {
    TOPOLOGY_INTERNAL: 60,
    TOPOLOGY_SINGLE: 50,
    TOPOLOGY_MULTIPLE: 40,
    TOPOLOGY_HOSTBRIDGE: 30,
    TOPOLOGY_NODE: 20,
    TOPOLOGY_SYSTEM: 10,
}

# Above this much work (candidate sets x split states) the aligned choice turns greedy: 8 GPUs cost
# at most a few thousand; 16 GPUs choose 8 would cost millions in a call the kubelet never times out.
_EXACT_WORK = 100_000


def pair_score(nvlinks: int, pcie: int | None) -> int:
    """Rule 1: 100 per NVLink link plus the PCIe locality points (0 when the level is unknown)."""
    return NVLINK_POINTS * max(nvlinks, 0) + (PCIE_POINTS.get(pcie, 0) if pcie is not None else 0)


class Topology:
    """Pair scores between physical GPUs (by UUID), built once per inventory; missing pairs score 0."""

    __slots__ = ("_links", "_scores")

    def __init__(
        self,
        links: Iterable[GpuLink] = (),
        nvlink_pairs: Iterable[tuple[str, str]] = (),
        numa: Mapping[str, int | None] | None = None,
    ) -> None:
        known: dict[tuple[str, str], GpuLink] = {}
        for link in links:
            known[_key(link.a, link.b)] = link
        for a, b in nvlink_pairs:  # an NVLinked pair without a link count: at least one link
            k = _key(a, b)
            if k not in known:
                known[k] = GpuLink(k[0], k[1], nvlinks=1)
            elif known[k].nvlinks <= 0:
                known[k] = GpuLink(k[0], k[1], nvlinks=1, pcie=known[k].pcie)
        nodes = {u: n for u, n in (numa or {}).items() if n is not None and n >= 0}
        uuids = set(nodes)
        for a, b in known:
            uuids.update((a, b))
        scores: dict[tuple[str, str], int] = {}
        ordered = sorted(uuids)
        for i, a in enumerate(ordered):
            for b in ordered[i + 1 :]:
                found = known.get((a, b))
                pcie = found.pcie if found is not None else None
                if pcie is None and a in nodes and b in nodes:
                    pcie = TOPOLOGY_NODE if nodes[a] == nodes[b] else TOPOLOGY_SYSTEM
                score = pair_score(found.nvlinks if found is not None else 0, pcie)
                if score:
                    scores[(a, b)] = score
        self._links = known
        self._scores = scores

    @classmethod
    def from_inventory(cls, inventory: Inventory) -> Topology:
        return cls(inventory.links, inventory.nvlink_pairs, {g.uuid: g.numa_node for g in inventory.gpus})

    def score(self, a: str, b: str) -> int:
        if a == b:
            return 0
        return self._scores.get(_key(a, b), 0)

    def nvlinks(self, a: str, b: str) -> int:
        link = self._links.get(_key(a, b))
        return link.nvlinks if link is not None else 0

    def locality(self, a: str, b: str) -> int:
        """The PCIe (or NUMA) part of the pair score."""
        return self.score(a, b) - NVLINK_POINTS * max(self.nvlinks(a, b), 0) if a != b else 0

    def set_score(self, uuids: Iterable[str]) -> int:
        """Rule 2: the sum over every pair of the set."""
        members = list(uuids)
        return sum(self.score(a, b) for i, a in enumerate(members) for b in members[i + 1 :])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and self._scores == other._scores and self._links == other._links

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._scores.items())))

    def __repr__(self) -> str:
        return f"Topology({len(self._scores)} scored pairs)"


EMPTY = Topology()


def _key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


# --- whole GPUs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scorer:
    """Pair scores of the devices of one request as a dense matrix (indices into `units`)."""

    units: tuple[str, ...]
    matrix: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, topology: Topology, units: Sequence[str]) -> _Scorer:
        return cls(tuple(units), tuple(tuple(topology.score(a, b) for b in units) for a in units))

    def set_score(self, members: Sequence[int]) -> int:
        m = self.matrix
        return sum(m[a][b] for i, a in enumerate(members) for b in members[i + 1 :])

    def gain(self, d: int, members: Iterable[int]) -> int:
        row = self.matrix[d]
        return sum(row[o] for o in members)


def choose_aligned(
    topology: Topology,
    candidates: Sequence[str],
    required: Sequence[str],
    size: int,
    in_use: Sequence[str] = (),
) -> list[str]:
    """Rule 3: `size` GPU UUIDs: `required` first, then the chosen ones from `candidates`.

    `candidates` (disjoint from `required`) come in device order, which breaks the last ties; `in_use`
    are the resource's GPUs that are neither candidates nor required (allocated or unhealthy).
    """
    need = size - len(required)
    if need <= 0:
        return list(required)
    if len(candidates) <= need:
        return [*required, *candidates]
    units = [*required, *candidates]
    sc = _Scorer.build(topology, units)
    req = tuple(range(len(required)))
    cand = list(range(len(required), len(units)))
    # Tie-break (b): PCIe/NUMA closeness to GPUs in use first (the partly used switch or socket),
    # then NVLink links to them (the partly used island).
    near = [sum(topology.locality(units[i], u) for u in in_use) for i in range(len(units))]
    linked = [sum(topology.nvlinks(units[i], u) for u in in_use) for i in range(len(units))]
    split = _Split(sc, size)

    def key(picks: Sequence[int]) -> tuple[int, int, int, int, tuple[int, ...]]:
        members = (*req, *picks)
        own = sc.set_score(members)
        rest = [i for i in range(len(units)) if i not in members]
        # max() keeps the highest: negated positions so that the lowest device order wins ties.
        return (
            own + split.best(rest),
            own,
            sum(near[i] for i in picks),
            sum(linked[i] for i in picks),
            tuple(-i for i in picks),
        )

    # The split's memo is shared by every candidate set: the work is the candidates plus the states.
    if math.comb(len(cand), need) + split.states_hint(len(units)) <= _EXACT_WORK:
        split.exact = True
        best = max(combinations(cand, need), key=key)
    else:
        best = max(_greedy_sets(sc, cand, req, need), key=key)
    return [*required, *(units[i] for i in sorted(best))]


class _Split:
    """Best total score of splitting a device set into sets of `size` (one smaller set takes the rest).

    Exact (memoised over bit masks) for small nodes, greedy otherwise.
    """

    def __init__(self, sc: _Scorer, size: int) -> None:
        self._sc = sc
        self._size = size
        self._memo: dict[tuple[int, bool], int] = {}
        self.exact = False

    def states_hint(self, n: int) -> int:
        """Work of one exact split of up to n devices, roughly (states x choices per state)."""
        return max(1, math.comb(max(n - 1, 0), max(self._size - 1, 0))) * (1 << min(n, 20))

    def best(self, rest: Sequence[int]) -> int:
        if len(rest) < 2:
            return 0
        if not self.exact:
            return self._greedy(list(rest))
        mask = 0
        for i in rest:
            mask |= 1 << i
        return self._exact(mask, len(rest) % self._size != 0)

    def _exact(self, mask: int, short_left: bool) -> int:
        # short_left: the one set smaller than `size` (the remainder) is still to be formed.
        if mask == 0:
            return 0
        memo_key = (mask, short_left)
        hit = self._memo.get(memo_key)
        if hit is not None:
            return hit
        members = [i for i in range(mask.bit_length()) if mask >> i & 1]
        size = self._size
        short = len(members) % size
        first, others = members[0], members[1:]
        best = -1
        # The lowest device goes into a full set, or into the short set while that is still open: every
        # split is seen once (upstream's `iterateGPUPartitions` orders sets by their first device).
        options = [size] + ([short] if short_left and short else [])
        for width in options:
            for combo in combinations(others, width - 1):
                group = (first, *combo)
                sub = mask
                for i in group:
                    sub &= ~(1 << i)
                left = short_left and width == size
                if len(members) - width < (short if left else 0):
                    continue
                value = self._sc.set_score(group) + self._exact(sub, left)
                if value > best:
                    best = value
        self._memo[memo_key] = max(best, 0)
        return self._memo[memo_key]

    def _greedy(self, rest: list[int]) -> int:
        total = 0
        while len(rest) >= self._size:
            group = max(_greedy_sets(self._sc, rest, (), self._size), key=self._sc.set_score)
            total += self._sc.set_score(group)
            rest = [i for i in rest if i not in group]
        return total + self._sc.set_score(rest)


def _greedy_sets(sc: _Scorer, cand: Sequence[int], req: Sequence[int], need: int) -> list[tuple[int, ...]]:
    """One candidate set per seed: the seed, then the device with the best gain to the set so far."""
    out: list[tuple[int, ...]] = []
    for seed in cand:
        picks = [seed]
        rest = [c for c in cand if c != seed]
        while len(picks) < need:
            group = (*req, *picks)
            nxt = max(rest, key=lambda c: (sc.gain(c, group), -c))
            picks.append(nxt)
            rest.remove(nxt)
        out.append(tuple(sorted(picks)))
    return list(dict.fromkeys(out))


# --- MIG devices ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A device of a MIG or replicated request: its ID, what it groups under, and its order."""

    id: str
    group: str  # MIG: the parent GPU UUID; replicas: the underlying device (GPU or MIG UUID)
    gpu: str  # the physical GPU, for topology
    order: int


def choose_mig(
    topology: Topology,
    candidates: Sequence[Unit],
    required: Sequence[Unit],
    need: int,
    totals: Mapping[str, int],
) -> list[Unit]:
    """Rule 4: `need` MIG devices out of `candidates` (IDs in `required` come on top, not returned).

    `totals` is the number of devices the resource advertises per parent GPU: what is neither free
    nor required is in use.
    """
    free: dict[str, list[Unit]] = {}
    for u in sorted(candidates, key=lambda u: u.order):
        free.setdefault(u.group, []).append(u)
    chosen_parents = list(dict.fromkeys(u.group for u in required))
    required_on = {g: sum(1 for u in required if u.group == g) for g in chosen_parents}
    first_order = {g: ds[0].order for g, ds in free.items()}
    parent_gpu = {u.group: u.gpu for u in (*required, *candidates)}
    out: list[Unit] = []
    while len(out) < need and any(free.values()):
        left = need - len(out)
        gpus = [parent_gpu[g] for g in chosen_parents]  # for closeness: the chosen parents' GPUs

        def rank(g: str, left: int = left, gpus: Sequence[str] = gpus) -> tuple[int, int, int, int, int, int]:
            n = len(free[g])
            in_use = totals.get(g, n) - n - required_on.get(g, 0)
            fits = n >= left
            close = sum(topology.score(parent_gpu[g], o) for o in gpus)
            return (
                0 if g in chosen_parents else 1,
                0 if fits else 1,
                n if fits else -n,  # fits: best fit; otherwise the most free, fewest parents
                -in_use,
                -close,
                first_order[g],
            )

        g = min((g for g, ds in free.items() if ds), key=rank)
        take = free[g][:left]
        free[g] = free[g][left:]
        out.extend(take)
        if g not in chosen_parents:
            chosen_parents.append(g)
    return out


# --- replicas --------------------------------------------------------------------------------------------


def choose_distributed(
    topology: Topology,
    candidates: Sequence[Unit],
    required: Sequence[Unit],
    need: int,
    totals: Mapping[str, int],
) -> list[Unit]:
    """Rule 5: `need` replicas spread over the least used devices (`totals`: replicas per device)."""
    free: dict[str, list[Unit]] = {}
    for u in sorted(candidates, key=lambda u: u.order):
        free.setdefault(u.group, []).append(u)
    # Required replicas are not free, so they already count as in use on their device.
    in_use = {g: totals.get(g, len(ds)) - len(ds) for g, ds in free.items()}
    picked: dict[str, int] = {}
    for u in required:
        picked[u.group] = picked.get(u.group, 0) + 1
    gpus = [u.gpu for u in required]
    out: list[Unit] = []
    score: Callable[[str, str], int] = topology.score
    for _ in range(need):

        def rank(g: str) -> tuple[int, int, int, int]:
            head = free[g][0]
            return (in_use[g], picked.get(g, 0), -sum(score(head.gpu, o) for o in gpus), head.order)

        g = min((g for g, ds in free.items() if ds), key=rank)
        u = free[g].pop(0)
        in_use[g] += 1
        picked[g] = picked.get(g, 0) + 1
        gpus.append(u.gpu)
        out.append(u)
    return out
