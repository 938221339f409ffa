"""Least privilege derived from the code: each API-server feature of the real daemon (fake NVML, a fake
PodResources kubelet, the real kubernetes client against tests/fakeapiserver.py) runs with the
exporter args the chart renders for it, through a fence and a clear; every request it sends is mapped
to the (apiGroup, resource, verb) the API server's RBAC authorizes it as, and the chart's ClusterRole
for the same values must grant exactly that set: nothing missing, nothing extra."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_common import PLAIN, load_docs, render_chart
from tests.deploy.k8s_objects import container, daemonset, rbac_rules
from tests.e2e.harness import ROOT
from tests.e2e.nvmlnode import NvmlNode
from tests.fakeapiserver import FakeApiServer, RecordedRequest, nvidia_resource_slice
from tests.fakekubelet import FakeKubelet
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

NODE = "test-node"  # the harness's NODE_NAME
DRIVER = "gpu.nvidia.com"
Grant = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

# Discovery is granted to every authenticated user by the default system:discovery ClusterRole
# (nonResourceURLs /api, /apis and below): it needs nothing from our ClusterRole.
DISCOVERY_PREFIXES = ("/api", "/apis")


def is_discovery(path: str) -> bool:
    parts = [p for p in path.split("/") if p]
    return path in DISCOVERY_PREFIXES or (parts[:1] == ["apis"] and len(parts) <= 3) or parts == ["api", "v1"]


def rbac_grant(req: RecordedRequest) -> Grant:
    """The API server's RBAC attributes of one request (k8s.io/apiserver RequestInfoFactory): GET on a
    collection is list (watch with watch=true), on a name get; POST create, PUT update, PATCH patch,
    DELETE delete; a path below the name is a subresource (nodes/status)."""
    parts = [p for p in req.path.split("/") if p]
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        assert parts[0] == "apis", req.path
        group, rest = parts[1], parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]  # namespaced: namespaces/<ns>/<resource>/...
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else None, rest[2:]
    if sub:
        resource = f"{resource}/{sub[0]}"
    if req.method == "GET":
        verb = "watch" if req.query.get("watch") in ("true", "1") else ("get" if name else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[req.method]
    return group, resource, verb


def granted(values: dict[str, Any]) -> set[Grant]:
    out: set[Grant] = set()
    for rule in rbac_rules(render_chart(values)):
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def wait_for(cond: Callable[[], bool], what: str, logs: Callable[[], str], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    assert cond(), f"{what} did not happen in {timeout_s}s:\n{logs()}"


def scenario() -> dict[str, Any]:
    data = load_scenario("h100x8")
    data["devices"] = data["devices"][:2]
    return data


def resource_slice(devices: list[dict[str, Any]]) -> dict[str, Any]:
    return nvidia_resource_slice(NODE, [(f"gpu-{d['minor']}", d["uuid"]) for d in devices])


def chart_args(values: dict[str, Any], kubelet_socket: str) -> list[str]:
    """The exporter's args as the chart renders them, minus what the harness sets for itself (address,
    state dir, log format) and with the kubelet socket and a short cycle for the test."""
    own = ("--address=", "--state-dir=", "--log-format=", "--collect-interval=")
    args = [a for a in container(daemonset(render_chart(values)))["args"] if not a.startswith(own)]
    args = [
        f"--pod-resources-kubelet-socket={kubelet_socket}" if a.startswith("--pod-resources-kubelet-socket=") else a
        for a in args
    ]
    # The chart mounts the host's /proc at /host/proc; here this machine's /proc is the host's.
    args = ["--host-proc=/proc" if a.startswith("--host-proc=") else a for a in args]
    return [*args, "--collect-interval=200"]


def health_clear(node: NvmlNode, gpu: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "health", "clear", "--gpu", gpu, "--reason", "reseated",
         "--state-dir", str(node.state_dir)],
        capture_output=True, text=True, timeout=20, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.fixture
def short_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ghe-rbac-", dir="/tmp")  # unix socket paths: 107 bytes at most
    yield d
    shutil.rmtree(d, ignore_errors=True)


def ours(api: FakeApiServer) -> dict[str, dict[str, Any]]:
    return {
        n: r for n, r in api.rules().items() if r["metadata"].get("labels", {}).get("gpu-health-exporter/node") == NODE
    }


def our_node_taint(api: FakeApiServer) -> list[dict[str, Any]]:
    return [t for t in api.node_taints(NODE) if t["key"] == "gpu-health-exporter/unhealthy"]


def pod_events(api: FakeApiServer) -> list[dict[str, Any]]:
    return [e for e in api.events if e["involvedObject"].get("kind") == "Pod"]


def node_condition(api: FakeApiServer) -> list[dict[str, Any]]:
    conditions = (api.nodes.get(NODE) or {}).get("status", {}).get("conditions", [])
    return [c for c in conditions if c.get("type") == "GPUHealthy"]  # exporter/health/nodestatus.py


# Each feature: its chart values, and how to drive it through a fence and a clear (each step waits for
# the feature's own effect on the API server, so the recorded requests are complete).
def drive_pod_labels(node: NvmlNode, api: FakeApiServer, gpus: list[str]) -> None:
    wait_for(lambda: api.watcher_count("pods") >= 1, "the pod watch", node.exporter.logs)


def drive_process_metrics(node: NvmlNode, api: FakeApiServer, gpus: list[str]) -> None:
    wait_for(lambda: api.watcher_count("pods") >= 1, "the pod watch", node.exporter.logs)
    node.exporter.wait_for(lambda t: "gpuhealth_gpu_processes" in t)


def drive_dra(node: NvmlNode, api: FakeApiServer, gpus: list[str]) -> None:
    wait_for(lambda: api.watcher_count("resourceslices") >= 1, "the ResourceSlice watch", node.exporter.logs)


def wait_for_the_pod(node: NvmlNode) -> None:
    """The pod mapping has read the kubelet: a fence from now on finds the pod holding GPU 0 (before
    it, the fence would post no pod Event, and none later)."""
    node.exporter.wait_for(lambda t: 'pod="trainer"' in t)


def drive_node_status(node: NvmlNode, api: FakeApiServer, gpus: list[str]) -> None:
    wait_for(lambda: bool(node_condition(api)), "the node condition", node.exporter.logs)
    wait_for_the_pod(node)
    node.control("xid", gpu=0, xid=48)
    wait_for(lambda: bool(pod_events(api)), "the pod Event", node.exporter.logs)
    before = len(api.events)
    health_clear(node, gpus[0])
    wait_for(lambda: len(api.events) > before, "the clear's Node Event", node.exporter.logs)


def drive_pod_events(node: NvmlNode, api: FakeApiServer, gpus: list[str]) -> None:
    wait_for_the_pod(node)
    node.control("xid", gpu=0, xid=48)
    wait_for(lambda: bool(pod_events(api)), "the pod Event", node.exporter.logs)
    health_clear(node, gpus[0])


def drive_dra_taints(node: NvmlNode, api: FakeApiServer, gpus: list[str]) -> None:
    node.exporter.wait_for(lambda t: "gpuhealth_dra_taints_supported 1\n" in t)
    # A warning XID degrades GPU 0 (a rule with effect None: create), the fence makes it NoSchedule
    # (the same rule rewritten: update), the clear removes it (delete).
    node.control("xid", gpu=0, xid=94)
    wait_for(
        lambda: [r["spec"]["taint"]["effect"] for r in ours(api).values()] == ["None"],
        "the None rule",
        node.exporter.logs,
    )
    node.control("xid", gpu=0, xid=48)
    wait_for(
        lambda: [r["spec"]["taint"]["effect"] for r in ours(api).values()] == ["NoSchedule"],
        "the rewrite",
        node.exporter.logs,
    )
    health_clear(node, gpus[0])
    wait_for(lambda: ours(api) == {}, "the rule's deletion", node.exporter.logs)


def drive_node_taint(node: NvmlNode, api: FakeApiServer, gpus: list[str]) -> None:
    node.control("xid", gpu=0, xid=79)  # fallen off the bus: reboot the node -> our taint
    wait_for(lambda: len(our_node_taint(api)) == 1, "the node taint", node.exporter.logs)
    health_clear(node, gpus[0])
    wait_for(lambda: our_node_taint(api) == [], "the taint's removal", node.exporter.logs)


FEATURES: dict[str, tuple[dict[str, Any], Callable[[NvmlNode, FakeApiServer, list[str]], None]]] = {
    "pod-labels": ({"podMapping": {"enablePodLabels": True}}, drive_pod_labels),
    "dra-attribution": ({"podMapping": {"dra": True}}, drive_dra),
    "process-metrics": ({"processMetrics": {"mode": "per-pod"}}, drive_process_metrics),
    "node-status": ({"health": {"nodeStatus": True}}, drive_node_status),
    "pod-events": ({"scheduler": {"podEvents": True}}, drive_pod_events),
    "dra-device-taints": (
        {"scheduler": {"draDeviceTaints": {"effect": "NoSchedule"}}, "health": {"warnXids": [94]}},
        drive_dra_taints,
    ),
    "node-taint": ({"scheduler": {"nodeTaint": "gpu-health-exporter/unhealthy=true:NoSchedule"}}, drive_node_taint),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_cluster_role_grants_exactly_what_the_feature_calls(
    feature: str, fakenvml_build: FakeNvmlBuild, tmp_path: Path, short_dir: str
) -> None:
    values, drive = FEATURES[feature]
    data = scenario()
    gpus = [d["uuid"] for d in data["devices"]]
    kubelet = FakeKubelet(os.path.join(short_dir, "kubelet.sock")).start()
    kubelet.set_pods([{"name": "trainer", "namespace": "ml", "containers": [{"name": "c", "devices": [
        {"resource_name": "nvidia.com/gpu", "device_ids": [gpus[0]]}]}]}])  # fmt: skip
    api = FakeApiServer(dra_taint_versions=("v1",)).start()
    try:
        api.set_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "spec": {}})
        api.upsert_resource_slice(resource_slice(data["devices"]))
        args = chart_args(values, kubelet.socket_path)
        args += ["--kubeconfig", api.write_kubeconfig(os.path.join(short_dir, "kc"))]
        node = NvmlNode(fakenvml_build, tmp_path, data, args)
        node.exporter.wait_ready()
        drive(node, api, gpus)
        logs = node.exporter.logs()
        assert node.exporter.stop() == 0, logs
        assert "Traceback" not in logs
    finally:
        api.stop()
        kubelet.stop()
    called = {rbac_grant(r) for r in list(api.requests) if not is_discovery(r.path)}
    assert called, "the feature sent no request"
    assert granted(values) == called, f"chart grants {sorted(granted(values))}, the code calls {sorted(called)}"


def test_request_mapping_follows_the_api_servers_rules() -> None:
    def grant(method: str, path: str, **query: str) -> Grant:
        return rbac_grant(RecordedRequest(method, path, query, None))

    assert grant("GET", "/api/v1/pods", fieldSelector="spec.nodeName=n") == ("", "pods", "list")
    assert grant("GET", "/api/v1/pods", watch="true") == ("", "pods", "watch")
    assert grant("GET", "/api/v1/nodes/n") == ("", "nodes", "get")
    assert grant("PATCH", "/api/v1/nodes/n/status") == ("", "nodes/status", "patch")
    assert grant("POST", "/api/v1/namespaces/ml/events") == ("", "events", "create")
    assert grant("PUT", "/apis/resource.k8s.io/v1/devicetaintrules/r") == (
        "resource.k8s.io",
        "devicetaintrules",
        "update",
    )
    assert grant("DELETE", "/apis/resource.k8s.io/v1/devicetaintrules/r") == (
        "resource.k8s.io",
        "devicetaintrules",
        "delete",
    )
    assert all(is_discovery(p) for p in ("/api", "/apis", "/apis/resource.k8s.io", "/apis/resource.k8s.io/v1"))
    assert not is_discovery("/apis/resource.k8s.io/v1/resourceslices")


def test_features_off_need_no_role_and_no_token() -> None:
    rendered = render_chart({})
    assert not rbac_rules(rendered)
    assert daemonset(rendered)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    # Every feature together: the union of what each one calls, nothing more.
    union: dict[str, Any] = {}
    for values, _ in FEATURES.values():
        for key, sub in values.items():
            union.setdefault(key, {}).update(sub)
    assert granted(union) == set().union(*(granted(v) for v, _ in FEATURES.values()))


def test_plain_manifests_grant_what_their_features_call() -> None:
    """deploy/kubernetes runs node status (and the pod mapping, which needs no API access): its
    ClusterRole is the node-status grant the run above derives, nothing more."""
    (role,) = [d for d in load_docs((PLAIN / "rbac.yaml").read_text()) if d["kind"] == "ClusterRole"]
    plain = {
        (g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
    }
    assert plain == granted(FEATURES["node-status"][0])
