"""Verdicts reach the scheduler through the API: the real daemon on the fake NVML, the real kubernetes
client against tests/fakeapiserver.py, pods from a fake PodResources kubelet.

An XID fences a GPU -> a DeviceTaintRule for its DRA device, a Warning Event on the pod holding it,
and (XID 79: reboot the node) our Node taint; a clear removes the rule and the taint; a restart
collects this node's stale rules and a leftover taint. Every resource.k8s.io version that serves
DeviceTaintRule, and a server that serves none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.scheduling.drataints import NODE_LABEL, TAINT_KEY, rule_name
from tests.e2e.harness import ROOT
from tests.e2e.nvmlnode import NvmlNode
from tests.fakeapiserver import FakeApiServer, nvidia_resource_slice
from tests.fakekubelet import FakeKubelet
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

NODE = "test-node"  # the harness's NODE_NAME
DRIVER = "gpu.nvidia.com"
NODE_TAINT = "gpu-health-exporter/unhealthy=true:NoSchedule"
OTHER_TAINT = {"key": "example.com/maintenance", "effect": "NoSchedule"}


def wait_for(cond: Any, timeout_s: float = 15.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ghe-sch-", dir="/tmp")  # unix socket paths: 107 bytes at most
    yield d
    shutil.rmtree(d, ignore_errors=True)


def scenario() -> dict[str, Any]:
    data = load_scenario("h100x8")
    data["devices"] = data["devices"][:2]
    return data


def nvidia_slice(devices: list[dict[str, Any]]) -> dict[str, Any]:
    return nvidia_resource_slice(NODE, [(f"gpu-{d['minor']}", d["uuid"]) for d in devices])


def ours(api: FakeApiServer) -> dict[str, dict[str, Any]]:
    return {n: r for n, r in api.rules().items() if r["metadata"].get("labels", {}).get(NODE_LABEL) == NODE}


def node_taints(api: FakeApiServer) -> list[dict[str, Any]]:
    return api.node_taints(NODE)


def our_taint(api: FakeApiServer) -> list[dict[str, Any]]:
    return [t for t in node_taints(api) if t["key"] == "gpu-health-exporter/unhealthy"]


def health_clear(node: NvmlNode, gpu: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "health", "clear", "--gpu", gpu, "--reason", "reseated",
         "--state-dir", str(node.state_dir)],
        capture_output=True, text=True, timeout=20, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("version", ["v1alpha3", "v1beta2", "v1"])
def test_fence_clear_restart_through_the_api(
    version: str, fakenvml_build: FakeNvmlBuild, tmp_path: Path, short_dir: str
) -> None:
    data = scenario()
    gpu0, gpu1 = (d["uuid"] for d in data["devices"])
    kubelet = FakeKubelet(os.path.join(short_dir, "kubelet.sock")).start()
    kubelet.set_pods([{"name": "trainer", "namespace": "ml", "containers": [{"name": "c", "devices": [
        {"resource_name": "nvidia.com/gpu", "device_ids": [gpu0]}]}]}])  # fmt: skip
    api = FakeApiServer(dra_taint_versions=(version,)).start()
    try:
        api.set_node(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "spec": {"taints": [OTHER_TAINT]}}
        )
        api.upsert_resource_slice(nvidia_slice(data["devices"]))
        args = ["-c", "200", "-k", "--pod-resources-kubelet-socket", kubelet.socket_path]
        args += ["--kubeconfig", api.write_kubeconfig(os.path.join(short_dir, "kc")), "--dra-device-taints"]
        args += ["--health-node-taint", NODE_TAINT, "--kubernetes-events"]
        node = NvmlNode(fakenvml_build, tmp_path, data, args)
        exp = node.exporter
        exp.wait_ready()
        exp.wait_for(lambda t: "gpuhealth_dra_taints_supported 1\n" in t)

        # XID 48 (double-bit ECC) on GPU 0: a rule for gpu-<minor>, an Event on the pod, no Node taint.
        node.control("xid", gpu=0, xid=48)
        assert wait_for(lambda: len(ours(api)) == 1), exp.logs()
        rule = next(iter(ours(api).values()))
        assert rule["apiVersion"] == f"resource.k8s.io/{version}"
        assert rule["metadata"]["name"] == rule_name(NODE, DRIVER, NODE, "gpu-0")
        assert rule["spec"]["deviceSelector"] == {"driver": DRIVER, "pool": NODE, "device": "gpu-0"}
        assert rule["spec"]["taint"]["key"] == TAINT_KEY and rule["spec"]["taint"]["value"] == "48"
        assert wait_for(lambda: any(e["involvedObject"].get("kind") == "Pod" for e in api.events))
        event = next(e for e in api.events if e["involvedObject"].get("kind") == "Pod")
        assert event["involvedObject"]["name"] == "trainer" and event["reason"] == "GpuUnhealthy"
        assert gpu0 in event["message"]
        exp.wait_for(lambda t: "gpuhealth_dra_device_taint_rules 1\n" in t)
        assert our_taint(api) == []

        # XID 79 (fallen off the bus) on GPU 1: reboot the node -> our Node taint, next to the admin's.
        node.control("xid", gpu=1, xid=79)
        assert wait_for(lambda: len(our_taint(api)) == 1 and len(ours(api)) == 2), exp.logs()
        assert OTHER_TAINT in node_taints(api)
        exp.wait_for(lambda t: "gpuhealth_node_taint_applied 1\n" in t)

        # Clear GPU 1: the taint and its rule go; GPU 0's rule stays.
        health_clear(node, gpu1)
        assert wait_for(lambda: our_taint(api) == [] and len(ours(api)) == 1), exp.logs()
        assert node_taints(api) == [OTHER_TAINT]
        assert exp.stop() == 0

        # While it is down (GPU 0 stays fenced on disk): a stale rule of ours and a leftover taint are left.
        stale = rule_name(NODE, DRIVER, NODE, "gpu-1")
        api.upsert_rule({"metadata": {"name": stale, "labels": {NODE_LABEL: NODE}}, "spec": {
            "deviceSelector": {"driver": DRIVER, "pool": NODE, "device": "gpu-1"},
            "taint": {"key": TAINT_KEY, "value": "79", "effect": "NoSchedule"}}})  # fmt: skip
        leftover = {"key": "gpu-health-exporter/unhealthy", "value": "true", "effect": "NoSchedule"}
        api.set_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                      "spec": {"taints": [OTHER_TAINT, leftover]}})  # fmt: skip
        exp = node.restart()
        exp.wait_ready()
        assert wait_for(lambda: set(ours(api)) == {rule_name(NODE, DRIVER, NODE, "gpu-0")}), exp.logs()
        assert wait_for(lambda: node_taints(api) == [OTHER_TAINT]), exp.logs()
        health_clear(node, gpu0)
        assert wait_for(lambda: ours(api) == {}), exp.logs()
        assert "Traceback" not in exp.logs()
        assert exp.stop() == 0
    finally:
        api.stop()
        kubelet.stop()


def test_a_server_without_device_taint_rules_is_reported_not_fatal(
    fakenvml_build: FakeNvmlBuild, tmp_path: Path, short_dir: str
) -> None:
    api = FakeApiServer(dra_taint_versions=()).start()
    try:
        args = ["-c", "200", "--kubeconfig", api.write_kubeconfig(os.path.join(short_dir, "kc")), "--dra-device-taints"]
        node = NvmlNode(fakenvml_build, tmp_path, scenario(), args)
        exp = node.exporter
        exp.wait_ready()
        text = exp.wait_for(lambda t: "gpuhealth_dra_taints_supported 0\n" in t)
        assert "gpuhealth_dra_device_taint_rules 0\n" in text
        node.control("xid", gpu=0, xid=48)
        assert wait_for(lambda: '"unhealthy"' in exp.get("/gpus")[1].decode())  # fenced all the same
        assert not [r for r in api.requests if "devicetaintrules" in r.path]
        assert exp.logs().count("dra_device_taints_unsupported") == 1
        assert exp.stop() == 0
    finally:
        api.stop()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--kubernetes-events"], {}, "--kubernetes-events needs the pod mapping"),
        (["--dra-device-taints"], {"NODE_NAME": ""}, "needs NODE_NAME"),
        (["--health-node-taint", "k:Bogus"], {}, "effect 'Bogus' is not one of"),
        (["--dra-device-taints", "--kubeconfig", "{bad}"], {}, "no Kubernetes API access (--kubeconfig"),
    ],
)
def test_bad_start_up_is_exit_2_with_a_message(
    args: list[str], env: dict[str, str], message: str, tmp_path: Path
) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\n")  # no clusters, no current-context
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "--simulate", *(a.format(bad=bad) for a in args)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "NODE_NAME": "test-node", **env},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
