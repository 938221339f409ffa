"""Helm chart and plain manifests: lint, render, schema validation, feature toggles, security."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_python.chart import lint
from helm_python.errors import HelmRenderError

from tests.deploy.deploy_common import (
    CHART,
    DASHBOARD_NAMES,
    DASHBOARDS,
    PLAIN,
    ROOT,
    all_docs,
    by_kind,
    full_values,
    load_docs,
    render_chart,
)
from tests.deploy.k8s_objects import (
    CLUSTER_SCOPED,
    OPERATOR_NODE,
    container,
    container_names,
    daemonset,
    mounts,
    paused,
    pod_spec,
    rbac_rules,
    schedulable,
    validate,
)


@pytest.fixture(params=["default", "full"])
def values(request: pytest.FixtureRequest) -> dict[str, Any]:
    return full_values() if request.param == "full" else {}


def test_lint_default_and_full() -> None:
    for vals in ({}, full_values()):
        report = lint(CHART, vals, strict=True)
        assert not report["errors"], report
        assert not [m for m in report["messages"] if m["severity"] >= 2], report


def test_rendered_manifests_validate(values: dict[str, Any]) -> None:
    rendered = render_chart(values)
    docs = all_docs(rendered)
    assert docs
    for doc in docs:
        validate(doc)
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] in ("gpu-health-exporter", "monitoring"), doc["kind"]


def test_plain_manifests_validate_and_are_listed() -> None:
    files = sorted(p.name for p in PLAIN.glob("*.yaml") if p.name != "kustomization.yaml")
    kustomization = yaml.safe_load((PLAIN / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == files
    kinds = []
    for name in files:
        for doc in load_docs((PLAIN / name).read_text()):
            validate(doc)
            kinds.append(doc["kind"])
            assert "helm.sh/chart" not in doc["metadata"].get("labels", {})
    assert sorted(kinds) == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "DaemonSet",
            "Service",
            "NetworkPolicy",
            "ServiceMonitor",
            "PrometheusRule",
        ]
    )


def test_daemonset_basics(values: dict[str, Any]) -> None:
    ds = daemonset(render_chart(values))
    pod = ds["spec"]["template"]["spec"]
    c = container(ds)
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert c["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "500m", "memory": "128Mi"},
    }
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert mounts(ds)["state"] == "/var/lib/gpu-health-exporter"
    assert "--state-dir=/var/lib/gpu-health-exporter" in c["args"]
    (svc,) = by_kind(render_chart(values), "Service")
    assert svc["spec"]["ports"][0] == {"name": "metrics", "port": 9400, "targetPort": "metrics", "protocol": "TCP"}


def test_device_plugin_toggle() -> None:
    off = daemonset(render_chart({"devicePlugin": {"enabled": False}}))
    assert container_names(off) == ["exporter"]
    assert "device-plugins" not in mounts(off)
    assert not [v for v in pod_spec(off)["volumes"] if v["name"] == "device-plugins"]
    assert not [a for a in container(off)["args"] if a.startswith("--device-plugin")]
    # In-process (small setups): the exporter serves the plugin itself, as before the split.
    inproc = {"enabled": True, "inProcess": True, "migStrategy": "mixed", "replicas": 4}
    on = daemonset(render_chart({"devicePlugin": inproc}))
    assert container_names(on) == ["exporter"]
    assert mounts(on)["device-plugins"] == "/var/lib/kubelet/device-plugins"
    args = container(on)["args"]
    assert {"--device-plugin", "--resource-name=nvidia.com/gpu", "--mig-strategy=mixed", "--replicas=4"} <= set(args)
    assert container(on)["securityContext"]["runAsUser"] == 0


PLUGIN_VALUES: dict[str, Any] = {
    "devicePlugin": {"enabled": True, "migStrategy": "mixed", "replicas": 4, "deviceListStrategy": "cdi"}
}


def test_device_plugin_runs_as_its_own_container() -> None:
    rendered = render_chart(PLUGIN_VALUES)
    ds = daemonset(rendered)
    assert container_names(ds) == ["exporter", "device-plugin"]
    exporter, plugin = container(ds), container(ds, "device-plugin")
    # The exporter no longer serves the plugin nor sees the kubelet's device-plugins directory.
    assert not [a for a in exporter["args"] if a.startswith("--device-plugin")]
    assert not [a for a in exporter["args"] if a.startswith(("--resource-name", "--mig-strategy", "--replicas"))]
    assert "device-plugins" not in mounts(ds)
    assert plugin["image"] == exporter["image"]
    assert plugin["command"] == ["python", "-m", "exporter"]
    assert plugin["args"] == [
        "device-plugin",
        "--address=:9402",
        "--state-dir=/var/lib/gpu-health-exporter",
        "--resource-name=nvidia.com/gpu",
        "--device-plugin-dir=/var/lib/kubelet/device-plugins",
        "--mig-strategy=mixed",
        "--replicas=4",
        "--device-list-strategy=cdi",
        "--device-id-strategy=uuid",
        "--log-format=json",
        "--log-level=info",
    ]
    assert "--state-dir=/var/lib/gpu-health-exporter" in exporter["args"]
    assert plugin["ports"] == [{"name": "plugin-metrics", "containerPort": 9402, "protocol": "TCP"}]
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert plugin[probe]["httpGet"] == {"path": path, "port": "plugin-metrics", "scheme": "HTTP"}
        # Separate probes: the exporter's liveness restarts only the exporter.
        assert exporter[probe]["httpGet"]["port"] == "metrics"
    # The kubelet's directory in the plugin container only; the state dir shared, read-only there.
    plugin_mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    assert plugin_mounts["device-plugins"]["mountPath"] == "/var/lib/kubelet/device-plugins"
    assert plugin_mounts["device-plugins"].get("readOnly", False) is False
    assert plugin_mounts["state"] == {
        "name": "state",
        "mountPath": "/var/lib/gpu-health-exporter",
        "readOnly": True,
    }
    assert mounts(ds)["state"] == "/var/lib/gpu-health-exporter"
    assert "pod-resources" not in plugin_mounts
    # CDI (deviceListStrategy cdi): the runtime's spec directories, in the container that serves Allocate.
    assert plugin_mounts["cdi-static"] == {"name": "cdi-static", "mountPath": "/etc/cdi", "readOnly": True}
    assert plugin_mounts["cdi-dynamic"] == {"name": "cdi-dynamic", "mountPath": "/var/run/cdi"}
    assert not {"cdi-static", "cdi-dynamic"} & set(mounts(ds))
    envvar = daemonset(render_chart({"devicePlugin": {"enabled": True}}))
    assert not {"cdi-static", "cdi-dynamic"} & set(mounts(envvar, "device-plugin"))
    assert not [v for v in pod_spec(envvar)["volumes"] if v["name"].startswith("cdi-")]
    volumes = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    assert volumes["device-plugins"]["hostPath"] == {"path": "/var/lib/kubelet/device-plugins", "type": "Directory"}
    # The control socket is 0600 for the exporter's user and root without capabilities cannot
    # override that: both containers run as the same user.
    for c in (exporter, plugin):
        sc = c["securityContext"]
        assert sc["runAsUser"] == 0 and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    (svc,) = by_kind(rendered, "Service")
    assert {"name": "plugin-metrics", "port": 9402, "targetPort": "plugin-metrics", "protocol": "TCP"} in svc["spec"][
        "ports"
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        return e.code


def test_rendered_plugin_command_runs_the_subcommand() -> None:
    """The chart's command and args against the real `device-plugin` subcommand (simulated GPUs, no
    kubelet, no exporter): every flag parses, /health and /metrics answer on the port, /ready is 503
    until the plugin is registered."""
    plugin = container(daemonset(render_chart({"devicePlugin": {"enabled": True}})), "device-plugin")
    # A short directory: the plugin's socket path must fit a unix socket address (107 bytes).
    with tempfile.TemporaryDirectory(prefix="dp") as tmp:
        _run_plugin_command(plugin, Path(tmp))


def _run_plugin_command(plugin: dict[str, Any], tmp_path: Path) -> None:
    state, plugin_dir = tmp_path / "state", tmp_path / "device-plugins"
    state.mkdir(mode=0o700)
    plugin_dir.mkdir()
    port = _free_port()
    args = [
        a.replace("/var/lib/gpu-health-exporter", str(state))
        .replace("/var/lib/kubelet/device-plugins", str(plugin_dir))
        .replace("--address=:9402", f"--address=127.0.0.1:{port}")
        for a in plugin["args"]
    ]
    assert plugin["command"][0] == "python"
    cmd = [sys.executable, *plugin["command"][1:], *args, "--simulate"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        health = 0
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                health = _get(base + "/health")
                if health == 200:
                    break
            time.sleep(0.2)
        assert health == 200, proc.communicate(timeout=10)[0] if proc.poll() is not None else "no /health"
        assert _get(base + "/ready") == 503  # not registered: no kubelet here
        assert _get(base + "/metrics") == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out


def test_device_plugin_needs_the_state_dir() -> None:
    with pytest.raises(HelmRenderError, match=r"needs health\.stateDir"):
        render_chart({**PLUGIN_VALUES, "health": {"stateDir": ""}})
    ds = daemonset(render_chart({"devicePlugin": {"enabled": True, "inProcess": True}, "health": {"stateDir": ""}}))
    assert container_names(ds) == ["exporter"]


def test_service_monitor_scrapes_the_plugin_under_its_own_job() -> None:
    (monitor,) = by_kind(render_chart({**PLUGIN_VALUES, "serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    exporter_ep, plugin_ep = monitor["spec"]["endpoints"]
    assert exporter_ep["port"] == "metrics" and exporter_ep["honorLabels"] is True
    assert plugin_ep["port"] == "plugin-metrics" and plugin_ep["path"] == "/metrics"
    assert plugin_ep["honorLabels"] is False
    # The alert rules and the "Exporters up" panel count up{job="gpu-health-exporter"}: one per node.
    assert {"targetLabel": "job", "replacement": "gpu-health-exporter-device-plugin"} in plugin_ep["relabelings"]
    (alone,) = by_kind(render_chart({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    assert [ep["port"] for ep in alone["spec"]["endpoints"]] == ["metrics"]


def test_non_root_when_no_kubelet_socket_is_needed() -> None:
    ds = daemonset(render_chart({"podMapping": {"enabled": False}, "devicePlugin": {"enabled": False}}))
    sc = container(ds)["securityContext"]
    assert sc["runAsUser"] == 65532 and sc["runAsNonRoot"] is True
    assert "pod-resources" not in mounts(ds)
    assert "--kubernetes" not in container(ds)["args"]
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    root = daemonset(render_chart({}))
    assert container(root)["securityContext"]["runAsUser"] == 0  # PodResources socket is root-owned
    assert "initContainers" not in root["spec"]["template"]["spec"]
    assert mounts(root)["pod-resources"] == "/var/lib/kubelet/pod-resources"


def test_rbac_only_for_enabled_features() -> None:
    """Which verbs each feature needs is derived from the running code in test_deploy_rbac_derived.py;
    here: no role and no token without an API feature, and no dangerous verb in any profile."""
    default = render_chart({})
    assert not rbac_rules(default) and not by_kind(default, "ClusterRoleBinding")
    assert daemonset(default)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    labels = render_chart({"podMapping": {"enablePodLabels": True}})
    assert daemonset(labels)["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert "--kubernetes-node-status" in container(daemonset(render_chart({"health": {"nodeStatus": True}})))["args"]
    for rule in rbac_rules(render_chart(full_values())):
        assert not set(rule["verbs"]) & {"*", "deletecollection", "escalate", "bind", "impersonate"}, rule
        # Update and delete only on the objects a feature owns: its DeviceTaintRules (the admission
        # policy narrows them to the node).
        if set(rule["verbs"]) & {"delete", "update"}:
            assert rule["resources"] == ["devicetaintrules"], rule


def test_pod_mapping_options() -> None:
    args = container(daemonset(render_chart(full_values())))["args"]
    assert {
        "--kubernetes",
        "--kubernetes-enable-pod-uid",
        "--kubernetes-enable-pod-labels",
        "--kubernetes-dra",
        "--nvidia-resource-names=nvidia.com/gpu.shared",
        "--health-auto-recover",
        "--health-fence-xids=48,62,64,74,79,95,109,119,120,140",
        "--log-level=debug",
        "--collectors=/etc/gpu-health-exporter/collectors/collectors.csv",
    } <= set(args)


def test_service_monitor_keeps_workload_labels() -> None:
    (monitor,) = by_kind(render_chart({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    ep = monitor["spec"]["endpoints"][0]
    assert ep["honorLabels"] is True
    assert {"action": "labeldrop", "regex": "(pod|namespace|container)"} in ep["relabelings"]
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"


def test_optional_objects_are_off_by_default() -> None:
    kinds = {d["kind"] for d in all_docs(render_chart({}))}
    assert kinds == {"DaemonSet", "Service", "ServiceAccount", "NetworkPolicy"}


def test_dashboards_configmaps() -> None:
    maps = [
        d
        for d in by_kind(render_chart({"dashboards": {"enabled": True}}), "ConfigMap")
        if "grafana_dashboard" in d["metadata"]["labels"]
    ]
    assert len(maps) == len(DASHBOARD_NAMES)
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((key, text),) = cm["data"].items()
        assert json.loads(text) == json.loads((DASHBOARDS / key).read_text())


def test_values_cover_every_feature() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in [
        "image.repository",
        "podMapping.enabled",
        "podMapping.gpuIdType",
        "devicePlugin.enabled",
        "devicePlugin.resourceName",
        "devicePlugin.replicas",
        "devicePlugin.migStrategy",
        "health.nodeStatus",
        "devicePluginProxy.enabled",
        "devicePluginProxy.upstreamDir",
        "devicePluginProxy.port",
        "scheduler.draDeviceTaints.effect",
        "scheduler.draDeviceTaints.admissionPolicy.enabled",
        "scheduler.draDeviceTaints.admissionPolicy.requireNodePool",
        "scheduler.nodeTaint",
        "scheduler.nodeAdmissionPolicy.enabled",
        "scheduler.podEvents",
        "serviceMonitor.enabled",
        "prometheusRule.enabled",
        "prometheusRule.thresholds",
        "dashboards.enabled",
        "dashboards.labels",
        "resources",
        "tolerations",
        "nodeSelector",
        "priorityClassName",
        "extraArgs",
    ]:
        node: Any = values
        for part in path.split("."):
            assert part in node, path
            node = node[part]
    full = full_values()
    for feature in ["podMapping", "devicePlugin", "serviceMonitor", "prometheusRule", "dashboards"]:
        assert full[feature]["enabled"] is True, feature
    assert full["health"]["nodeStatus"] is True
    # The scheduler features on; the proxy is the alternative to devicePlugin, not an addition.
    assert full["scheduler"]["draDeviceTaints"]["effect"] and full["scheduler"]["nodeTaint"]
    assert full["scheduler"]["podEvents"] is True
    assert "devicePluginProxy" not in full


# --- NVIDIA GPU Operator integration ---

OPERATOR: dict[str, Any] = {"gpuOperator": {"enabled": True}}


def test_without_the_operator_no_deploy_labels_and_no_runtime_class() -> None:
    for vals in ({}, PLUGIN_VALUES):
        pod = pod_spec(daemonset(render_chart(vals)))
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert "affinity" not in pod and "runtimeClassName" not in pod
        assert schedulable(pod, {"nvidia.com/gpu.present": "true"})


def test_operator_selects_the_deploy_label_of_each_workload() -> None:
    plugin = pod_spec(daemonset(render_chart({**OPERATOR, **PLUGIN_VALUES})))
    assert plugin["nodeSelector"] == {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.deploy.device-plugin": "true"}
    metrics_only = pod_spec(daemonset(render_chart(OPERATOR)))
    assert metrics_only["nodeSelector"] == {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.deploy.dcgm-exporter": "true",
    }
    inproc = pod_spec(daemonset(render_chart({**OPERATOR, "devicePlugin": {"enabled": True, "inProcess": True}})))
    assert inproc["nodeSelector"]["nvidia.com/gpu.deploy.device-plugin"] == "true"
    for pod in (plugin, metrics_only, inproc):
        assert pod["runtimeClassName"] == "nvidia"
        assert schedulable(pod, OPERATOR_NODE)
    # The user's selector stays (Helm merges it into the default one); the deploy label is added to it.
    custom = pod_spec(daemonset(render_chart({**OPERATOR, "nodeSelector": {"pool": "gpu"}})))
    assert custom["nodeSelector"] == {
        "nvidia.com/gpu.present": "true",
        "pool": "gpu",
        "nvidia.com/gpu.deploy.dcgm-exporter": "true",
    }
    # gpuClientLabel: the key the MIG manager and the driver manager wait on (nodeSelector keys only).
    client = pod_spec(daemonset(render_chart({"gpuOperator": {"enabled": True, "gpuClientLabel": True}})))
    assert client["nodeSelector"]["nvidia.com/gpu.deploy.client"] == "true"
    assert "nvidia.com/gpu.deploy.client" not in metrics_only["nodeSelector"]


def test_runtime_class_name() -> None:
    def runtime_class(vals: dict[str, Any]) -> str | None:
        name: str | None = pod_spec(daemonset(render_chart(vals))).get("runtimeClassName")
        return name

    assert runtime_class({}) is None
    assert runtime_class({"runtimeClassName": "nvidia-cdi"}) == "nvidia-cdi"
    assert runtime_class(OPERATOR) == "nvidia"
    assert runtime_class({**OPERATOR, "runtimeClassName": "custom"}) == "custom"  # explicit wins
    # CRI-O without CDI or the NRI plugin: the operator sets no RuntimeClass on its own pods either.
    assert runtime_class({"gpuOperator": {"enabled": True, "runtimeClassName": ""}}) is None


@pytest.mark.parametrize("pause", ["paused-for-mig-change", "paused-for-driver-upgrade", "false"])
def test_operator_pause_makes_our_pods_leave_the_node(pause: str) -> None:
    """MIG manager / driver manager: they set the deploy labels to paused-for-* and wait for the GPU
    clients to go before touching the GPUs. The selector requires exactly "true", so any other value
    makes the node unschedulable and the DaemonSet controller deletes our pod (closing its NVML
    handles); back to "true" afterwards brings it back."""
    for vals in ({**OPERATOR, **PLUGIN_VALUES}, OPERATOR, {"gpuOperator": {"enabled": True, "gpuClientLabel": True}}):
        pod = pod_spec(daemonset(render_chart(vals)))
        assert schedulable(pod, OPERATOR_NODE)
        assert not schedulable(pod, paused(OPERATOR_NODE, pause))
        # The label that carries the protocol for this workload requires "true" on its own.
        key = (
            "nvidia.com/gpu.deploy.device-plugin"
            if vals.get("devicePlugin", {}).get("enabled")
            else "nvidia.com/gpu.deploy.dcgm-exporter"
        )
        assert pod["nodeSelector"][key] == "true"
        assert not schedulable(pod, {**OPERATOR_NODE, key: pause})
        # A second pause while the first one is in progress (driver manager appends its own suffix).
        assert not schedulable(pod, {**OPERATOR_NODE, key: f"{pause}_paused-for-driver-upgrade"})


def test_mig_change_pauses_the_plugin_pod() -> None:
    """The MIG flow with the operator values: mig-manager's shutdown sets
    nvidia.com/gpu.deploy.device-plugin=paused-for-mig-change; the plugin-carrying pod must not run
    there until the label is "true" again."""
    pod = pod_spec(daemonset(render_chart({**OPERATOR, **PLUGIN_VALUES})))
    assert pod["nodeSelector"]["nvidia.com/gpu.deploy.device-plugin"] == "true"
    during = {**OPERATOR_NODE, "nvidia.com/gpu.deploy.device-plugin": "paused-for-mig-change"}
    assert not schedulable(pod, during)
    assert schedulable(pod, {**during, "nvidia.com/gpu.deploy.device-plugin": "true"})  # maybeSetTrue


def test_device_specs_and_index_ids_as_nvidias_plugin_offers() -> None:
    """passDeviceSpecs: the flags NVIDIA's --pass-device-specs needs here, the host's /dev and MIG
    capability minors mounted read-only into the container that serves Allocate, and only there."""
    values = {
        **PLUGIN_VALUES,
        "devicePlugin": {**PLUGIN_VALUES["devicePlugin"], "passDeviceSpecs": True, "deviceIdStrategy": "index"},
    }
    ds = daemonset(render_chart(values))
    plugin, exporter = container(ds, "device-plugin"), container(ds)
    args = plugin["args"]
    assert "--device-id-strategy=index" in args and "--pass-device-specs" in args
    assert "--dev-root=/host" in args and "--mig-minors-file=/host/proc/driver/nvidia-caps/mig-minors" in args
    plugin_mounts = {m["name"]: m for m in plugin["volumeMounts"]}
    assert plugin_mounts["host-dev"] == {"name": "host-dev", "mountPath": "/host/dev", "readOnly": True}
    assert plugin_mounts["host-nvidia-caps"]["readOnly"] is True
    assert not {"host-dev", "host-nvidia-caps"} & {m["name"] for m in exporter["volumeMounts"]}
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert volumes["host-dev"]["hostPath"]["path"] == "/dev"
    assert volumes["host-nvidia-caps"]["hostPath"]["path"] == "/proc/driver/nvidia-caps"
    # off by default: no host /dev in the pod
    plain = daemonset(render_chart(PLUGIN_VALUES))
    assert "host-dev" not in {v["name"] for v in plain["spec"]["template"]["spec"]["volumes"]}


def test_process_metrics_mount_the_host_proc_read_only_and_watch_pods() -> None:
    off = render_chart({})
    assert not [a for a in container(daemonset(off))["args"] if "process" in a or "host-proc" in a]
    assert "host-proc" not in mounts(daemonset(off))
    on = render_chart({"processMetrics": {"mode": "per-pod", "interval": 3, "hostProc": "/host-root/proc"}})
    ds = daemonset(on)
    args = container(ds)["args"]
    assert {"--process-metrics=per-pod", "--process-interval=3", "--host-proc=/host/proc"} <= set(args)
    (mount,) = [m for m in container(ds)["volumeMounts"] if m["name"] == "host-proc"]
    assert mount == {"name": "host-proc", "mountPath": "/host/proc", "readOnly": True}
    (volume,) = [v for v in pod_spec(ds)["volumes"] if v["name"] == "host-proc"]
    assert volume["hostPath"] == {"path": "/host-root/proc", "type": "Directory"}
    assert "hostPID" not in pod_spec(ds)  # the host's /proc read-only instead of the host's PID namespace
    assert {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]} in rbac_rules(on)
    for doc in all_docs(on):
        validate(doc)
