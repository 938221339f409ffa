"""Restarts of NVIDIA's plugin, the kubelet and the proxy, alone and in every order: the kubelet's
registration follows, and no message ever calls the fenced GPU Healthy."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from exporter.health.verdict import HealthState
from tests.proxy.conftest import GPUS, RESOURCE, Node, wait_until
from tests.proxy.standin import StandInPlugin

FENCED = GPUS[1]


def steady(node: Node) -> None:
    """Registered, streaming, the fenced GPU Unhealthy and the other three Healthy."""

    def settled() -> bool:
        last = node.kubelet.latest(RESOURCE)
        return last is not None and last.healthy == set(GPUS) - {FENCED}

    node.wait_kubelet(settled, timeout=10)


def never_advertised_healthy(node: Node) -> None:
    for message in node.kubelet.messages(RESOURCE):
        assert FENCED not in message.healthy, message


def fenced_node(node: Node) -> StandInPlugin:
    node.health.set(FENCED, HealthState.UNHEALTHY)
    node.proxy()
    plugin = node.plugin()
    steady(node)
    return plugin


def restart_plugin(node: Node, plugin: StandInPlugin) -> None:
    starts = plugin.starts
    plugin.restart()
    assert wait_until(lambda: plugin.starts > starts and plugin.registered.is_set(), timeout=10)


def restart_kubelet(node: Node, plugin: StandInPlugin) -> None:
    starts = plugin.starts
    node.kubelet.restart()
    node.wait_kubelet(lambda: len(node.kubelet.registrations) == 1, timeout=10)
    # The proxy re-created the upstream's kubelet.sock: NVIDIA's plugin restarted and registered again.
    assert wait_until(lambda: plugin.starts > starts and plugin.registered.is_set(), timeout=10)


def restart_proxy(node: Node, plugin: StandInPlugin) -> None:
    starts, registrations = plugin.starts, len(node.kubelet.registrations)
    node.proxies.pop().stop()
    never_advertised_healthy(node)
    node.proxy()
    assert wait_until(lambda: plugin.starts > starts and plugin.registered.is_set(), timeout=10)
    node.wait_kubelet(lambda: len(node.kubelet.registrations) > registrations, timeout=10)


RESTARTS: dict[str, Callable[[Node, StandInPlugin], None]] = {
    "plugin": restart_plugin,
    "kubelet": restart_kubelet,
    "proxy": restart_proxy,
}


def test_nvidias_plugin_restarting_keeps_our_kubelet_registration(node: Node) -> None:
    plugin = fenced_node(node)
    registrations = len(node.kubelet.registrations)
    plugin.stop()
    # Its stream is down: the kubelet keeps the capacity, allocates nothing, and keeps our registration.
    node.wait_kubelet(lambda: node.kubelet.capacity(RESOURCE) == 4 and node.kubelet.allocatable(RESOURCE) == 0)
    assert node.proxies[0].problems() == [f"{RESOURCE}: upstream plugin not streaming"]
    # The kubelet asks for the options (inside a Register) while the plugin is away: the registered ones.
    assert node.kubelet.stub(RESOURCE).GetDevicePluginOptions(plugin_empty(), timeout=5) == plugin.options
    plugin.start()
    steady(node)
    assert len(node.kubelet.registrations) == registrations and node.kubelet.ended.get(RESOURCE, 0) == 0
    never_advertised_healthy(node)


def test_a_kubelet_restart_while_the_plugin_is_away_registers_what_is_known(node: Node) -> None:
    plugin = fenced_node(node)
    plugin.stop()
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 0)
    node.kubelet.restart()
    node.wait_kubelet(lambda: node.kubelet.capacity(RESOURCE) == 4, timeout=10)
    assert node.kubelet.allocatable(RESOURCE) == 0
    plugin.start()
    steady(node)
    never_advertised_healthy(node)


def test_the_proxy_restarting_brings_nvidias_plugin_back_through_its_kubelet_sock(node: Node) -> None:
    plugin = fenced_node(node)
    restart_proxy(node, plugin)
    node.wait_kubelet(lambda: node.kubelet.latest(RESOURCE) is not None)
    first = node.kubelet.messages(RESOURCE)[0]
    assert FENCED not in first.healthy and len(first.devices) == 4  # the new endpoint's very first list
    steady(node)


@pytest.mark.parametrize("order", list(itertools.permutations(RESTARTS)), ids="-".join)
def test_every_restart_order(node: Node, order: tuple[str, ...]) -> None:
    plugin = fenced_node(node)
    for which in order:
        RESTARTS[which](node, plugin)
        never_advertised_healthy(node)
        steady(node)
        never_advertised_healthy(node)
    # A stream cut by a stopping proxy's server reads as UNAVAILABLE to the kubelet, which handles it
    # as any end of stream; any other error (a failed dial-back or GetDevicePluginOptions) is a bug.
    assert [e for e in node.kubelet.errors if "Cancelling all calls" not in e] == []


def plugin_empty() -> object:
    from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb

    return pb.Empty()
