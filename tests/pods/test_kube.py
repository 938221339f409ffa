"""Pod labels / UIDs from a node-scoped pod watch, and DRA claims via ResourceSlices.

Driven through the real `kubernetes` client against tests/fakeapiserver.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.model import Inventory
from exporter.pods import PodMapper, PodMappingConfig
from tests.fakeapiserver import FakeApiServer
from tests.fakekubelet import FakeKubelet
from tests.pods.podfixtures import container, gpu_uuid, make_inventory, mig_uuid, pod

GPU = "nvidia.com/gpu"
LabelSets = tuple[tuple[tuple[str, str], ...], ...]


def eventually(mapper: PodMapper, inv: Inventory, check: Callable[[], bool], timeout_s: float = 10) -> None:
    """Refresh like the collection loop does until `check` holds (watch data arrives asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        mapper.refresh(inv)
        assert mapper.wait_idle(10)
        if check():
            return
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def api_pod(name: str, ns: str, uid: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "uid": uid,
            "labels": labels}, "spec": {"nodeName": node}}  # fmt: skip


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def mappers() -> Iterator[list[PodMapper]]:
    made: list[PodMapper] = []
    yield made
    for m in made:
        m.close()


def test_pod_uid_and_labels_from_node_scoped_watch(
    kubelet: FakeKubelet, api: FakeApiServer, sock_dir: Path, mappers: list[PodMapper]
) -> None:
    inv = make_inventory(1)
    kubeconfig = api.write_kubeconfig(sock_dir / "kubeconfig")
    labels = {"app.kubernetes.io/name": "trainer", "team": "ml", "pod": "clash", "secret-ish": "x"}
    api.upsert_pod(api_pod("p", "ns", "uid-1", "node1", labels))
    api.upsert_pod(api_pod("elsewhere", "ns", "uid-2", "node2", {}))
    kubelet.set_pods([pod("p", "ns", container("c", GPU, [gpu_uuid(0)]))])
    cfg = PodMappingConfig(
        socket_path=kubelet.socket_path, enable_pod_uid=True, enable_pod_labels=True,
        pod_labels_allowlist=r"app\..*|team|pod", kubeconfig=kubeconfig, node_name="node1", watch_timeout_s=5,
    )  # fmt: skip
    m = PodMapper(cfg)
    mappers.append(m)

    def labels_now() -> LabelSets:
        return m.labels_for(gpu_uuid(0), None)

    eventually(m, inv, lambda: len(labels_now()[0]) > 3)
    assert labels_now() == ((
        ("container", "c"), ("namespace", "ns"), ("pod", "p"), ("pod_uid", "uid-1"),
        # sanitised; "pod" would clash with the pod label itself and "secret-ish" is not allowlisted
        ("app_kubernetes_io_name", "trainer"), ("team", "ml"),
    ),)  # fmt: skip

    # A label change arrives through the watch, not through a new GET.
    api.upsert_pod(api_pod("p", "ns", "uid-1", "node1", {**labels, "team": "infra"}))
    eventually(m, inv, lambda: ("team", "infra") in labels_now()[0])
    lists = [r for r in api.requests if r.path == "/api/v1/pods" and r.query.get("watch") != "true"]
    watches = [r for r in api.requests if r.path == "/api/v1/pods" and r.query.get("watch") == "true"]
    assert len(lists) == 1 and len(watches) >= 1
    assert all(r.query["fieldSelector"] == "spec.nodeName=node1" for r in lists + watches)


def test_without_node_name_no_cluster_wide_watch(
    kubelet: FakeKubelet, api: FakeApiServer, sock_dir: Path, mappers: list[PodMapper], monkeypatch: Any
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    kubelet.set_pods([pod("p", "ns", container("c", GPU, [gpu_uuid(0)]))])
    cfg = PodMappingConfig(socket_path=kubelet.socket_path, enable_pod_labels=True,
                           kubeconfig=api.write_kubeconfig(sock_dir / "kc"))  # fmt: skip
    m = PodMapper(cfg)
    mappers.append(m)
    m.refresh(make_inventory(1))
    assert m.wait_idle(10)
    assert dict(m.labels_for(gpu_uuid(0), None)[0])["pod"] == "p"  # kubelet attribution still works
    assert api.requests == []


def resource_slice(version: str, devices: list[tuple[str, dict[str, str]]]) -> dict[str, Any]:
    def attrs(a: dict[str, str]) -> dict[str, Any]:
        return {k: {"string": v} for k, v in a.items()}

    devs: list[dict[str, Any]] = [
        {"name": n, "attributes": attrs(a)} if version != "v1beta1" else {"name": n, "basic": {"attributes": attrs(a)}}
        for n, a in devices
    ]
    return {
        "apiVersion": f"resource.k8s.io/{version}", "kind": "ResourceSlice",
        "metadata": {"name": "node1-gpu.nvidia.com-x"},
        "spec": {"driver": "gpu.nvidia.com", "nodeName": "node1",
                 "pool": {"name": "node1", "generation": 1, "resourceSliceCount": 1}, "devices": devs},
    }  # fmt: skip


def claim(device: str, driver: str = "gpu.nvidia.com") -> dict[str, Any]:
    return {"claim_name": f"claim-{device}", "claim_namespace": "ns",
            "claim_resources": [{"driver_name": driver, "pool_name": "node1", "device_name": device}]}  # fmt: skip


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_dra_claims_mapped_through_resource_slices(
    kubelet: FakeKubelet, sock_dir: Path, mappers: list[PodMapper], version: str
) -> None:
    inv = make_inventory(3, mig={1: [(1, "1g.10gb"), (2, "3g.40gb")]})
    with FakeApiServer(resource_versions=(version,)) as api:  # v1beta1 only: an older cluster
        api.upsert_resource_slice(resource_slice(version, [
            ("gpu-0", {"uuid": gpu_uuid(0), "type": "gpu"}),
            ("gpu-1-mig-2", {"uuid": mig_uuid(1, 2), "parentUUID": gpu_uuid(1), "profile": "3g.40gb"}),
            ("gpu-2", {"gpu.nvidia.com/uuid": gpu_uuid(2)}),  # fully qualified attribute name
        ]))  # fmt: skip
        kubelet.set_pods([
            pod("dra-a", "ns", container("c", dynamic_resources=[claim("gpu-0")])),
            pod("dra-b", "ns", container("c", dynamic_resources=[claim("gpu-1-mig-2")])),
            pod("dra-c", "ns", container("c", dynamic_resources=[claim("gpu-2", driver="other.vendor.com")])),
        ])  # fmt: skip
        cfg = PodMappingConfig(socket_path=kubelet.socket_path, dra=True, node_name="node1",
                               kubeconfig=api.write_kubeconfig(sock_dir / "kc"), watch_timeout_s=5)  # fmt: skip
        m = PodMapper(cfg)
        mappers.append(m)
        eventually(m, inv, lambda: m.labels_for(gpu_uuid(0), None) != ())
        assert m.labels_for(gpu_uuid(0), None) == ((("container", "c"), ("namespace", "ns"), ("pod", "dra-a")),)
        assert dict(m.labels_for(gpu_uuid(1), 2)[0])["pod"] == "dra-b"
        assert m.labels_for(gpu_uuid(2), None) == ()  # another driver's claim is not a GPU of ours
        m.close()


def test_process_metrics_alone_runs_the_node_scoped_pod_watch_with_container_ids(
    kubelet: FakeKubelet, api: FakeApiServer, sock_dir: Path, mappers: list[PodMapper]
) -> None:
    """--process-metrics needs pod names for GPU processes: the pod watch runs without pod labels or
    UIDs, keeps each container's ID (runtime prefix stripped), and GPU series get no pod_uid."""
    pod_obj = api_pod("p", "ns", "uid-1", "node1", {})
    pod_obj["status"] = {"containerStatuses": [{"name": "c", "containerID": "cri-o://" + "ab" * 32}]}
    api.upsert_pod(pod_obj)
    kubelet.set_pods([pod("p", "ns", container("c", GPU, [gpu_uuid(0)]))])
    cfg = PodMappingConfig(socket_path=kubelet.socket_path, process_metrics=True,
                           kubeconfig=api.write_kubeconfig(sock_dir / "kc"), node_name="node1")  # fmt: skip
    m = PodMapper(cfg)
    mappers.append(m)
    inv = make_inventory(1)
    assert m.pod_items() is None  # nothing before the first refresh starts the worker

    def containers() -> tuple[tuple[str, str], ...]:
        items = m.pod_items()
        meta = items[1].get(("ns", "p")) if items is not None else None
        return meta.containers if meta is not None else ()

    eventually(m, inv, lambda: containers() != ())
    assert containers() == (("ab" * 32, "c"),)
    assert "pod_uid" not in dict(m.labels_for(gpu_uuid(0), None)[0])
    watches = [r for r in api.requests if r.path == "/api/v1/pods"]
    assert watches and all(r.query["fieldSelector"] == "spec.nodeName=node1" for r in watches)
