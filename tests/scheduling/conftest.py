"""Fixtures for the scheduling consumers: a health engine, a fake API server, ResourceSlices like
NVIDIA's DRA driver publishes them, and a poll-with-deadline helper."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.health.engine import HealthEngine
from exporter.health.policy import Policy
from exporter.pods.kube import make_api_client
from exporter.scheduling.faults import ApiFaults
from tests.fakeapiserver import FakeApiServer
from tests.fakekubelet import FakeKubelet
from tests.health.conftest import GPU0, GPU1, MIG_A, MIG_B, Clock, inventory, xid

__all__ = ["GPU0", "GPU1", "MIG_A", "MIG_B", "NODE", "inventory", "xid"]

NODE = "node1"
DRIVER = "gpu.nvidia.com"
TAINT_VERSIONS = ("v1alpha3", "v1beta2", "v1")


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def nvidia_slice(node: str = NODE, mig: bool = False, name: str | None = None) -> dict[str, Any]:
    """A ResourceSlice as NVIDIA's DRA driver publishes it: pool = node name, gpu-<minor>, MIG
    gpu-<minor>-mig-<profile>-<profileID>-<start>, a `uuid` attribute on each device."""
    devices: list[dict[str, Any]] = [
        {"name": "gpu-0", "attributes": {"type": {"string": "gpu"}, "uuid": {"string": GPU0}}},
        {"name": "gpu-1", "attributes": {"type": {"string": "gpu"}, "uuid": {"string": GPU1}}},
    ]
    if mig:
        devices = [devices[1]]
        for i, uuid in enumerate((MIG_A, MIG_B)):
            attrs = {"type": {"string": "mig"}, "uuid": {"string": uuid}, "parentUUID": {"string": GPU0}}
            devices.append({"name": f"gpu-0-mig-3g40gb-9-{i * 4}", "attributes": attrs})
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name or f"{node}-{DRIVER}-abcde"},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_engine(tmp_path: Path, clock: Clock) -> Iterator[Callable[..., HealthEngine]]:
    engines: list[HealthEngine] = []

    def factory(state_dir: Path | None = None) -> HealthEngine:
        eng = HealthEngine(Policy.build(), state_dir or tmp_path / "state", clock, control_socket=False)
        eng.start()
        engines.append(eng)
        return eng

    yield factory
    for eng in engines:
        eng.stop()


@pytest.fixture
def engine(make_engine: Callable[..., HealthEngine]) -> HealthEngine:
    return make_engine()


@pytest.fixture
def faults() -> ApiFaults:
    return ApiFaults(NODE)


ApiFactory = Callable[..., tuple[FakeApiServer, Any]]


@pytest.fixture
def make_api(tmp_path: Path) -> Iterator[ApiFactory]:
    """FakeApiServer(**kw), started, and a real kubernetes ApiClient for it."""
    servers: list[FakeApiServer] = []

    def factory(**kw: Any) -> tuple[FakeApiServer, Any]:
        server = FakeApiServer(**kw).start()
        servers.append(server)
        return server, make_api_client(server.write_kubeconfig(tmp_path / f"kubeconfig-{len(servers)}"))

    yield factory
    for s in servers:
        s.stop()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fk-"))  # unix socket paths are limited to ~107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def kubelet(sock_dir: Path) -> Iterator[FakeKubelet]:
    fake = FakeKubelet(sock_dir / "kubelet.sock").start()
    yield fake
    fake.stop()
