"""Pod attribution end to end: the real exporter process (`-k`) on the C fake of libnvidia-ml,
with the fake kubelet (real gRPC, same protos) on a unix socket. Everything is asserted on
/metrics, as a user (or Prometheus) sees it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import ExporterProcess
from tests.e2e.nvmlnode import NvmlNode
from tests.fakekubelet import FakeKubelet
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

GPU = "nvidia.com/gpu"
H100 = [d["uuid"] for d in load_scenario("h100x8")["devices"]]
MIG_SCENARIO = load_scenario("mig")
MIG_GPU0, MIG_GPU1 = (d["uuid"] for d in MIG_SCENARIO["devices"])
MIG_BY_GI = {i["gi"]: i["uuid"] for i in MIG_SCENARIO["devices"][0]["mig"]["instances"]}
DEVICE_LABELS = ["gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"]
MIG_DEVICE_LABELS = [*DEVICE_LABELS[:5], "GPU_I_PROFILE", "GPU_I_ID", *DEVICE_LABELS[5:]]
POD_LABELS = ["container", "namespace", "pod"]
# Cycles allowed between a kubelet change and /metrics showing it: the refresh asked for in one
# cycle is served by the next render; the rest is slack for a loaded 2-core machine.
CYCLE_SLACK = 5

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Series:
    """One parsed sample line; `names` keeps label order."""

    def __init__(self, name: str, labels: list[tuple[str, str]], value: float) -> None:
        self.name = name
        self.names = [k for k, _ in labels]
        self.labels = dict(labels)
        self.value = value

    def pod(self) -> tuple[str, str, str] | None:
        if "pod" not in self.labels:
            return None
        return self.labels["namespace"], self.labels["pod"], self.labels["container"]


def parse(text: str) -> list[Series]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"unparseable line {line!r}"
        out.append(Series(m.group(1), _LABEL.findall(m.group(2) or ""), float(m.group(3))))
    return out


def family(text: str, name: str, **labels: str) -> list[Series]:
    return [s for s in parse(text) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def scalar(text: str, name: str) -> float | None:
    found = family(text, name)
    return found[0].value if found else None


def cycles(text: str) -> float:
    return scalar(text, "gpuhealth_collections_total") or 0.0


def dcgm_series_of(text: str, uuid: str) -> dict[str, list[Series]]:
    """DCGM families -> series of the whole GPU `uuid` (MIG instance series excluded)."""
    out: dict[str, list[Series]] = {}
    for s in parse(text):
        if s.name.startswith("DCGM_") and s.labels.get("UUID") == uuid and "GPU_I_ID" not in s.labels:
            out.setdefault(s.name, []).append(s)
    return out


def pods_on(text: str, name: str, **labels: str) -> set[tuple[str, str, str] | None]:
    return {s.pod() for s in family(text, name, **labels)}


def gpu_pod(name: str, ns: str, ids: list[str], resource: str = GPU, container: str = "c") -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ns,
        "containers": [{"name": container, "devices": [{"resource_name": resource, "device_ids": ids}]}],
    }


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture
def kubelet() -> Iterator[FakeKubelet]:
    """A fake kubelet, not started, on a socket in a short directory (unix paths max 107 bytes)."""
    d = tempfile.mkdtemp(prefix="ghe-k-", dir="/tmp")
    fake = FakeKubelet(os.path.join(d, "kubelet.sock"))
    try:
        yield fake
    finally:
        fake.stop()
        shutil.rmtree(d, ignore_errors=True)


def h100s(n: int) -> dict[str, Any]:
    scenario = load_scenario("h100x8")
    scenario["devices"] = scenario["devices"][:n]
    return scenario


@contextmanager
def exporter_on(
    build: FakeNvmlBuild, tmp: Path, scenario: dict[str, Any], kubelet: FakeKubelet, *args: str
) -> Iterator[ExporterProcess]:
    node = NvmlNode(
        build,
        tmp,
        scenario,
        ["-c", "200", "-k", "--pod-resources-kubelet-socket", kubelet.socket_path, *args],
    )
    exp = node.exporter
    try:
        exp.wait_ready()
        yield exp
    finally:
        kubelet.release_hangs()  # a hung List would otherwise hold shutdown until its timeout
        assert exp.stop() == 0, exp.logs()


def wait_change(exp: ExporterProcess, predicate: Callable[[str], bool], what: str) -> str:
    """Poll until predicate holds; assert it took at most CYCLE_SLACK collection cycles."""
    before = cycles(exp.metrics())
    text = exp.wait_for(predicate, timeout=10)
    took = cycles(text) - before
    assert took <= CYCLE_SLACK, f"{what}: took {took:.0f} collection cycles"
    return text


# ---------------------------------------------------------------------------------- tests


def test_exclusive_gpus_labels_allocation_and_kubelet_health(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    kubelet.set_pods([gpu_pod("p", "ns", [H100[0]])])
    kubelet.set_allocatable([{"resource_name": GPU, "device_ids": H100[:2]}])  # GPU 2: unhealthy to the kubelet
    kubelet.start()
    with exporter_on(fakenvml_build, tmp_path, h100s(3), kubelet) as exp:
        text = exp.wait_for(lambda t: bool(family(t, "DCGM_FI_DEV_GPU_UTIL", pod="p")))

        (util,) = family(text, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[0])
        assert util.names == DEVICE_LABELS + POD_LABELS  # dcgm-exporter's order
        assert util.pod() == ("ns", "p", "c")
        for uuid in H100[1:3]:
            assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL", UUID=uuid) == {None}
        # every DCGM family of the mapped GPU carries the pod, once
        for name, series in dcgm_series_of(text, H100[0]).items():
            assert [s.pod() for s in series] == [("ns", "p", "c")], name

        alloc = {
            (s.labels["uuid"], s.labels["resource"], s.labels["namespace"], s.labels["pod"], s.labels["container"])
            for s in family(text, "gpuhealth_gpu_allocation_info")
        }
        assert alloc == {(H100[0], GPU, "ns", "p", "c"), (H100[1], GPU, "", "", "")}
        (info,) = family(text, "gpuhealth_gpu_allocation_info", uuid=H100[0])
        assert info.names[-4:] == ["resource", "namespace", "pod", "container"]
        unhealthy = {
            s.labels["uuid"]: s.value for s in family(text, "gpuhealth_kubelet_device_unhealthy", resource=GPU)
        }
        assert unhealthy == {H100[0]: 0, H100[1]: 0, H100[2]: 1}
        assert scalar(text, "gpuhealth_pod_mapping_refresh_success") == 1

        # a new pod: labels within a cycle or two
        kubelet.set_pods([gpu_pod("p", "ns", [H100[0]]), gpu_pod("q", "ns2", [H100[1]], container="w")])
        text = wait_change(exp, lambda t: bool(family(t, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[1], pod="q")), "new pod")
        assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[1]) == {("ns2", "q", "w")}
        assert family(text, "gpuhealth_gpu_allocation_info", uuid=H100[1], pod="q")

        # the pod is gone: so are its labels, and its GPU is free again
        kubelet.set_pods([gpu_pod("q", "ns2", [H100[1]], container="w")])
        text = wait_change(exp, lambda t: pods_on(t, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[0]) == {None}, "pod gone")
        assert len(family(text, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[0])) == 1
        assert family(text, "gpuhealth_gpu_allocation_info", uuid=H100[0], pod="")
        assert not family(text, "gpuhealth_gpu_allocation_info", pod="p")


def test_parent_mig_layout_keeps_gpu_wide_series_without_pods(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    kubelet.set_pods([gpu_pod("big", "ml", [MIG_BY_GI[2]], resource="nvidia.com/mig-3g.40gb")])
    kubelet.set_allocatable([{"resource_name": "nvidia.com/mig-3g.40gb", "device_ids": [MIG_BY_GI[2]]}])
    kubelet.start()
    with exporter_on(fakenvml_build, tmp_path, MIG_SCENARIO, kubelet, "--mig-layout", "parent") as exp:
        text = exp.wait_for(lambda t: bool(family(t, "DCGM_FI_DEV_FB_USED", pod="big")))
        # the MIG-enabled GPU's own series are GPU-wide: no pod; its instances carry the per-instance ones
        parent = dcgm_series_of(text, MIG_GPU0)
        assert "DCGM_FI_DEV_POWER_USAGE" in parent
        assert all(s.pod() is None for series in parent.values() for s in series)
        assert not family(text, "DCGM_FI_DEV_POWER_USAGE", UUID=MIG_GPU0, GPU_I_ID="2")
        assert [s.pod() for s in family(text, "DCGM_FI_DEV_FB_USED", GPU_I_ID="2")] == [("ml", "big", "c")]


def test_mig_pods_label_their_gpu_instance_only(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    kubelet.set_pods(
        [
            gpu_pod("big", "ml", [MIG_BY_GI[2]], resource="nvidia.com/mig-3g.40gb"),
            gpu_pod("small", "ml", [MIG_BY_GI[9]], resource="nvidia.com/mig-1g.10gb"),
            gpu_pod("whole", "ml", [MIG_GPU1]),
        ]
    )
    kubelet.set_allocatable(
        [
            {"resource_name": "nvidia.com/mig-3g.40gb", "device_ids": [MIG_BY_GI[2]]},
            {"resource_name": "nvidia.com/mig-2g.20gb", "device_ids": [MIG_BY_GI[3]]},
            {"resource_name": "nvidia.com/mig-1g.10gb", "device_ids": [MIG_BY_GI[9], MIG_BY_GI[10]]},
            {"resource_name": GPU, "device_ids": [MIG_GPU1]},
        ]
    )
    kubelet.start()
    with exporter_on(fakenvml_build, tmp_path, MIG_SCENARIO, kubelet) as exp:
        text = exp.wait_for(lambda t: bool(family(t, "DCGM_FI_DEV_FB_USED", pod="small")))

        expected = {2: ("ml", "big", "c"), 3: None, 9: ("ml", "small", "c"), 10: None}
        for gi, who in expected.items():
            series = family(text, "DCGM_FI_DEV_FB_USED", UUID=MIG_GPU0, GPU_I_ID=str(gi))
            assert [s.pod() for s in series] == [who], gi
            if who is not None:
                assert series[0].names == MIG_DEVICE_LABELS + POD_LABELS
        # dcgm-exporter's MIG layout: no series of the MIG-enabled GPU itself; its GPU-wide fields are on
        # each instance, with that instance's pod
        assert dcgm_series_of(text, MIG_GPU0) == {}
        for gi, who in expected.items():
            series = family(text, "DCGM_FI_DEV_POWER_USAGE", UUID=MIG_GPU0, GPU_I_ID=str(gi))
            assert [s.pod() for s in series] == [who], gi
        assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL", UUID=MIG_GPU1) == {("ml", "whole", "c")}
        # own families: the MIG device's labels (parent uuid + gpu_i_id); free instances have an empty pod
        alloc = {
            (s.labels["uuid"], s.labels.get("gpu_i_id"), s.labels["pod"])
            for s in family(text, "gpuhealth_gpu_allocation_info")
        }
        assert alloc == {
            (MIG_GPU0, "2", "big"),
            (MIG_GPU0, "3", ""),
            (MIG_GPU0, "9", "small"),
            (MIG_GPU0, "10", ""),
            (MIG_GPU1, None, "whole"),
        }
        assert all(s.value == 0 for s in family(text, "gpuhealth_kubelet_device_unhealthy"))


@pytest.mark.parametrize("mode", ["per-pod", "first-pod"])
def test_shared_gpu_replicas(mode: str, fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet) -> None:
    shared = H100[0]
    kubelet.set_pods(
        [
            gpu_pod("c-pod", "ns", [f"{shared}::3"]),
            gpu_pod("a-pod", "ns", [f"{shared}::1", f"{shared}::0"]),  # two replicas: one series, lowest vgpu
            gpu_pod("b-pod", "ns", [f"{shared}::2"]),
        ]
    )
    kubelet.set_allocatable([{"resource_name": GPU, "device_ids": [f"{u}::{r}" for u in H100[:2] for r in range(4)]}])
    kubelet.start()
    with exporter_on(fakenvml_build, tmp_path, h100s(2), kubelet, "--kubernetes-shared-gpus", mode) as exp:
        text = exp.wait_for(lambda t: bool(family(t, "DCGM_FI_DEV_GPU_UTIL", pod="a-pod")))
        families = dcgm_series_of(text, shared)
        assert "DCGM_FI_DEV_GPU_UTIL" in families
        for name, series in families.items():
            got = [(s.labels["pod"], s.labels.get("vgpu")) for s in series]
            if mode == "per-pod":
                assert got == [("a-pod", "0"), ("b-pod", "2"), ("c-pod", "3")], name
                if name == "DCGM_FI_DEV_GPU_UTIL":
                    assert series[0].names == [*DEVICE_LABELS, *POD_LABELS, "vgpu"]
            else:
                assert got == [("a-pod", None)], name
        assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[1]) == {None}
        unhealthy = {s.labels["uuid"]: s.value for s in family(text, "gpuhealth_kubelet_device_unhealthy")}
        assert unhealthy == {H100[0]: 0, H100[1]: 0}


def test_kubelet_absent_at_start_then_restarts(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    kubelet.set_pods([gpu_pod("p", "ns", [H100[0]])])
    with exporter_on(fakenvml_build, tmp_path, h100s(2), kubelet) as exp:
        # ready without a kubelet; no mapping yet
        text = exp.wait_for(lambda t: cycles(t) >= 2)
        assert scalar(text, "gpuhealth_pod_mapping_refresh_success") == 0
        assert scalar(text, "gpuhealth_pod_mapping_age_seconds") is None
        assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL") == {None}

        kubelet.start()
        text = wait_change(exp, lambda t: bool(family(t, "DCGM_FI_DEV_GPU_UTIL", pod="p")), "kubelet came up")
        assert scalar(text, "gpuhealth_pod_mapping_refresh_success") == 1

        # kubelet down (socket deleted): the last good mapping stays in use, and it ages
        kubelet.stop()
        text = exp.wait_for(lambda t: scalar(t, "gpuhealth_pod_mapping_refresh_success") == 0)
        age = scalar(text, "gpuhealth_pod_mapping_age_seconds")
        assert age is not None
        assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[0]) == {("ns", "p", "c")}
        exp.wait_for(lambda t: (scalar(t, "gpuhealth_pod_mapping_age_seconds") or 0) > age + 0.5)
        assert pods_on(exp.metrics(), "DCGM_FI_DEV_GPU_UTIL", UUID=H100[0]) == {("ns", "p", "c")}

        # back, with other pods: the exporter reconnects to the new socket on its own
        kubelet.set_pods([gpu_pod("p2", "ns", [H100[1]])])
        kubelet.start()
        text = exp.wait_for(lambda t: bool(family(t, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[1], pod="p2")))
        assert scalar(text, "gpuhealth_pod_mapping_refresh_success") == 1
        assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[0]) == {None}

        # a restart in one go (socket deleted and recreated, new inode)
        kubelet.set_pods([gpu_pod("p3", "ns", [H100[0]])])
        kubelet.restart()
        text = exp.wait_for(lambda t: bool(family(t, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[0], pod="p3")))
        assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[1]) == {None}
        exp.wait_for(lambda t: scalar(t, "gpuhealth_pod_mapping_refresh_success") == 1)
        ok = family(exp.metrics(), "gpuhealth_kubelet_requests_total", method="List", code="OK")
        assert ok
        assert ok[0].value >= 3


def test_hung_kubelet_never_slows_scrapes_or_collection(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, kubelet: FakeKubelet
) -> None:
    kubelet.set_pods([gpu_pod("p", "ns", [H100[0]])])
    kubelet.start()
    with exporter_on(fakenvml_build, tmp_path, h100s(2), kubelet, "--pod-resources-timeout", "3000") as exp:
        exp.wait_for(lambda t: bool(family(t, "DCGM_FI_DEV_GPU_UTIL", pod="p")))
        kubelet.set_behaviour("List", "hang")
        hung_at = time.monotonic()
        text = exp.wait_for(lambda t: (scalar(t, "gpuhealth_pod_mapping_age_seconds") or 0) > 1.0)
        before = cycles(text)

        t0 = time.monotonic()
        for _ in range(20):
            text = exp.metrics()
        assert time.monotonic() - t0 < 2.0
        exp.wait_for(lambda t: cycles(t) >= before + 5)  # collection keeps turning
        assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[0]) == {("ns", "p", "c")}

        # the List times out (--pod-resources-timeout): refresh fails, the last good mapping stays and ages
        text = exp.wait_for(lambda t: scalar(t, "gpuhealth_pod_mapping_refresh_success") == 0, timeout=20)
        assert (scalar(text, "gpuhealth_pod_mapping_age_seconds") or 0) >= time.monotonic() - hung_at - 1.5
        assert pods_on(text, "DCGM_FI_DEV_GPU_UTIL", UUID=H100[0]) == {("ns", "p", "c")}
        assert family(text, "gpuhealth_kubelet_requests_total", method="List", code="DEADLINE_EXCEEDED")

        kubelet.set_behaviour("List", "ok")
        text = exp.wait_for(lambda t: scalar(t, "gpuhealth_pod_mapping_refresh_success") == 1)
        assert (scalar(text, "gpuhealth_pod_mapping_age_seconds") or 99) < 2
