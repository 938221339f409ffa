"""attribute(): kubelet replies built by hand -> labels, allocation rows, kubelet health; no threads, no sockets."""

from __future__ import annotations

from typing import Any

from exporter.model import Inventory
from exporter.pods.attribution import Attribution, attribute
from exporter.pods.deviceids import DeviceIndex
from exporter.pods.kube import DRA_DRIVER, PodMeta
from exporter.pods.settings import PodMappingConfig
from podresources.client import ClaimResource, DynamicResource
from tests.pods.podfixtures import allocatable, container, gpu_uuid, make_inventory, mig_uuid, pod, pod_resources

GPU = "nvidia.com/gpu"
SHARED = "nvidia.com/gpu.shared"


def run(
    inv: Inventory,
    pods: list[dict[str, Any]],
    alloc: list[dict[str, Any]] | None = None,
    *,
    index: DeviceIndex | None = None,
    **kw: Any,
) -> Attribution:
    cfg_keys = set(PodMappingConfig.__dataclass_fields__)
    cfg = PodMappingConfig(**{k: v for k, v in kw.items() if k in cfg_keys})
    rest = {k: v for k, v in kw.items() if k not in cfg_keys}
    reply = allocatable(alloc) if alloc is not None else None
    return attribute(index or DeviceIndex(inv), pod_resources(pods), reply, cfg, **rest)


def who(a: Attribution, uuid: str, gi: int | None = None) -> list[tuple[str, str, str]]:
    return [(d["namespace"], d["pod"], d["container"]) for d in map(dict, a.labels_for(uuid, gi))]


def test_exclusive_gpus() -> None:
    inv = make_inventory(5)
    a = run(
        inv,
        [
            pod("train", "ml", container("worker", GPU, [gpu_uuid(0), gpu_uuid(1)]), container("sidecar")),
            pod("infer", "web", container("server", GPU, [gpu_uuid(2)])),
        ],
        [{"resource_name": GPU, "device_ids": [gpu_uuid(i) for i in range(4)]}],
    )
    assert a.labels_for(gpu_uuid(0), None) == ((("container", "worker"), ("namespace", "ml"), ("pod", "train")),)
    assert a.labels_for(gpu_uuid(1), None) == a.labels_for(gpu_uuid(0), None)
    assert who(a, gpu_uuid(2)) == [("web", "infer", "server")]
    assert a.labels_for(gpu_uuid(3), None) == ()  # free: no pod labels at all
    assert a.labels_for(gpu_uuid(0), 1) == ()  # not a MIG device
    assert a.allocation == (
        (gpu_uuid(0), GPU, "ml", "train", "worker"),
        (gpu_uuid(1), GPU, "ml", "train", "worker"),
        (gpu_uuid(2), GPU, "web", "infer", "server"),
        (gpu_uuid(3), GPU, "", "", ""),
    )
    # GPU 4 is on the node but not allocatable: the kubelet deems it unhealthy.
    assert a.kubelet_health == tuple((gpu_uuid(i), GPU, 1 if i == 4 else 0) for i in range(5))


def test_mig_devices_by_gpu_instance() -> None:
    inv = make_inventory(2, mig={0: [(1, "3g.40gb"), (2, "1g.10gb"), (3, "1g.10gb")]})
    a = run(
        inv,
        [
            pod("big", "ml", container("c", "nvidia.com/mig-3g.40gb", [mig_uuid(0, 1)])),
            pod("small", "ml", container("c", "nvidia.com/mig-1g.10gb", [f"MIG-{gpu_uuid(0)}/2/0"])),  # R450/R460
            pod("whole", "ml", container("c", GPU, [gpu_uuid(1)])),
        ],
        [
            {"resource_name": "nvidia.com/mig-3g.40gb", "device_ids": [mig_uuid(0, 1)]},
            {"resource_name": "nvidia.com/mig-1g.10gb", "device_ids": [mig_uuid(0, 2)]},  # gi 3 missing
            {"resource_name": GPU, "device_ids": [gpu_uuid(1)]},
        ],
    )
    assert who(a, gpu_uuid(0), 1) == [("ml", "big", "c")]
    assert who(a, gpu_uuid(0), 2) == [("ml", "small", "c")]
    assert a.labels_for(gpu_uuid(0), 3) == ()
    assert a.labels_for(gpu_uuid(0), None) == ()  # the whole MIG-enabled GPU belongs to no single pod
    assert who(a, gpu_uuid(1)) == [("ml", "whole", "c")]
    # MIG rows carry the MIG device's UUID (its device labels).
    assert (mig_uuid(0, 2), "nvidia.com/mig-1g.10gb", "ml", "small", "c") in a.allocation
    assert [r for r in a.kubelet_health if r[2] == 1] == [(mig_uuid(0, 3), "nvidia.com/mig-1g.10gb", 1)]
    assert (mig_uuid(0, 1), "nvidia.com/mig-3g.40gb", 0) in a.kubelet_health


def shared_layout() -> list[dict[str, Any]]:
    """GPU 0 time-sliced into 4 replicas, 3 pods; p2/a holds two replicas (1 and 3)."""
    return [
        pod("p3", "team", container("c", SHARED, [f"{gpu_uuid(0)}::2"])),
        pod("p1", "team", container("c", SHARED, [f"{gpu_uuid(0)}::0"])),
        pod("p2", "team", container("a", SHARED, [f"{gpu_uuid(0)}::3", f"{gpu_uuid(0)}::1"]), container("b")),
    ]


def test_shared_gpu_per_pod() -> None:
    a = run(make_inventory(2), shared_layout())
    got = [(d["pod"], d["container"], d["vgpu"]) for d in map(dict, a.labels_for(gpu_uuid(0), None))]
    assert got == [("p1", "c", "0"), ("p2", "a", "1"), ("p3", "c", "2")]  # a container's lowest replica
    assert [k for k, _ in a.labels_for(gpu_uuid(0), None)[0]] == ["container", "namespace", "pod", "vgpu"]
    assert a.kubelet_health == ()  # no GetAllocatableResources reply: no health view


def test_shared_gpu_first_pod() -> None:
    a = run(make_inventory(2), shared_layout(), shared_mode="first-pod")
    assert a.labels_for(gpu_uuid(0), None) == ((("container", "c"), ("namespace", "team"), ("pod", "p1")),)


def test_exclusive_and_replica_uses_of_one_gpu_get_vgpu_0() -> None:
    a = run(
        make_inventory(1),
        [
            pod("x", "ns", container("c", GPU, [gpu_uuid(0)])),
            pod("y", "ns", container("c", SHARED, [f"{gpu_uuid(0)}::4"])),
        ],
    )
    assert [dict(ls)["vgpu"] for ls in a.labels_for(gpu_uuid(0), None)] == ["0", "4"]


def test_free_devices() -> None:
    replicas = [f"{gpu_uuid(i)}::{n}" for i in range(2) for n in range(2)]
    a = run(make_inventory(2), [], [{"resource_name": SHARED, "device_ids": replicas}])
    assert a.labels == {}
    assert a.allocation == ((gpu_uuid(0), SHARED, "", "", ""), (gpu_uuid(1), SHARED, "", "", ""))
    assert a.kubelet_health == ((gpu_uuid(0), SHARED, 0), (gpu_uuid(1), SHARED, 0))
    # No device plugin at all: nothing is allocatable, nothing reported unhealthy.
    assert run(make_inventory(2), [], []).kubelet_health == ()


def test_unknown_device_ids_and_other_resources_are_ignored() -> None:
    inv = make_inventory(2, mig={1: [(1, "1g.10gb")]})
    a = run(
        inv,
        [
            pod("ghost", "ns", container("c", GPU, [gpu_uuid(7), "nvidia99", "bogus", f"{gpu_uuid(0)}::x"])),
            pod("mig", "ns", container("c", "nvidia.com/mig-1g.10gb", [mig_uuid(1, 5), f"MIG-{gpu_uuid(1)}/9/0"])),
            pod("nic", "ns", container("c", "example.com/nic", [gpu_uuid(0)])),
            pod("ok", "ns", container("c", "example.com/h100", [gpu_uuid(0)])),
        ],
        [{"resource_name": GPU, "device_ids": [gpu_uuid(7), "nvidia99"]}],
    )
    assert a.labels == {}
    assert a.allocation == ()
    # Nothing the kubelet lists resolves, so no device is known under any resource.
    assert a.kubelet_health == ()
    b = run(
        inv, [pod("ok", "ns", container("c", "example.com/h100", [gpu_uuid(0)]))], resource_names=("example.com/h100",)
    )
    assert who(b, gpu_uuid(0)) == [("ns", "ok", "c")]


def test_gke_device_names() -> None:
    # Minor numbers are index + 10 in make_inventory: nvidia10 is GPU 0.
    inv = make_inventory(3, mig={2: [(1, "1g.10gb"), (2, "1g.10gb")]})
    a = run(
        inv,
        [
            pod("a", "ns", container("c", GPU, ["nvidia10"])),
            pod("b", "ns", container("c", GPU, ["nvidia11/vgpu1"])),
            pod("m", "ns", container("c", GPU, ["nvidia12/gi2"])),
        ],
        gpu_id_type="device-name",
    )
    assert who(a, gpu_uuid(0)) == [("ns", "a", "c")]
    assert dict(a.labels_for(gpu_uuid(1), None)[0])["vgpu"] == "1"
    assert who(a, gpu_uuid(2), 2) == [("ns", "m", "c")]
    assert a.labels_for(gpu_uuid(2), 1) == ()


def test_resources_remembered_across_refreshes() -> None:
    inv = make_inventory(2)
    index = DeviceIndex(inv)
    both = [{"resource_name": "example.com/h100", "device_ids": [gpu_uuid(0), gpu_uuid(1)]}]
    first = run(inv, [], both, index=index, resource_names=("example.com/h100",))
    assert first.device_resources == {
        (gpu_uuid(0), None): {"example.com/h100"},
        (gpu_uuid(1), None): {"example.com/h100"},
    }
    # GPU 1 drops out of allocatable; its resource is still known from the previous reply.
    one = [{"resource_name": "example.com/h100", "device_ids": [gpu_uuid(0)]}]
    kept = dict(first.device_resources)
    later = run(
        inv, [], one, index=index, resource_names=("example.com/h100",), device_resources=first.device_resources
    )
    assert later.kubelet_health == ((gpu_uuid(0), "example.com/h100", 0), (gpu_uuid(1), "example.com/h100", 1))
    assert first.device_resources == kept  # the input is not changed
    # Without the memory the resource is inferred from devices of the same kind.
    assert run(inv, [], one, index=index, resource_names=("example.com/h100",)).kubelet_health == later.kubelet_health
    # No allocatable reply: the memory passes through untouched.
    assert run(inv, [], None, index=index, device_resources=kept).device_resources == kept


def test_pod_uid_and_labels() -> None:
    meta = {("ns", "p"): PodMeta("uid-1", (("1tier", "x"), ("UUID", "no"), ("a.b", "1"), ("a_b", "2"), ("app", "y")))}
    pods = [pod("p", "ns", container("c", GPU, [gpu_uuid(0)])), pod("q", "ns", container("c", GPU, [gpu_uuid(1)]))]
    inv = make_inventory(2)
    a = run(inv, pods, enable_pod_uid=True, enable_pod_labels=True, pod_meta=meta)
    assert a.labels_for(gpu_uuid(0), None) == (
        (("container", "c"), ("namespace", "ns"), ("pod", "p"), ("pod_uid", "uid-1"),
         ("_1tier", "x"), ("a_b", "1"), ("app", "y")),
    )  # fmt: skip
    assert who(a, gpu_uuid(1)) == [("ns", "q", "c")]  # not delivered by the watch yet
    b = run(inv, pods, enable_pod_labels=True, pod_labels_allowlist="app|a.*", pod_meta=meta)
    assert dict(b.labels_for(gpu_uuid(0), None)[0]).keys() == {"container", "namespace", "pod", "a_b", "app"}
    # Metadata handed in while the features are off is not used.
    plain = run(inv, pods, pod_meta=meta)
    assert plain.labels_for(gpu_uuid(0), None) == ((("container", "c"), ("namespace", "ns"), ("pod", "p")),)


def test_dra_claims() -> None:
    inv = make_inventory(2, mig={1: [(1, "1g.10gb"), (2, "2g.20gb"), (3, "2g.20gb")]})

    def claim(*devices: str, driver: str = DRA_DRIVER) -> dict[str, Any]:
        crs = tuple(ClaimResource(driver, "pool", d) for d in devices)
        return container("c", dynamic_resources=(DynamicResource("claim", "ns", crs),))

    dra = {
        ("pool", "gpu-0"): {"uuid": gpu_uuid(0)},
        ("pool", "mig-1g"): {"parentUUID": gpu_uuid(1), "profile": "1g.10gb"},
        ("pool", "mig-2g"): {"parentUUID": gpu_uuid(1), "profile": "2g.20gb"},  # two such: ambiguous
    }
    pods = [
        pod("whole", "ns", claim("gpu-0")),
        pod("mig", "ns", claim("mig-1g", "mig-2g", "unknown")),
        pod("other", "ns", claim("gpu-0", driver="example.com/gpu")),
    ]
    a = run(inv, pods, [], dra=True, dra_devices=dra)
    assert who(a, gpu_uuid(0)) == [("ns", "whole", "c")]
    assert who(a, gpu_uuid(1), 1) == [("ns", "mig", "c")]
    assert a.labels_for(gpu_uuid(1), 2) == a.labels_for(gpu_uuid(1), 3) == ()
    assert (gpu_uuid(0), DRA_DRIVER, "ns", "whole", "c") in a.allocation
    assert a.device_resources == {}  # DRA claims are not device plugin resources
    assert run(inv, pods, [], dra_devices=dra).labels == {}  # --kubernetes-dra off


def test_same_inputs_same_result() -> None:
    inv = make_inventory(2)
    index = DeviceIndex(inv)
    pods = shared_layout()
    alloc = [{"resource_name": SHARED, "device_ids": [f"{gpu_uuid(0)}::{n}" for n in range(4)]}]
    assert run(inv, pods, alloc, index=index) == run(inv, pods, alloc, index=index)
