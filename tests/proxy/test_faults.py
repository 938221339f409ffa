"""Faults around the proxy: each degrades one resource or one input, never the whole, never blames a GPU."""

from __future__ import annotations

import os

from exporter.health.verdict import Verdict
from exporter.proxy.ids import DeviceIds
from exporter.proxy.proxy import DevicePluginProxy
from tests.deviceplugin.fakes import FakeHealth
from tests.proxy.conftest import GPUS, RESOURCE, Node, wait_until
from tests.proxy.standin import StandInPlugin


def test_a_deleted_upstream_kubelet_sock_is_recreated_and_the_plugin_registers_again(node: Node) -> None:
    proxy = node.proxy()
    plugin = node.plugin()
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    starts = plugin.starts
    os.unlink(proxy.registrar.path)
    assert wait_until(lambda: proxy.registrar.socket_ok() and plugin.starts > starts and plugin.registered.is_set())
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    assert len(node.kubelet.registrations) == 1  # the kubelet's registration was never touched


def test_nvidias_plugin_serving_the_kubelets_directory_itself_is_not_taken_over(node: Node) -> None:
    # Misconfigured: NVIDIA's plugin has the real kubelet directory, and registered there directly.
    direct = StandInPlugin(node.kubelet.plugin_dir, GPUS).start()
    node.plugins.append(direct)
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    proxy = node.proxy()
    node.plugin()  # and a second one registers with the proxy under the same endpoint name
    assert wait_until(lambda: any("served by another process" in p for p in proxy.problems()))
    assert len(node.kubelet.registrations) == 1 and direct.registrations == 1  # the proxy stayed off


def test_before_any_upstream_registers_ready_says_so(node: Node) -> None:
    proxy = node.proxy()
    assert proxy.problems() == [f"no upstream device plugin has registered at {proxy.registrar.path} yet"]
    assert node.kubelet.registrations == []


class BrokenHealth(FakeHealth):
    def verdict(self, uuid: str) -> Verdict:
        raise RuntimeError("verdict store unreadable")


def test_a_verdict_that_cannot_be_read_holds_the_device_back(node: Node) -> None:
    ids = DeviceIds(node.inventory)
    proxy = DevicePluginProxy(node.upstream_dir, node.kubelet.plugin_dir, BrokenHealth(), lambda: ids)
    proxy.start()
    node.proxies.append(proxy)
    node.plugin()
    node.wait_kubelet(lambda: node.kubelet.capacity(RESOURCE) == 4)
    assert node.kubelet.allocatable(RESOURCE) == 0
