"""The proxy between a stand-in NVIDIA plugin and the fake kubelet, all over real gRPC on unix sockets."""

from __future__ import annotations

import os

import grpc

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.health.verdict import HealthState
from tests.deviceplugin.fakes import gpu, inventory, mig_uuid, uuid
from tests.proxy.conftest import GPUS, RESOURCE, Node, wait_until

ALLOCATE = "/v1beta1.DevicePlugin/Allocate"


def test_the_kubelet_sees_the_upstream_plugin_through_the_proxy(node: Node) -> None:
    proxy = node.proxy()
    plugin = node.plugin()
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    ((_, request),) = node.kubelet.registrations
    assert request.endpoint == "nvidia-gpu.sock"  # the upstream's own name, in the kubelet's directory
    assert os.path.exists(os.path.join(node.kubelet.plugin_dir, "nvidia-gpu.sock"))
    assert request.options == plugin.options and node.kubelet.options(RESOURCE) == plugin.options
    last = node.kubelet.latest(RESOURCE)
    assert last is not None and [d[2] for d in last.devices] == [(0,)] * 4  # topology forwarded as listed
    assert proxy.problems() == []


def test_a_fence_reaches_the_kubelet_and_a_clear_brings_the_gpu_back(node: Node) -> None:
    node.proxy()
    node.plugin()
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    node.health.set(GPUS[1], HealthState.UNHEALTHY)
    node.wait_kubelet(lambda: node.health_at_kubelet(GPUS[1]) == "Unhealthy")
    assert node.kubelet.allocatable(RESOURCE) == 3 and node.kubelet.capacity(RESOURCE) == 4
    node.health.set(GPUS[1], HealthState.DEGRADED)  # degraded stays allocatable
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)


def test_the_upstreams_unhealthy_stays_unhealthy(node: Node) -> None:
    node.proxy()
    plugin = node.plugin()
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    plugin.mark_unhealthy(GPUS[2])  # NVIDIA's own XID check; our verdict says healthy
    node.wait_kubelet(lambda: node.health_at_kubelet(GPUS[2]) == "Unhealthy")
    node.health.set(GPUS[2], HealthState.HEALTHY)
    node.health.set(GPUS[0], HealthState.UNHEALTHY)
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 2)
    assert node.health_at_kubelet(GPUS[2]) == "Unhealthy"


def test_replicas_mig_devices_and_index_ids_follow_their_gpu(node: Node) -> None:
    node.inventory = inventory([gpu(0), gpu(1, migs=("1g.10gb", "1g.10gb"))])
    replicas = [f"{uuid(0)}::{n}" for n in range(3)]
    migs = [mig_uuid(1, 0), mig_uuid(1, 1)]
    node.proxy()
    node.plugin(replicas, "nvidia.com/gpu")
    node.plugin(migs, "nvidia.com/mig-1g.10gb")
    index_ids = ["0", "1:0", "1:1", "7"]  # "7": no such device here; the upstream's health stands
    node.plugin(index_ids, "example.com/indexed")
    node.wait_kubelet(lambda: node.kubelet.allocatable("example.com/indexed") == 4)
    node.wait_kubelet(lambda: node.kubelet.allocatable("nvidia.com/mig-1g.10gb") == 2)

    node.health.set(uuid(0), HealthState.UNHEALTHY)
    node.wait_kubelet(lambda: node.kubelet.allocatable("nvidia.com/gpu") == 0)  # every replica of the GPU
    node.wait_kubelet(lambda: node.kubelet.latest("example.com/indexed").healthy == {"1:0", "1:1", "7"})  # type: ignore[union-attr]
    node.health.set(uuid(1), HealthState.UNHEALTHY)  # the MIG devices' parent
    node.wait_kubelet(lambda: node.kubelet.allocatable("nvidia.com/mig-1g.10gb") == 0)
    node.wait_kubelet(lambda: node.kubelet.latest("example.com/indexed").healthy == {"7"})  # type: ignore[union-attr]


def test_allocate_comes_back_byte_identical_with_the_kubelets_deadline(node: Node) -> None:
    node.proxy()
    plugin = node.plugin()
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    channel = node.kubelet._endpoints[RESOURCE].channel  # the kubelet's own connection to "the plugin"
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=GPUS[:2])])
    sent = request.SerializeToString()
    got = channel.unary_unary(ALLOCATE)(sent, timeout=7)
    assert plugin.allocations == [(sent, got)]
    assert pb.AllocateResponse.FromString(got).container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == ",".join(
        GPUS[:2]
    )
    assert plugin.deadlines[-1] is not None and 5 < plugin.deadlines[-1] < 7.5  # gRPC rounds deadlines up

    # No deadline from the kubelet (it sets none on Allocate): none upstream either.
    channel.unary_unary(ALLOCATE)(sent)
    assert plugin.deadlines[-1] is None


def test_upstream_errors_and_deadlines_come_back_as_they_are(node: Node) -> None:
    node.proxy()
    plugin = node.plugin()
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    stub = node.kubelet.stub(RESOURCE)
    request = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=GPUS[:1])])
    plugin.allocate_error = (grpc.StatusCode.FAILED_PRECONDITION, "invalid allocation request: unknown device")
    try:
        stub.Allocate(request, timeout=5)
        raise AssertionError("the upstream's error was not forwarded")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert exc.details() == "invalid allocation request: unknown device"
    plugin.allocate_error = None
    plugin.allocate_delay_s = 1.0
    try:
        stub.Allocate(request, timeout=0.3)
        raise AssertionError("the kubelet's deadline did not apply")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The proxy counts once its own upstream call has ended, just after the kubelet's.
    assert wait_until(lambda: node.proxies[0].status()[0].forwarded[("Allocate", "error")] == 2)


def test_preferred_allocation_never_offers_a_fenced_gpu(node: Node) -> None:
    node.proxy()
    plugin = node.plugin()
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    node.health.set(GPUS[0], HealthState.UNHEALTHY)
    node.wait_kubelet(lambda: node.health_at_kubelet(GPUS[0]) == "Unhealthy")
    request = pb.PreferredAllocationRequest(
        container_requests=[
            pb.ContainerPreferredAllocationRequest(
                available_deviceIDs=GPUS, must_include_deviceIDs=[], allocation_size=2
            )
        ]
    )
    response = node.kubelet.stub(RESOURCE).GetPreferredAllocation(request, timeout=5)
    assert list(response.container_responses[0].deviceIDs) == GPUS[1:3]
    assert list(plugin.preferred_requests[-1].container_requests[0].available_deviceIDs) == GPUS[1:]


def test_prestart_and_options_are_the_upstreams(node: Node) -> None:
    node.proxy()
    plugin = node.plugin()
    node.wait_kubelet(lambda: node.kubelet.allocatable(RESOURCE) == 4)
    stub = node.kubelet.stub(RESOURCE)
    stub.PreStartContainer(pb.PreStartContainerRequest(devices_ids=GPUS[:1]), timeout=5)
    assert plugin.prestarts == 1
    assert stub.GetDevicePluginOptions(pb.Empty(), timeout=5) == plugin.options
    counts = node.proxies[0].status()[0].forwarded
    assert counts[("PreStartContainer", "ok")] == 1 and counts[("GetDevicePluginOptions", "ok")] >= 2


def test_a_bad_upstream_registration_is_refused_with_the_reason(node: Node) -> None:
    proxy = node.proxy()
    channel = grpc.insecure_channel(f"unix://{proxy.registrar.path}", options=[("grpc.default_authority", "localhost")])
    from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2_grpc as pb_grpc

    stub = pb_grpc.RegistrationStub(channel)
    for request, words in (
        (pb.RegisterRequest(version="v1alpha", endpoint="x.sock", resource_name=RESOURCE), "version"),
        (pb.RegisterRequest(version="v1beta1", endpoint="../x.sock", resource_name=RESOURCE), "file name"),
        (pb.RegisterRequest(version="v1beta1", endpoint="none.sock", resource_name=RESOURCE), "no such socket"),
        (pb.RegisterRequest(version="v1beta1", endpoint="x.sock", resource_name="gpu"), "resource name"),
    ):
        try:
            stub.Register(request, timeout=5)
            raise AssertionError(f"accepted {request}")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and words in (exc.details() or ""), exc.details()
    channel.close()
    assert node.kubelet.registrations == []
