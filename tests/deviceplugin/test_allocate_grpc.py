"""Allocate over real unix sockets through the fake kubelet: strategies, device specs, CDI spec management."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from exporter.deviceplugin import DevicePluginConfig, DevicePluginManager
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.cdi import SpecIndex
from exporter.model import Inventory

from .fakekubelet_registration import FakeKubelet
from .fakes import FakeHealth, MutableInventory, gpu, inventory, mig_uuid, uuid

GPU = "nvidia.com/gpu"
KIND = "k8s.device-plugin.nvidia.com/gpu"

# Writes the spec nvidia-ctk would: kind from --vendor/--class, one device per name listed in the
# file given by --test-names-file (the test rewrites it when the "hardware" changes).
FAKE_CTK = """#!{python}
import json, sys
args = dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)
with open(args["--test-names-file"]) as f: names = f.read().split()
with open({log!r}, "a") as f: f.write(" ".join(sys.argv[1:]) + "\\n")
kind = args["--vendor"] + "/" + args["--class"]
spec = {{"cdiVersion": "0.6.0", "kind": kind, "devices": [{{"name": n}} for n in names]}}
with open(args["--output"], "w") as f: json.dump(spec, f)
"""


class Node:
    def __init__(self, plugin_dir: str, tmp: Path) -> None:
        self.dir = plugin_dir
        self.tmp = tmp
        self.kubelet = FakeKubelet(plugin_dir)
        self.health = FakeHealth()
        self.inventory = MutableInventory(inventory([gpu(0), gpu(1)]))
        self.manager: DevicePluginManager | None = None
        self.spec_dir = tmp / "run-cdi"
        self.spec_dir.mkdir()
        self.names = tmp / "names"
        self.ctk_log = tmp / "ctk.log"
        self.ctk = tmp / "nvidia-ctk"
        self.ctk.write_text(FAKE_CTK.format(python=sys.executable, log=str(self.ctk_log)))
        self.ctk.chmod(self.ctk.stat().st_mode | stat.S_IXUSR)

    def start(self, **kw: object) -> DevicePluginManager:
        kw.setdefault("nvidia_ctk_path", str(self.ctk))
        kw.setdefault("cdi_spec_dirs", (str(self.spec_dir),))
        kw.setdefault("cdi_spec_file", str(self.spec_dir / "k8s.device-plugin.nvidia.com-gpu.json"))
        kw.setdefault("cdi_generate_args", (f"--test-names-file={self.names}",))
        config = DevicePluginConfig(plugin_dir=self.dir, **kw)  # type: ignore[arg-type]
        self.manager = DevicePluginManager(config, self.inventory, self.health)
        self.kubelet.start()
        self.manager.start()
        assert self.kubelet.wait_for(lambda: self.kubelet.latest(GPU) is not None, 3.0), self.kubelet.errors
        return self.manager

    def allocate(self, ids: list[str], resource: str = GPU) -> pb.ContainerAllocateResponse:
        req = pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=ids)])
        resp = self.kubelet.stub(resource).Allocate(req, timeout=5)
        return resp.container_responses[0]  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.manager is not None:
            self.manager.stop()
        self.kubelet.stop()


@pytest.fixture
def node(plugin_dir: str, tmp_path: Path) -> Iterator[Node]:
    n = Node(plugin_dir, tmp_path)
    try:
        yield n
    finally:
        n.close()


def wait(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def spec_defines(node: Node, *names: str) -> bool:
    return SpecIndex([str(node.spec_dir)]).missing([f"{KIND}={n}" for n in names]) == []


def test_cdi_cri_uses_the_spec_generated_at_start(node: Node) -> None:
    node.names.write_text(f"{uuid(0)} {uuid(1)}")
    node.start(device_list_strategy="cdi")  # the old name: an alias of cdi-cri
    assert wait(lambda: spec_defines(node, uuid(0), uuid(1)))
    c = node.allocate([uuid(1), uuid(0)])
    assert [d.name for d in c.cdi_devices] == [f"{KIND}={uuid(1)}", f"{KIND}={uuid(0)}"]
    assert dict(c.envs) == {"NVIDIA_VISIBLE_DEVICES": "void"}
    assert not c.annotations and not c.mounts and not c.devices
    assert "--device-name-strategy=uuid" in node.ctk_log.read_text()


def test_cdi_name_without_spec_fails_admission_with_the_name(node: Node) -> None:
    node.names.write_text(uuid(0))  # the spec lacks GPU 1
    node.start(device_list_strategy="cdi-cri")
    assert wait(lambda: spec_defines(node, uuid(0)))
    assert node.allocate([uuid(0)]).cdi_devices[0].name == f"{KIND}={uuid(0)}"
    with pytest.raises(grpc.RpcError) as info:
        node.allocate([uuid(1)])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"no CDI spec in {node.spec_dir} defines {KIND}={uuid(1)}" in (info.value.details() or "")


def test_inventory_change_regenerates_the_spec(node: Node) -> None:
    node.names.write_text(f"{uuid(0)} {uuid(1)}")
    manager = node.start(device_list_strategy="cdi-cri,cdi-annotations")
    assert wait(lambda: spec_defines(node, uuid(0), uuid(1)))
    runs = len(node.ctk_log.read_text().splitlines())
    # A third GPU appears: the collector reports it, the plugin advertises it and the spec follows.
    node.names.write_text(f"{uuid(0)} {uuid(1)} {uuid(2)}")
    node.inventory.current = inventory([gpu(0), gpu(1), gpu(2)])
    manager.on_inventory_change()
    assert wait(lambda: spec_defines(node, uuid(2)))
    assert len(node.ctk_log.read_text().splitlines()) == runs + 1
    assert node.kubelet.wait_for(lambda: node.kubelet.capacity(GPU) == 3, 3.0)
    c = node.allocate([uuid(2)])
    assert [d.name for d in c.cdi_devices] == [f"{KIND}={uuid(2)}"]
    ((key, value),) = c.annotations.items()
    assert key.startswith("cdi.k8s.io/nvidia-device-plugin_") and value == f"{KIND}={uuid(2)}"


def test_spec_kept_by_someone_else(node: Node) -> None:
    # --nvidia-ctk-path '': nothing is generated; an existing spec of the toolkit's kind is used.
    (node.spec_dir / "nvidia.yaml").write_text("kind: nvidia.com/gpu\ndevices:\n- name: '0'\n- name: '1'\n")
    node.start(
        device_list_strategy="cdi-cri", nvidia_ctk_path="", cdi_kind="nvidia.com/gpu", device_id_strategy="index"
    )
    c = node.allocate([uuid(1)])
    assert [d.name for d in c.cdi_devices] == ["nvidia.com/gpu=1"]
    assert not node.ctk_log.exists()


def test_volume_mounts_with_device_specs_for_mig(node: Node, tmp_path: Path) -> None:
    minors = tmp_path / "mig-minors"
    minors.write_text("config 1\nmonitor 2\ngpu1/gi1/access 10\ngpu1/gi1/ci0/access 11\nbad line\n")
    dev = tmp_path / "host"
    (dev / "dev").mkdir(parents=True)
    (dev / "dev" / "nvidiactl").write_text("")
    inv: Inventory = inventory([gpu(0), gpu(1, migs=("1g.10gb",))])
    node.inventory.current = inv
    node.start(
        device_list_strategy="volume-mounts",
        mig_strategy="mixed",
        pass_device_specs=True,
        dev_root=str(dev),
        mig_minors_file=str(minors),
        device_id_strategy="index",
    )
    mig_resource = "nvidia.com/mig-1g.10gb"
    assert node.kubelet.wait_for(lambda: node.kubelet.latest(mig_resource) is not None, 3.0)
    c = node.allocate([mig_uuid(1, 0)], mig_resource)
    assert dict(c.envs) == {"NVIDIA_VISIBLE_DEVICES": "/var/run/nvidia-container-devices"}
    assert [(m.container_path, m.host_path) for m in c.mounts] == [
        ("/var/run/nvidia-container-devices/1:0", "/dev/null")
    ]
    assert [(d.container_path, d.host_path, d.permissions) for d in c.devices] == [
        ("/dev/nvidiactl", f"{dev}/dev/nvidiactl", "rw"),
        ("/dev/nvidia1", f"{dev}/dev/nvidia1", "rw"),
        ("/dev/nvidia-caps/nvidia-cap10", f"{dev}/dev/nvidia-caps/nvidia-cap10", "rw"),
        ("/dev/nvidia-caps/nvidia-cap11", f"{dev}/dev/nvidia-caps/nvidia-cap11", "rw"),
    ]
    assert not c.cdi_devices and not os.listdir(node.spec_dir)  # no CDI strategy: nothing generated
    # The driver's file losing the instance fails admission with the file and line named.
    minors.write_text("gpu1/gi1/access 10\n")
    with pytest.raises(grpc.RpcError) as info:
        node.allocate([mig_uuid(1, 0)], mig_resource)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{minors} has no line 'gpu1/gi1/ci0/access'" in (info.value.details() or "")


def test_envvar_with_index_ids_and_replicas(node: Node) -> None:
    node.start(device_id_strategy="index", replicas=2)
    c = node.allocate([f"{uuid(1)}::0", f"{uuid(1)}::1", f"{uuid(0)}::1"])
    assert dict(c.envs) == {"NVIDIA_VISIBLE_DEVICES": "1,0"}
    assert not c.devices and not c.cdi_devices


def test_spec_json_written_is_what_the_runtime_reads(node: Node) -> None:
    node.names.write_text(uuid(0))
    node.start(device_list_strategy="cdi-annotations")
    spec = node.spec_dir / "k8s.device-plugin.nvidia.com-gpu.json"
    assert wait(spec.exists)
    assert json.loads(spec.read_text())["kind"] == KIND
