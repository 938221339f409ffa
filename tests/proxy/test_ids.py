"""Device IDs -> the UUIDs whose verdicts count."""

from __future__ import annotations

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.proxy.forwarded import ForwardedList
from exporter.proxy.ids import DeviceIds
from tests.deviceplugin.fakes import gpu, inventory, mig_uuid, uuid

IDS = DeviceIds(inventory([gpu(0), gpu(1, migs=("1g.10gb", "2g.20gb"))]))


def test_uuids_replicas_mig_and_index_ids() -> None:
    assert IDS.uuids(uuid(0)) == (uuid(0),)
    assert IDS.uuids(f"{uuid(0)}::3") == (uuid(0),)
    assert IDS.uuids(mig_uuid(1, 1)) == (mig_uuid(1, 1), uuid(1))
    assert IDS.uuids(f"{mig_uuid(1, 0)}::0") == (mig_uuid(1, 0), uuid(1))
    assert IDS.uuids("MIG-unknown") == ("MIG-unknown",)  # its own verdict still counts
    assert IDS.uuids("0") == (uuid(0),)
    assert IDS.uuids("1:1") == (mig_uuid(1, 1), uuid(1))
    assert IDS.uuids("1:1::2") == (mig_uuid(1, 1), uuid(1))


def test_ids_this_node_cannot_place() -> None:
    for device_id in ("5", "1:7", "nvidia0", "", "gpu-0"):
        assert IDS.uuids(device_id) is None, device_id


def test_the_forwarded_list_never_turns_a_device_healthy() -> None:
    fwd = ForwardedList("nvidia.com/gpu")
    assert not fwd.listed and not fwd.refresh(lambda _id: False)  # nothing to tell before the first list
    devices = [pb.Device(ID="a", health="Healthy"), pb.Device(ID="b", health="Unhealthy")]
    fwd.upstream_list(devices, lambda i: i == "a")
    _, message = fwd.wait_newer(0, lambda: False) or (0, b"")
    assert [(d.ID, d.health) for d in pb.ListAndWatchResponse.FromString(message).devices] == [
        ("a", "Unhealthy"),
        ("b", "Unhealthy"),
    ]
    assert (fwd.counts.healthy, fwd.counts.unhealthy, fwd.counts.fenced) == (0, 2, 1)
    assert fwd.refresh(lambda _id: False) and fwd.counts.healthy == 1
    assert not fwd.refresh(lambda _id: False)  # unchanged: no new message
    fwd.upstream_down(lambda _id: False)
    assert (fwd.counts.healthy, fwd.counts.unhealthy, fwd.counts.fenced) == (0, 2, 0)
