"""The committed gRPC stubs must be exactly what regenerate.py produces from the committed proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.deviceplugin import regenerate
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    import grpc_tools  # type: ignore[import-untyped]

    generated = regenerate.generate(tmp_path)
    for fresh, rel in zip(generated, regenerate.GENERATED, strict=True):
        committed = regenerate.REPO_ROOT / rel
        assert committed.exists(), f"{rel} is missing: run .venv/bin/python -m exporter.deviceplugin.regenerate"
        if fresh.read_bytes() != committed.read_bytes():
            pytest.fail(
                f"{rel} differs from what {regenerate.PROTO} generates with grpcio-tools "
                f"{getattr(grpc_tools, '__version__', '?')}: run .venv/bin/python -m exporter.deviceplugin.regenerate "
                "and commit the result"
            )


def test_wire_names_match_the_kubelet() -> None:
    # What the kubelet dials: package v1beta1, these services and methods.
    fd = pb.DESCRIPTOR
    assert fd.package == "v1beta1"
    assert fd.name == "exporter/deviceplugin/api/v1beta1/deviceplugin.proto"  # distinct from PodResources' api.proto
    assert [m.name for m in fd.services_by_name["Registration"].methods] == ["Register"]
    assert [m.name for m in fd.services_by_name["DevicePlugin"].methods] == [
        "GetDevicePluginOptions",
        "ListAndWatch",
        "GetPreferredAllocation",
        "Allocate",
        "PreStartContainer",
    ]
    assert fd.services_by_name["DevicePlugin"].methods_by_name["ListAndWatch"].server_streaming
    car = fd.message_types_by_name["ContainerAllocateResponse"]
    assert {f.name: f.number for f in car.fields} == {
        "envs": 1,
        "mounts": 2,
        "devices": 3,
        "annotations": 4,
        "cdi_devices": 5,
    }
    cpar = fd.message_types_by_name["ContainerPreferredAllocationRequest"]
    assert {f.name: f.number for f in cpar.fields} == {
        "available_deviceIDs": 1,
        "must_include_deviceIDs": 2,
        "allocation_size": 3,
    }
