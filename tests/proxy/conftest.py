"""A proxy wired in-process between a stand-in NVIDIA plugin and the fake kubelet, each on its own
short /tmp directory (unix socket paths are limited to 107 bytes)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from exporter.model import Inventory
from exporter.proxy.ids import DeviceIds
from exporter.proxy.proxy import DevicePluginProxy
from tests.deviceplugin.fakekubelet_registration import FakeKubelet, running_kubelet
from tests.deviceplugin.fakes import FakeHealth, gpu, inventory, uuid
from tests.proxy.standin import StandInPlugin

RESOURCE = "nvidia.com/gpu"
GPUS = [uuid(i) for i in range(4)]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `predicate` until it holds or `timeout` passes (for state outside the fake kubelet)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclass
class Node:
    upstream_dir: str
    kubelet: FakeKubelet
    health: FakeHealth
    inventory: Inventory
    proxies: list[DevicePluginProxy]
    plugins: list[StandInPlugin]

    def proxy(self) -> DevicePluginProxy:
        """A started proxy (a new one per call: a proxy restart is stop() + proxy())."""
        ids = DeviceIds(self.inventory)
        p = DevicePluginProxy(self.upstream_dir, self.kubelet.plugin_dir, self.health, lambda: ids)
        p.start()
        self.proxies.append(p)
        return p

    def plugin(self, devices: list[str] | None = None, resource: str = RESOURCE) -> StandInPlugin:
        p = StandInPlugin(self.upstream_dir, devices if devices is not None else GPUS, resource).start()
        self.plugins.append(p)
        return p

    def wait_kubelet(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        assert self.kubelet.wait_for(predicate, timeout), (self.kubelet.latest(RESOURCE), self.kubelet.errors)

    def health_at_kubelet(self, device_id: str, resource: str = RESOURCE) -> str | None:
        last = self.kubelet.latest(resource)
        if last is None or device_id not in last.ids:
            return None
        return last.health_of(device_id)


@pytest.fixture
def node() -> Iterator[Node]:
    upstream_dir = tempfile.mkdtemp(prefix="ghe-up-", dir="/tmp")
    with running_kubelet() as kubelet:
        n = Node(upstream_dir, kubelet, FakeHealth(), inventory([gpu(i) for i in range(4)]), [], [])
        try:
            yield n
        finally:
            for plugin in n.plugins:
                plugin.stop()
            for proxy in n.proxies:
                proxy.stop()
            shutil.rmtree(upstream_dir, ignore_errors=True)
