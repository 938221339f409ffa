"""Per GPU pair topology (Inventory.links) read through pynvml from the fake libnvidia-ml.so.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from exporter.model import TOPOLOGY_HOSTBRIDGE, TOPOLOGY_NODE, TOPOLOGY_SINGLE, TOPOLOGY_SYSTEM, Inventory
from exporter.nvml import NvmlBackend
from exporter.nvml.topology import parse_bus_id


@pytest.fixture
def discover(fake_nvml: Any) -> Iterator[Callable[[dict[str, Any]], tuple[Inventory, NvmlBackend]]]:
    backends: list[NvmlBackend] = []

    def _discover(scenario: dict[str, Any]) -> tuple[Inventory, NvmlBackend]:
        backend = NvmlBackend(fake_nvml.use(scenario))
        backend.start()
        backends.append(backend)
        return backend.discover(), backend

    yield _discover
    for backend in backends:
        backend.shutdown()


def by_index(inv: Inventory) -> dict[tuple[int, int], tuple[int, int | None]]:
    index = {g.uuid: g.index for g in inv.gpus}
    out = {}
    for link in inv.links:
        a, b = sorted((index[link.a], index[link.b]))
        out[(a, b)] = (link.nvlinks, link.pcie)
    return out


def test_uneven_nvlink_widths_and_pcie_levels(discover: Callable[..., tuple[Inventory, NvmlBackend]]) -> None:
    # Four GPUs: 0-1 four links, 0-2 two links (given on GPU 0 only: the fake mirrors it), 2-3 one link;
    # PCIe: 0 and 1 behind switch 0, 2 and 3 behind switch 1, both switches under host bridge 0 for
    # GPUs 0-2, GPU 3 on the other NUMA node.
    inv, backend = discover(
        {
            "devices": [
                {"numa_node": 0, "pcie_switch": 0, "pcie_root": 0, "nvlink_peers": {"1": 4, "2": 2}},
                {"numa_node": 0, "pcie_switch": 0, "pcie_root": 0},
                {"numa_node": 0, "pcie_switch": 1, "pcie_root": 0, "nvlink_peers": {"3": 1}},
                {"numa_node": 1, "pcie_switch": 2, "pcie_root": 1},
            ]
        }
    )
    assert by_index(inv) == {
        (0, 1): (4, TOPOLOGY_SINGLE),
        (0, 2): (2, TOPOLOGY_HOSTBRIDGE),
        (0, 3): (0, TOPOLOGY_SYSTEM),
        (1, 2): (0, TOPOLOGY_HOSTBRIDGE),
        (1, 3): (0, TOPOLOGY_SYSTEM),
        (2, 3): (1, TOPOLOGY_SYSTEM),
    }
    assert all(link.a < link.b for link in inv.links)
    # The NVLinked pairs from P2P status agree with the link counts.
    linked = {(link.a, link.b) for link in inv.links if link.nvlinks}
    assert inv.nvlink_pairs == frozenset(linked)
    assert backend.discover().links == inv.links  # cached while the GPUs stay


def test_nvswitch_fabric_counts_switch_links(discover: Callable[..., tuple[Inventory, NvmlBackend]]) -> None:
    # HGX H100: 18 links per GPU, all to NVSwitches; every pair reaches the other over 18 links.
    # go-gpuallocator matches remote PCI addresses to GPUs and would count 0 here.
    inv, _ = discover({"nvlink": "switch", "devices": [{"numa_node": i // 2} for i in range(4)]})
    got = by_index(inv)
    assert {pair: n for pair, (n, _) in got.items()} == dict.fromkeys(got, 18)
    assert len(got) == 6
    # No PCIe switch given: the fake answers by NUMA node.
    assert got[(0, 1)][1] == TOPOLOGY_NODE and got[(0, 2)][1] == TOPOLOGY_SYSTEM


def test_all_to_all_deals_links_in_turn(discover: Callable[..., tuple[Inventory, NvmlBackend]]) -> None:
    # "nvlink": "all" with 18 links and 7 peers: the fake deals link l to the l-th peer in turn.
    inv, _ = discover({"nvlink": "all", "devices": [{} for _ in range(8)]})
    counts = sorted(n for n, _ in by_index(inv).values())
    assert len(counts) == 28 and min(counts) >= 2 and sum(counts) * 2 <= 8 * 18


def test_single_gpu_has_no_pairs(discover: Callable[..., tuple[Inventory, NvmlBackend]]) -> None:
    inv, _ = discover({"devices": [{}]})
    assert inv.links == ()


def test_explicit_pcie_matrix(discover: Callable[..., tuple[Inventory, NvmlBackend]]) -> None:
    inv, _ = discover({"pcie_topology": [[0, 20], [20, 0]], "devices": [{}, {}]})
    assert by_index(inv) == {(0, 1): (0, 20)}


def test_parse_bus_id() -> None:
    assert parse_bus_id("00000000:8D:00.0") == (0, 0x8D, 0)
    assert parse_bus_id("0001:C0:1F.0") == (1, 0xC0, 0x1F)
    assert parse_bus_id("n/a") is None
