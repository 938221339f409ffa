"""PodMapper: what a user sees on GPU series and in the mapper's own metrics."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.labels import RenderContext
from exporter.model import Inventory
from exporter.pods import PodMapper, PodMappingConfig
from podresources.client import PodResourcesClient
from tests.fakekubelet import FakeKubelet
from tests.pods.podfixtures import big_layout, container, gpu_uuid, make_inventory, mig_uuid, pod

GPU = "nvidia.com/gpu"


def ctx_for(inv: Inventory) -> RenderContext:
    ctx = RenderContext(hostname_label="Hostname", hostname="node1")
    ctx.rebuild(inv)
    return ctx


def refreshed(mapper: PodMapper, inv: Inventory) -> PodMapper:
    mapper.refresh(inv)
    assert mapper.wait_idle(10)
    return mapper


@pytest.fixture
def make_mapper(kubelet: FakeKubelet) -> Iterator[Any]:
    made: list[PodMapper] = []

    def make(client: PodResourcesClient | None = None, **cfg: Any) -> PodMapper:
        m = PodMapper(PodMappingConfig(socket_path=kubelet.socket_path, **cfg), client=client)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]


def _uuid(sample: str) -> str:
    match = re.search(r'uuid="([^"]+)"', sample)
    assert match is not None
    return match.group(1)


def test_exclusive_gpus(kubelet: FakeKubelet, make_mapper: Any) -> None:
    inv = make_inventory(5)
    kubelet.set_pods([
        pod("train", "ml", container("worker", GPU, [gpu_uuid(0), gpu_uuid(1)]), container("sidecar")),
        pod("infer", "web", container("server", GPU, [gpu_uuid(2)])),
        pod("nic-only", "net", container("c", "example.com/nic", ["eth0"])),
    ])  # fmt: skip
    kubelet.set_allocatable([{"resource_name": GPU, "device_ids": [gpu_uuid(i) for i in range(4)]}])
    m = refreshed(make_mapper(), inv)
    assert m.labels_for(gpu_uuid(0), None) == ((("container", "worker"), ("namespace", "ml"), ("pod", "train")),)
    assert m.labels_for(gpu_uuid(1), None) == m.labels_for(gpu_uuid(0), None)
    assert m.labels_for(gpu_uuid(2), None) == ((("container", "server"), ("namespace", "web"), ("pod", "infer")),)
    assert m.labels_for(gpu_uuid(3), None) == ()  # no pod: no pod labels at all, not empty strings

    text = m.render_metrics(ctx_for(inv))
    assert "gpuhealth_pod_mapping_refresh_success 1" in text
    assert 'gpuhealth_kubelet_requests_total{method="List",code="OK"} 1' in text
    alloc = series(text, "gpuhealth_gpu_allocation_info")
    assert len(alloc) == 4  # GPUs 0-2 in use, GPU 3 free; GPU 4 is not allocatable at all
    assert any(f'uuid="{gpu_uuid(3)}"' in s and 'namespace="",pod="",container=""' in s for s in alloc)
    assert any(f'uuid="{gpu_uuid(2)}"' in s and 'resource="nvidia.com/gpu",namespace="web",pod="infer"' in s
               for s in alloc)  # fmt: skip
    # GPU 4 is on the node but the kubelet does not list it as allocatable: it considers it unhealthy.
    unhealthy = {_uuid(s): s[-1] for s in series(text, "gpuhealth_kubelet_device_unhealthy")}
    assert unhealthy == {gpu_uuid(0): "0", gpu_uuid(1): "0", gpu_uuid(2): "0", gpu_uuid(3): "0", gpu_uuid(4): "1"}


def test_mig_mixed_strategy(kubelet: FakeKubelet, make_mapper: Any) -> None:
    inv = make_inventory(2, mig={0: [(1, "3g.40gb"), (2, "1g.10gb"), (3, "1g.10gb")]})
    kubelet.set_pods([
        pod("big", "ml", container("c", "nvidia.com/mig-3g.40gb", [mig_uuid(0, 1)])),
        # R450/R460 drivers named MIG devices MIG-GPU-<uuid>/<gi>/<ci>.
        pod("small", "ml", container("c", "nvidia.com/mig-1g.10gb", [f"MIG-{gpu_uuid(0)}/2/0"])),
        pod("whole", "ml", container("c", GPU, [gpu_uuid(1)])),
    ])  # fmt: skip
    kubelet.set_allocatable([
        {"resource_name": "nvidia.com/mig-3g.40gb", "device_ids": [mig_uuid(0, 1)]},
        {"resource_name": "nvidia.com/mig-1g.10gb", "device_ids": [mig_uuid(0, 2)]},  # gi 3 missing: unhealthy
        {"resource_name": GPU, "device_ids": [gpu_uuid(1)]},
    ])  # fmt: skip
    m = refreshed(make_mapper(), inv)
    assert m.labels_for(gpu_uuid(0), 1) == ((("container", "c"), ("namespace", "ml"), ("pod", "big")),)
    assert m.labels_for(gpu_uuid(0), 2) == ((("container", "c"), ("namespace", "ml"), ("pod", "small")),)
    assert m.labels_for(gpu_uuid(0), 3) == ()
    # The whole-GPU series of a MIG-enabled GPU belongs to no single pod.
    assert m.labels_for(gpu_uuid(0), None) == ()
    assert m.labels_for(gpu_uuid(1), None) == ((("container", "c"), ("namespace", "ml"), ("pod", "whole")),)

    text = m.render_metrics(ctx_for(inv))
    bad = series(text, "gpuhealth_kubelet_device_unhealthy")
    flagged = [s for s in bad if s.endswith(" 1")]
    assert len(flagged) == 1
    assert 'gpu_i_id="3"' in flagged[0] and 'resource="nvidia.com/mig-1g.10gb"' in flagged[0]
    assert any('gpu_i_id="2"' in s and 'pod="small"' in s for s in series(text, "gpuhealth_gpu_allocation_info"))


def shared_layout() -> list[dict[str, Any]]:
    """GPU 0 time-sliced into 4 replicas used by 3 pods (one pod has two containers on it)."""
    res = "nvidia.com/gpu.shared"
    return [
        pod("p3", "team", container("c", res, [f"{gpu_uuid(0)}::2"])),
        pod("p1", "team", container("c", res, [f"{gpu_uuid(0)}::0"])),
        pod("p2", "team", container("a", res, [f"{gpu_uuid(0)}::1"]), container("b", res, [f"{gpu_uuid(0)}::3"])),
    ]


def test_shared_gpu_one_series_per_container_with_vgpu(kubelet: FakeKubelet, make_mapper: Any) -> None:
    inv = make_inventory(2)
    kubelet.set_pods(shared_layout())
    replicas = [f"{gpu_uuid(i)}::{n}" for i in range(2) for n in range(4)]
    kubelet.set_allocatable([{"resource_name": "nvidia.com/gpu.shared", "device_ids": replicas}])
    m = refreshed(make_mapper(), inv)
    got = [(dict(ls)["pod"], dict(ls)["container"], dict(ls)["vgpu"]) for ls in m.labels_for(gpu_uuid(0), None)]
    assert got == [("p1", "c", "0"), ("p2", "a", "1"), ("p3", "c", "2"), ("p2", "b", "3")]
    assert [k for k, _ in m.labels_for(gpu_uuid(0), None)[0]] == ["container", "namespace", "pod", "vgpu"]
    text = m.render_metrics(ctx_for(inv))
    # Every replica of GPU 1 is allocatable: healthy; no pods: one free allocation row.
    assert sum(1 for s in series(text, "gpuhealth_kubelet_device_unhealthy") if s.endswith(" 1")) == 0
    assert sum(1 for s in series(text, "gpuhealth_gpu_allocation_info") if gpu_uuid(0) in s) == 4


def test_shared_gpu_first_pod_mode(kubelet: FakeKubelet, make_mapper: Any) -> None:
    kubelet.set_pods(shared_layout())
    m = refreshed(make_mapper(shared_mode="first-pod"), make_inventory(2))
    assert m.labels_for(gpu_uuid(0), None) == ((("container", "c"), ("namespace", "team"), ("pod", "p1")),)


def test_gke_device_names(kubelet: FakeKubelet, make_mapper: Any) -> None:
    # Minor numbers are index + 10 in make_inventory: nvidia10 is GPU 0.
    inv = make_inventory(3, mig={2: [(1, "1g.10gb"), (2, "1g.10gb")]})
    kubelet.set_pods([
        pod("a", "ns", container("c", GPU, ["nvidia10"])),
        pod("b", "ns", container("c", GPU, ["nvidia11/vgpu1"])),
        pod("m", "ns", container("c", GPU, ["nvidia12/gi2"])),
        pod("ghost", "ns", container("c", GPU, ["nvidia99"])),
    ])  # fmt: skip
    m = refreshed(make_mapper(gpu_id_type="device-name"), inv)
    assert dict(m.labels_for(gpu_uuid(0), None)[0])["pod"] == "a"
    assert dict(m.labels_for(gpu_uuid(1), None)[0]) == {"container": "c", "namespace": "ns", "pod": "b", "vgpu": "1"}
    assert dict(m.labels_for(gpu_uuid(2), 2)[0])["pod"] == "m"
    assert m.labels_for(gpu_uuid(2), 1) == ()


def test_only_gpu_resources_and_configured_extras(kubelet: FakeKubelet, make_mapper: Any) -> None:
    inv = make_inventory(2)
    kubelet.set_pods([
        pod("custom", "ns", container("c", "example.com/h100", [gpu_uuid(0)])),
        pod("other", "ns", container("c", "example.com/fpga", [gpu_uuid(1)])),
    ])  # fmt: skip
    assert refreshed(make_mapper(), inv).labels_for(gpu_uuid(0), None) == ()
    m = refreshed(make_mapper(resource_names=("example.com/h100",)), inv)
    assert dict(m.labels_for(gpu_uuid(0), None)[0])["pod"] == "custom"
    assert m.labels_for(gpu_uuid(1), None) == ()


def test_labels_follow_pods_and_vanish_when_they_end(kubelet: FakeKubelet, make_mapper: Any) -> None:
    inv = make_inventory(1)
    kubelet.set_pods([pod("old", "ns", container("c", GPU, [gpu_uuid(0)]))])
    m = refreshed(make_mapper(), inv)
    assert dict(m.labels_for(gpu_uuid(0), None)[0])["pod"] == "old"
    kubelet.set_pods([])
    refreshed(m, inv)
    assert m.labels_for(gpu_uuid(0), None) == ()


def test_hanging_kubelet_never_blocks_refresh(kubelet: FakeKubelet, make_mapper: Any) -> None:
    inv = make_inventory(1)
    kubelet.set_behaviour("List", "hang")
    m = make_mapper(kubelet_timeout_s=0.5)
    t0 = time.monotonic()
    for _ in range(20):  # many collection cycles while one List hangs
        m.refresh(inv)
    assert time.monotonic() - t0 < 0.1
    assert m.wait_idle(5)
    # One List in flight, the other 19 refreshes coalesced into at most one more.
    assert 1 <= kubelet.calls["List"] <= 2
    text = m.render_metrics(ctx_for(inv))
    assert "gpuhealth_pod_mapping_refresh_success 0" in text
    assert 'gpuhealth_kubelet_requests_total{method="List",code="DEADLINE_EXCEEDED"}' in text


def test_keeps_last_mapping_while_kubelet_is_down_and_recovers_after_restart(
    kubelet: FakeKubelet, make_mapper: Any
) -> None:
    inv = make_inventory(1)
    now = [1000.0]
    client = PodResourcesClient(kubelet.socket_path, backoff_initial_s=0.0)
    m = PodMapper(PodMappingConfig(socket_path=kubelet.socket_path), client=client, clock=lambda: now[0])
    try:
        kubelet.set_pods([pod("p", "ns", container("c", GPU, [gpu_uuid(0)]))])
        refreshed(m, inv)
        kubelet.stop()  # kubelet down: socket gone
        now[0] += 30
        refreshed(m, inv)
        assert dict(m.labels_for(gpu_uuid(0), None)[0])["pod"] == "p"
        text = m.render_metrics(ctx_for(inv))
        assert "gpuhealth_pod_mapping_refresh_success 0" in text
        assert "gpuhealth_pod_mapping_age_seconds 30.000" in text
        kubelet.set_pods([pod("q", "ns", container("c", GPU, [gpu_uuid(0)]))])
        kubelet.start()  # a new socket file
        refreshed(m, inv)
        assert dict(m.labels_for(gpu_uuid(0), None)[0])["pod"] == "q"
        assert "gpuhealth_pod_mapping_age_seconds 0.000" in m.render_metrics(ctx_for(inv))
    finally:
        m.close()


def test_kubelet_absent_at_start(sock_dir: Path) -> None:
    inv = make_inventory(1)
    path = sock_dir / "kubelet.sock"
    m = PodMapper(PodMappingConfig(socket_path=str(path)), client=PodResourcesClient(str(path), backoff_initial_s=0))
    try:
        refreshed(m, inv)
        assert m.labels_for(gpu_uuid(0), None) == ()
        text = m.render_metrics(ctx_for(inv))
        assert "gpuhealth_pod_mapping_refresh_success 0" in text
        assert "\ngpuhealth_pod_mapping_age_seconds " not in text  # no mapping yet: no age to report
        with FakeKubelet(path, {"pods": [pod("p", "ns", container("c", GPU, [gpu_uuid(0)]))]}):
            refreshed(m, inv)
            assert dict(m.labels_for(gpu_uuid(0), None)[0])["pod"] == "p"
    finally:
        m.close()


def test_resource_exhausted_keeps_mapping_and_stops_asking(kubelet: FakeKubelet, make_mapper: Any) -> None:
    inv = make_inventory(1)
    kubelet.set_pods([pod("p", "ns", container("c", GPU, [gpu_uuid(0)]))])
    m = refreshed(make_mapper(client=PodResourcesClient(kubelet.socket_path, backoff_initial_s=60)), inv)
    kubelet.set_behaviour("List", "resource_exhausted")
    for _ in range(5):
        refreshed(m, inv)
    assert kubelet.calls["List"] == 2  # the rate-limited answer, then silence while backing off
    assert dict(m.labels_for(gpu_uuid(0), None)[0])["pod"] == "p"
    assert 'code="RESOURCE_EXHAUSTED"} 1' in m.render_metrics(ctx_for(inv))


def test_large_node_200_pods_8_containers(kubelet: FakeKubelet, make_mapper: Any) -> None:
    inv = make_inventory(8)
    kubelet.set_pods(big_layout())
    m = refreshed(make_mapper(kubelet_timeout_s=20), inv)
    assert "gpuhealth_pod_mapping_refresh_success 1" in m.render_metrics(ctx_for(inv))
    # 1600 containers spread over 8 exclusive GPUs: 200 containers on each, all listed.
    assert all(len(m.labels_for(gpu_uuid(i), None)) == 200 for i in range(8))


def test_render_is_valid_exposition(kubelet: FakeKubelet, make_mapper: Any) -> None:
    inv = make_inventory(2)
    kubelet.set_pods([pod('we"ird\\pod', "ns", container("c", GPU, [gpu_uuid(0)]))])
    kubelet.set_allocatable([{"resource_name": GPU, "device_ids": [gpu_uuid(0), gpu_uuid(1)]}])
    text = refreshed(make_mapper(), inv).render_metrics(ctx_for(inv))
    sample = re.compile(r'^gpuhealth_[a-z_]+(\{([a-zA-Z_]+="(\\.|[^"\\])*",?)*\})? -?[0-9.]+$')
    for line in text.splitlines():
        assert line.startswith("# HELP gpuhealth_") or line.startswith("# TYPE gpuhealth_") or sample.match(line), line
    assert text.endswith("\n")
    assert 'pod="we\\"ird\\\\pod"' in text
