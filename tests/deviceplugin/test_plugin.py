"""The plugin end to end over real unix sockets, against the fake kubelet."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from exporter.deviceplugin import DevicePluginConfig, DevicePluginManager
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2_grpc as pb_grpc
from exporter.deviceplugin.config import socket_name
from exporter.health.verdict import HealthState
from exporter.labels import RenderContext
from exporter.model import Inventory

from .fakekubelet_registration import FakeKubelet
from .fakes import FakeHealth, MutableInventory, gpu, inventory, mig_uuid, uuid

GPU = "nvidia.com/gpu"


class Node:
    """A fake kubelet, a fake health engine and a plugin manager sharing one plugin dir."""

    def __init__(self, plugin_dir: str) -> None:
        self.dir = plugin_dir
        self.kubelet = FakeKubelet(plugin_dir)
        self.health = FakeHealth()
        self.inventory = MutableInventory(inventory([gpu(0, numa=0), gpu(1, numa=0), gpu(2, numa=1)], [(0, 1)]))
        self.manager: DevicePluginManager | None = None

    def start_plugin(self, inv: Inventory | None = None, take_over: bool = False, **kw: object) -> DevicePluginManager:
        if inv is not None:
            self.inventory.current = inv
        config = DevicePluginConfig(plugin_dir=self.dir, **kw)  # type: ignore[arg-type]
        self.manager = DevicePluginManager(config, self.inventory, self.health, take_over=take_over)
        self.manager.start()
        return self.manager

    def wait_registered(self, *resources: str, timeout: float = 3.0) -> None:
        resources = resources or (GPU,)
        assert self.kubelet.wait_for(lambda: all(self.kubelet.latest(r) is not None for r in resources), timeout), (
            f"not registered: {resources}; errors={self.kubelet.errors}"
        )

    def close(self) -> None:
        if self.manager is not None:
            self.manager.stop()
        self.kubelet.stop()


@pytest.fixture
def node(plugin_dir: str) -> Iterator[Node]:
    n = Node(plugin_dir)
    try:
        yield n
    finally:
        n.close()


def test_registers_and_first_list_has_all_devices_with_numa(node: Node) -> None:
    node.kubelet.start()
    node.start_plugin()
    node.wait_registered()
    _, req = node.kubelet.registrations[0]
    assert (req.version, req.endpoint, req.resource_name) == ("v1beta1", socket_name(GPU), GPU)
    assert req.options.get_preferred_allocation_available and not req.options.pre_start_required
    assert node.kubelet.options(GPU).get_preferred_allocation_available
    first = node.kubelet.messages(GPU)[0]
    assert first.devices == ((uuid(0), "Healthy", (0,)), (uuid(1), "Healthy", (0,)), (uuid(2), "Healthy", (1,)))
    assert node.kubelet.allocatable(GPU) == 3


def test_unhealthy_verdict_reaches_kubelet_within_one_second(node: Node) -> None:
    node.kubelet.start()
    node.start_plugin()
    node.wait_registered()
    before = len(node.kubelet.messages(GPU))
    flipped = time.monotonic()
    node.health.set(uuid(1), HealthState.UNHEALTHY)
    assert node.kubelet.wait_for(lambda: len(node.kubelet.messages(GPU)) > before, 1.0)
    msg = node.kubelet.messages(GPU)[before]
    assert msg.at - flipped < 1.0
    assert msg.health_of(uuid(1)) == "Unhealthy"
    assert (node.kubelet.capacity(GPU), node.kubelet.allocatable(GPU)) == (3, 2)
    # Degraded stays schedulable; recovery is advertised too.
    node.health.set(uuid(1), HealthState.DEGRADED)
    assert node.kubelet.wait_for(lambda: node.kubelet.allocatable(GPU) == 3, 1.0)
    # A verdict change that changes nothing the kubelet sees sends nothing.
    count = len(node.kubelet.messages(GPU))
    node.health.set(uuid(0), HealthState.DEGRADED)
    # Then a change it does see: changes are sent in order, so the first message after `count` would
    # be the no-op change's; the only one is this change's.
    node.health.set(uuid(2), HealthState.UNHEALTHY)
    assert node.kubelet.wait_for(
        lambda: any(m.health_of(uuid(2)) == "Unhealthy" for m in node.kubelet.messages(GPU)[count:]), 1.0
    )
    assert [m.health_of(uuid(2)) for m in node.kubelet.messages(GPU)[count:]] == ["Unhealthy"]


def test_unhealthy_at_startup_is_in_the_first_message(node: Node) -> None:
    node.health.set(uuid(2), HealthState.UNHEALTHY)
    node.kubelet.start()
    node.start_plugin()
    node.wait_registered()
    first = node.kubelet.messages(GPU)[0]
    assert first.health_of(uuid(2)) == "Unhealthy"
    assert first.healthy == {uuid(0), uuid(1)}


def test_replicas_of_fenced_gpu_all_unhealthy(node: Node) -> None:
    node.kubelet.start()
    node.start_plugin(replicas=4)
    node.wait_registered()
    assert node.kubelet.allocatable(GPU) == 12
    node.health.set(uuid(0), HealthState.UNHEALTHY)
    assert node.kubelet.wait_for(lambda: node.kubelet.allocatable(GPU) == 8, 1.0)
    last = node.kubelet.latest(GPU)
    assert last is not None
    assert {i for i in last.ids if last.health_of(i) == "Unhealthy"} == {f"{uuid(0)}::{n}" for n in range(4)}
    # Allocate of replicas gives the parent UUID once.
    resp = node.kubelet.stub(GPU).Allocate(
        pb.AllocateRequest(
            container_requests=[
                pb.ContainerAllocateRequest(devices_ids=[f"{uuid(1)}::0", f"{uuid(1)}::2", f"{uuid(2)}::1"])
            ]
        ),
        timeout=5,
    )
    assert resp.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == f"{uuid(1)},{uuid(2)}"


def test_mig_mixed_resources(node: Node) -> None:
    inv = inventory([gpu(0, numa=0), gpu(1, numa=1, migs=("1g.10gb", "1g.10gb", "3g.40gb"))])
    node.kubelet.start()
    node.start_plugin(inv, mig_strategy="mixed")
    mig1, mig3 = "nvidia.com/mig-1g.10gb", "nvidia.com/mig-3g.40gb"
    node.wait_registered(GPU, mig1, mig3)
    assert node.kubelet.resources() == {GPU, mig1, mig3}
    assert node.kubelet.latest(GPU).ids == {uuid(0)}  # type: ignore[union-attr]
    assert node.kubelet.latest(mig1).devices == (  # type: ignore[union-attr]
        (mig_uuid(1, 0), "Healthy", (1,)),
        (mig_uuid(1, 1), "Healthy", (1,)),
    )
    resp = node.kubelet.stub(mig1).Allocate(
        pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=[mig_uuid(1, 1)])]), timeout=5
    )
    assert resp.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"] == mig_uuid(1, 1)
    # Fencing the parent GPU fences its MIG devices in every MIG resource.
    node.health.set(uuid(1), HealthState.UNHEALTHY)
    assert node.kubelet.wait_for(lambda: node.kubelet.allocatable(mig1) == 0 and node.kubelet.allocatable(mig3) == 0)
    assert node.kubelet.allocatable(GPU) == 1


def allocate(node: Node, ids: list[str], resource: str = GPU) -> pb.AllocateResponse:
    req = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids)])
    return node.kubelet.stub(resource).Allocate(req, timeout=5)  # type: ignore[no-any-return]


def test_allocate_envvar_and_refusals(node: Node) -> None:
    node.health.set(uuid(2), HealthState.UNHEALTHY)
    node.kubelet.start()
    manager = node.start_plugin()
    node.wait_registered()
    resp = allocate(node, [uuid(1), uuid(0)])
    assert dict(resp.container_responses[0].envs) == {"NVIDIA_VISIBLE_DEVICES": f"{uuid(1)},{uuid(0)}"}
    assert not resp.container_responses[0].cdi_devices
    with pytest.raises(grpc.RpcError) as err:
        allocate(node, [uuid(0), "GPU-nope"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GPU-nope" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        allocate(node, [uuid(2)])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert uuid(2) in err.value.details() and "unhealthy" in err.value.details()
    text = manager.render_metrics(RenderContext(hostname_label="Hostname", hostname="n1"))
    assert 'gpuhealth_device_plugin_allocations_total{resource="nvidia.com/gpu",result="success"} 1\n' in text
    assert 'gpuhealth_device_plugin_allocations_total{resource="nvidia.com/gpu",result="unknown_device"} 1\n' in text
    assert 'gpuhealth_device_plugin_allocations_total{resource="nvidia.com/gpu",result="unhealthy_device"} 1\n' in text
    assert 'gpuhealth_device_plugin_registered{resource="nvidia.com/gpu"} 1\n' in text
    assert 'gpuhealth_device_plugin_devices{resource="nvidia.com/gpu",health="healthy"} 2\n' in text
    assert 'gpuhealth_device_plugin_devices{resource="nvidia.com/gpu",health="unhealthy"} 1\n' in text
    assert "# TYPE gpuhealth_device_plugin_allocations_total counter\n" in text
    # PreStartContainer is a no-op that still answers.
    node.kubelet.stub(GPU).PreStartContainer(pb.PreStartContainerRequest(devices_ids=[uuid(0)]), timeout=5)


def test_get_preferred_allocation_over_grpc(node: Node) -> None:
    # 0-3 on NUMA 0, 4-5 on NUMA 1; NVLink only 2-5.
    inv = inventory([gpu(i, numa=0 if i < 4 else 1) for i in range(6)], [(2, 5)])
    node.kubelet.start()
    node.start_plugin(inv)
    node.wait_registered()
    stub = node.kubelet.stub(GPU)

    def prefer(available: list[int], must: list[int], size: int) -> list[str]:
        req = pb.PreferredAllocationRequest(
            container_requests=[
                pb.ContainerPreferredAllocationRequest(
                    available_deviceIDs=[uuid(i) for i in available],
                    must_include_deviceIDs=[uuid(i) for i in must],
                    allocation_size=size,
                )
            ]
        )
        return list(stub.GetPreferredAllocation(req, timeout=5).container_responses[0].deviceIDs)

    assert sorted(prefer([0, 1, 2, 3, 4, 5], [], 2)) == [uuid(2), uuid(5)]  # NVLink beats NUMA
    assert sorted(prefer([0, 1, 3, 4, 5], [], 2)) == [uuid(0), uuid(1)]  # then same NUMA
    assert prefer([0, 1, 3, 4, 5], [4], 2) == [uuid(4), uuid(5)]  # must_include, then its NUMA peer


def test_kubelet_restart_reregisters_within_one_second(node: Node) -> None:
    node.kubelet.start()
    node.start_plugin()
    node.wait_registered()
    sock = os.path.join(node.dir, socket_name(GPU))
    assert os.path.exists(sock)
    node.health.set(uuid(0), HealthState.UNHEALTHY)
    assert node.kubelet.wait_for(lambda: node.kubelet.allocatable(GPU) == 2)
    restarted = time.monotonic()
    node.kubelet.restart()  # wipes our socket too
    assert node.kubelet.wait_for(lambda: node.kubelet.latest(GPU) is not None, 1.0), node.kubelet.errors
    ((at, req),) = node.kubelet.registrations
    assert at - restarted < 1.0
    assert req.resource_name == GPU
    msg = node.kubelet.latest(GPU)
    assert msg is not None and msg.at - restarted < 1.0
    assert msg.health_of(uuid(0)) == "Unhealthy"  # the fence survives the kubelet restart
    assert os.path.exists(sock)
    # Health changes keep flowing on the new stream.
    node.health.set(uuid(0), HealthState.HEALTHY)
    assert node.kubelet.wait_for(lambda: node.kubelet.allocatable(GPU) == 3, 1.0)
    # Old server generations release their threads (no leak per kubelet restart).
    for _ in range(3):
        node.kubelet.restart()
        node.wait_registered(timeout=1.0)
    assert node.kubelet.wait_for(lambda: grpc_threads() <= 3, 3.0), grpc_threads()


def grpc_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("dp-grpc"))


def test_plugin_started_before_kubelet_registers_when_it_appears(node: Node) -> None:
    manager = node.start_plugin()
    assert os.path.exists(os.path.join(node.dir, socket_name(GPU)))  # serving already
    time.sleep(0.5)
    assert 'gpuhealth_device_plugin_registered{resource="nvidia.com/gpu"} 0\n' in manager.render_metrics(
        RenderContext(hostname_label=None, hostname="")
    )
    appeared = time.monotonic()
    node.kubelet.start()
    node.wait_registered(timeout=1.0)
    assert node.kubelet.registrations[0][0] - appeared < 1.0
    assert node.kubelet.allocatable(GPU) == 3
    assert 'gpuhealth_device_plugin_registered{resource="nvidia.com/gpu"} 1\n' in manager.render_metrics(
        RenderContext(hostname_label=None, hostname="")
    )


def test_socket_removed_on_stop(node: Node) -> None:
    node.kubelet.start()
    manager = node.start_plugin()
    node.wait_registered()
    sock = os.path.join(node.dir, socket_name(GPU))
    assert os.path.exists(sock)
    manager.stop()
    node.manager = None
    assert not os.path.exists(sock)
    assert os.path.exists(node.kubelet.socket)  # not ours to remove


def test_inventory_change_is_advertised(node: Node) -> None:
    node.kubelet.start()
    manager = node.start_plugin()
    node.wait_registered()
    node.inventory.current = inventory([gpu(0, numa=0), gpu(1, numa=0)])
    manager.on_inventory_change()
    assert node.kubelet.wait_for(lambda: node.kubelet.capacity(GPU) == 2, 1.0)
    with pytest.raises(grpc.RpcError) as err:
        allocate(node, [uuid(2)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_mig_reconfiguration_adds_resources_and_empties_vanished_ones(node: Node) -> None:
    node.kubelet.start()
    manager = node.start_plugin(inventory([gpu(0, migs=("1g.10gb",)), gpu(1)]), mig_strategy="mixed")
    node.wait_registered(GPU, "nvidia.com/mig-1g.10gb")
    node.inventory.current = inventory([gpu(0, migs=("2g.20gb",)), gpu(1)])
    manager.on_inventory_change()
    node.wait_registered("nvidia.com/mig-2g.20gb")
    assert node.kubelet.wait_for(lambda: node.kubelet.capacity("nvidia.com/mig-1g.10gb") == 0, 1.0)
    assert node.kubelet.latest("nvidia.com/mig-2g.20gb").ids == {mig_uuid(0, 0)}  # type: ignore[union-attr]


def test_newest_list_and_watch_stream_is_served_the_oldest_closed(node: Node) -> None:
    """The kubelet's newest stream is the one that counts: refusing it can kill the endpoint. With the
    stream cap reached, the oldest stream ends and the newest is served."""
    node.kubelet.start()
    node.start_plugin()
    node.wait_registered()
    channel = grpc.insecure_channel(f"unix://{os.path.join(node.dir, socket_name(GPU))}")
    stub = pb_grpc.DevicePluginStub(channel)
    try:
        streams = [stub.ListAndWatch(pb.Empty()) for _ in range(4)]  # the kubelet's stream plus these: 5 > 4
        assert all(len(next(s).devices) == 3 for s in streams)  # every new one is served
        assert node.kubelet.wait_for(lambda: node.kubelet.ended.get(GPU, 0) == 1, 3)  # the oldest ended
        newest = stub.ListAndWatch(pb.Empty())
        assert len(next(newest).devices) == 3
        # One of ours ended (the server's oldest: streams opened together reach it in any order), cleanly;
        # the others are still served. Read in threads: a stream that never ends must fail, not hang.
        finished = threading.Semaphore(0)

        def drain(stream: object) -> None:
            try:
                for _ in stream:  # type: ignore[attr-defined]
                    pass
            except grpc.RpcError:
                return  # cancelled when the test closes the channel: not an end the plugin chose
            finished.release()

        for stream in streams:
            threading.Thread(target=drain, args=(stream,), daemon=True).start()
        assert finished.acquire(timeout=3)
        assert not finished.acquire(timeout=0.5)  # only one
        assert sum(st.code() == grpc.StatusCode.OK for st in streams if st.done()) == 1
    finally:
        channel.close()


def test_kubelet_dropping_our_stream_makes_the_plugin_register_again(node: Node) -> None:
    node.kubelet.start()
    node.start_plugin()
    node.wait_registered()
    seen = len(node.kubelet.registrations)
    node.kubelet.drop_streams(GPU)  # the kubelet stops reading us, without restarting
    assert node.kubelet.wait_for(lambda: len(node.kubelet.registrations) > seen, 6), node.kubelet.errors
    assert node.kubelet.wait_for(lambda: node.kubelet.capacity(GPU) == 3, 3)


class LiveSocket:
    """A listening unix socket standing in for NVIDIA's device plugin."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.path = path

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


def test_nvidia_plugin_serving_the_resource_keeps_ours_off_it(node: Node) -> None:
    node.kubelet.start()
    nvidia = LiveSocket(os.path.join(node.dir, "nvidia-gpu.sock"))
    try:
        manager = node.start_plugin()
        conflict = 'gpuhealth_device_plugin_conflict{resource="nvidia.com/gpu"} 1'
        assert node.kubelet.wait_for(lambda: conflict in manager.render_metrics(RenderContext("Hostname", "n")), 3)
        assert node.kubelet.registrations == []  # never registered while NVIDIA's plugin answers
    finally:
        nvidia.close()
    # NVIDIA's plugin gone: ours registers within a recheck period
    node.wait_registered(timeout=10)
    assert 'gpuhealth_device_plugin_conflict{resource="nvidia.com/gpu"} 0' in manager.render_metrics(
        RenderContext("Hostname", "n")
    )


def test_a_leftover_nvidia_socket_file_is_no_conflict(node: Node) -> None:
    stale = LiveSocket(os.path.join(node.dir, "nvidia-gpu.sock"))
    stale.sock.close()  # the file stays, nobody answers: NVIDIA's plugin died without cleaning up
    node.kubelet.start()
    node.start_plugin()
    node.wait_registered()


def test_take_over_registers_beside_nvidias_plugin(node: Node) -> None:
    node.kubelet.start()
    nvidia = LiveSocket(os.path.join(node.dir, "nvidia-gpu.sock"))
    try:
        manager = node.start_plugin(take_over=True)
        node.wait_registered()
        assert 'gpuhealth_device_plugin_conflict{resource="nvidia.com/gpu"} 1' in manager.render_metrics(
            RenderContext("Hostname", "n")
        )
    finally:
        nvidia.close()
