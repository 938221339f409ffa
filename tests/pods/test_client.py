"""PodResourcesClient against a real gRPC fake kubelet."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from podresources.client import BackingOffError, PodResourcesClient, PodResourcesError
from tests.fakekubelet import FakeKubelet
from tests.pods.podfixtures import big_layout, container, gpu_uuid, pod


def test_list_allocatable_and_get(kubelet: FakeKubelet) -> None:
    kubelet.set_pods([pod("p", "ns", container("c", "nvidia.com/gpu", [gpu_uuid(0)]))])
    kubelet.set_allocatable([{"resource_name": "nvidia.com/gpu", "device_ids": [gpu_uuid(0), gpu_uuid(1)]}])
    client = PodResourcesClient(kubelet.socket_path, timeout_s=5)
    pods = client.list()
    assert [(p.namespace, p.name, p.containers[0].name) for p in pods] == [("ns", "p", "c")]
    assert pods[0].containers[0].devices[0].device_ids == (gpu_uuid(0),)
    alloc = client.get_allocatable_resources()
    assert alloc.devices[0].device_ids == (gpu_uuid(0), gpu_uuid(1))
    assert client.get("p", "ns").containers[0].devices[0].resource_name == "nvidia.com/gpu"
    with pytest.raises(PodResourcesError) as err:
        client.get("missing", "ns")
    assert err.value.code == "NOT_FOUND"
    assert client.request_counts()[("List", "OK")] == 1


def test_reply_over_4mib_works_with_16mib_limit(kubelet: FakeKubelet) -> None:
    kubelet.set_pods(big_layout())
    assert kubelet._list_v1.ByteSize() > 4 * 1024 * 1024  # the scenario that broke dcgm-exporter
    pods = PodResourcesClient(kubelet.socket_path, timeout_s=20).list()
    assert len(pods) == 200 and all(len(p.containers) == 8 for p in pods)
    # Proof the limit is what makes it work: gRPC's default would reject the same reply.
    small = PodResourcesClient(kubelet.socket_path, timeout_s=20, max_receive_bytes=4 * 1024 * 1024)
    with pytest.raises(PodResourcesError) as err:
        small.list()
    assert err.value.code == "RESOURCE_EXHAUSTED"


def test_reconnects_after_kubelet_restart(kubelet: FakeKubelet) -> None:
    kubelet.set_pods([pod("before", "ns", container("c"))])
    client = PodResourcesClient(kubelet.socket_path, timeout_s=5)
    assert [p.name for p in client.list()] == ["before"]
    kubelet.set_pods([pod("after", "ns", container("c"))])
    kubelet.restart()  # socket deleted and recreated: new inode
    assert [p.name for p in client.list()] == ["after"]


def test_kubelet_absent_then_appears(sock_dir: Path) -> None:
    path = sock_dir / "kubelet.sock"
    client = PodResourcesClient(str(path), timeout_s=5)
    t0 = time.monotonic()
    with pytest.raises(PodResourcesError) as err:
        client.list()
    assert err.value.code == "UNAVAILABLE"
    assert time.monotonic() - t0 < 1.0  # no socket: fail fast, do not wait for the timeout
    with FakeKubelet(path, {"pods": [pod("p", "ns", container("c"))]}):
        assert [p.name for p in client.list()] == ["p"]


def test_resource_exhausted_backs_off_without_calling(kubelet: FakeKubelet) -> None:
    now = [100.0]
    client = PodResourcesClient(kubelet.socket_path, timeout_s=5, backoff_initial_s=2.0, clock=lambda: now[0])
    kubelet.set_behaviour("List", "resource_exhausted")
    with pytest.raises(PodResourcesError) as err:
        client.list()
    assert err.value.code == "RESOURCE_EXHAUSTED"
    kubelet.set_behaviour("List", "ok")
    with pytest.raises(BackingOffError):
        client.list()
    assert kubelet.calls["List"] == 1  # the second attempt never reached the kubelet
    now[0] += 2.1
    assert client.list() == []
    assert client.request_counts() == {("List", "RESOURCE_EXHAUSTED"): 1, ("List", "OK"): 1}


def test_backoff_grows_and_resets(kubelet: FakeKubelet) -> None:
    now = [0.0]
    client = PodResourcesClient(kubelet.socket_path, backoff_initial_s=1.0, backoff_max_s=4.0, clock=lambda: now[0])
    kubelet.set_behaviour("List", "unavailable")
    waits = []
    for _ in range(4):
        with pytest.raises(PodResourcesError):
            client.list()
        start = now[0]
        while client.backing_off():
            now[0] += 0.5
        waits.append(now[0] - start)
    assert waits == [1.0, 2.0, 4.0, 4.0]


def test_hanging_kubelet_respects_timeout(kubelet: FakeKubelet) -> None:
    kubelet.set_behaviour("List", "hang")
    client = PodResourcesClient(kubelet.socket_path, timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(PodResourcesError) as err:
        client.list()
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert time.monotonic() - t0 < 2.0


def test_falls_back_to_v1alpha1_when_v1_unimplemented(sock_dir: Path) -> None:
    layout = {"pods": [pod("old", "ns", container("c", "nvidia.com/gpu", [gpu_uuid(1)]))], "serve_v1": False}
    with FakeKubelet(sock_dir / "kubelet.sock", layout) as fake:
        client = PodResourcesClient(fake.socket_path, timeout_s=5)
        for _ in range(2):
            pods = client.list()
            assert pods[0].containers[0].devices[0].device_ids == (gpu_uuid(1),)
        # v1 is asked once; afterwards the client goes straight to v1alpha1.
        assert client.request_counts() == {("List", "UNIMPLEMENTED"): 1, ("v1alpha1.List", "OK"): 2}
