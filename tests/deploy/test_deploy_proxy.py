"""Chart: the health proxy in front of NVIDIA's device plugin (devicePluginProxy), and the patch that
points NVIDIA's plugin at it (deploy/nvidia-device-plugin/)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
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
from helm_python.errors import HelmRenderError

from tests.deploy.deploy_common import CHART, ROOT, by_kind, render_chart
from tests.deploy.k8s_objects import (
    OPERATOR_NODE,
    container,
    container_names,
    daemonset,
    mounts,
    paused,
    pod_spec,
    schedulable,
    validate,
)

PROXY: dict[str, Any] = {"devicePluginProxy": {"enabled": True}}
UPSTREAM_DIR = "/var/run/gpu-health-exporter/nvidia-device-plugin"
KUBELET_DIR = "/var/lib/kubelet/device-plugins"
NVIDIA_DIR = ROOT / "deploy/nvidia-device-plugin"
# NVIDIA's standalone chart names the DaemonSet <release>-nvidia-device-plugin (fullname), GFD's
# <release>-gpu-feature-discovery and the MPS daemon's <release>-nvidia-device-plugin-mps-control-daemon
# (k8s-device-plugin v0.20.0 deployments/helm/nvidia-device-plugin/templates/_helpers.tpl).
PLUGIN_VOLUME = "kubelet-device-plugins-dir"  # templates/daemonset-device-plugin.yml
NVIDIA_GIT = Path(os.environ.get("NVIDIA_DEVICE_PLUGIN_GIT", "/work/.mirror/NVIDIA+k8s-device-plugin/repo"))
NVIDIA_CHART = "deployments/helm/nvidia-device-plugin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_status(url: str) -> int:
    """The status of a GET, 0 while nothing answers."""
    with contextlib.suppress(OSError):
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                status: int = r.status
                return status
        except urllib.error.HTTPError as e:
            return e.code
    return 0


def volumes(ds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec(ds)["volumes"]}


def test_proxy_runs_as_its_own_container_beside_the_exporter() -> None:
    rendered = render_chart(PROXY)
    for doc in [d for docs in rendered.values() for d in docs]:
        validate(doc)
    ds = daemonset(rendered)
    assert container_names(ds) == ["exporter", "device-plugin-proxy"]
    exporter, proxy = container(ds), container(ds, "device-plugin-proxy")
    assert proxy["image"] == exporter["image"] and proxy["command"] == ["python", "-m", "exporter"]
    assert proxy["args"] == [
        "device-plugin-proxy",
        "--address=:9403",
        "--state-dir=/var/lib/gpu-health-exporter",
        f"--upstream-dir={UPSTREAM_DIR}",
        f"--device-plugin-dir={KUBELET_DIR}",
        "--log-format=json",
        "--log-level=info",
    ]
    assert proxy["ports"] == [{"name": "proxy-metrics", "containerPort": 9403, "protocol": "TCP"}]
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert proxy[probe]["httpGet"] == {"path": path, "port": "proxy-metrics", "scheme": "HTTP"}
    # NVML for index ids and MIG parents: the exporter's devices, under the pod's RuntimeClass.
    env = {e["name"]: e for e in proxy["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # The control socket is the exporter user's, 0600: the same user (root, no capabilities).
    sc = proxy["securityContext"]
    assert sc["runAsUser"] == 0 == exporter["securityContext"]["runAsUser"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    by_name = {m["name"]: m for m in proxy["volumeMounts"]}
    assert by_name["state"] == {"name": "state", "mountPath": "/var/lib/gpu-health-exporter", "readOnly": True}
    assert by_name["device-plugins"]["mountPath"] == KUBELET_DIR and "readOnly" not in by_name["device-plugins"]
    assert by_name["upstream-device-plugins"]["mountPath"] == UPSTREAM_DIR
    vols = volumes(ds)
    assert vols["device-plugins"]["hostPath"] == {"path": KUBELET_DIR, "type": "Directory"}
    assert vols["upstream-device-plugins"]["hostPath"] == {"path": UPSTREAM_DIR, "type": "DirectoryOrCreate"}
    # The exporter neither serves a plugin nor sees the kubelet's directories.
    assert not {"device-plugins", "upstream-device-plugins"} & set(mounts(ds))
    assert not [a for a in exporter["args"] if a.startswith(("--device-plugin", "--upstream-dir"))]
    assert "--state-dir=/var/lib/gpu-health-exporter" in exporter["args"]


def test_proxy_directories_and_resources_follow_the_values() -> None:
    values = {
        "devicePluginProxy": {
            "enabled": True,
            "upstreamDir": "/run/ghe/nvdp",
            "port": 9503,
            "extraArgs": ["--log-level=debug"],
            "resources": {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        },
        "devicePlugin": {"dir": "/data/kubelet/device-plugins"},
        "health": {"stateDir": "/data/ghe"},
    }
    ds = daemonset(render_chart(values))
    proxy = container(ds, "device-plugin-proxy")
    args = proxy["args"]
    assert {
        "--address=:9503",
        "--state-dir=/data/ghe",
        "--upstream-dir=/run/ghe/nvdp",
        "--device-plugin-dir=/data/kubelet/device-plugins",
    } <= set(args)
    assert args[-1] == "--log-level=debug"  # extra args last: they win over the chart's
    # Helm merges maps: the default cpu limit stays unless set to null.
    assert proxy["resources"] == {
        "requests": {"cpu": "20m", "memory": "64Mi"},
        "limits": {"cpu": "250m", "memory": "256Mi"},
    }
    assert volumes(ds)["upstream-device-plugins"]["hostPath"]["path"] == "/run/ghe/nvdp"
    assert volumes(ds)["device-plugins"]["hostPath"]["path"] == "/data/kubelet/device-plugins"
    assert {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}["upstream-device-plugins"] == "/run/ghe/nvdp"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"devicePlugin": {"enabled": True}}, "mutually exclusive"),
        ({"devicePlugin": {"enabled": True, "inProcess": True}}, "mutually exclusive"),
        ({"health": {"stateDir": ""}}, "devicePluginProxy.enabled needs health.stateDir"),
        ({"devicePluginProxy": {"enabled": True, "upstreamDir": KUBELET_DIR}}, "must differ from devicePlugin.dir"),
        ({"devicePluginProxy": {"enabled": True, "upstreamDir": KUBELET_DIR + "/"}}, "must differ"),
        ({"devicePluginProxy": {"enabled": True, "upstreamDir": "run/nvdp"}}, "is not an absolute host path"),
    ],
)
def test_proxy_refuses_values_that_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmRenderError, match=message):
        render_chart(PROXY | values)


def test_proxy_metrics_are_scraped_under_their_own_job() -> None:
    rendered = render_chart({**PROXY, "serviceMonitor": {"enabled": True}})
    (svc,) = by_kind(rendered, "Service")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert ports["proxy-metrics"] == {
        "name": "proxy-metrics",
        "port": 9403,
        "targetPort": "proxy-metrics",
        "protocol": "TCP",
    }
    assert "plugin-metrics" not in ports
    (monitor,) = by_kind(rendered, "ServiceMonitor")
    endpoints = {ep["port"]: ep for ep in monitor["spec"]["endpoints"]}
    assert set(endpoints) == {"metrics", "proxy-metrics"}
    ep = endpoints["proxy-metrics"]
    assert ep["path"] == "/metrics" and ep["honorLabels"] is False
    # up{job="gpu-health-exporter"} keeps counting one exporter per node; GpuDevicePluginProxyDown
    # selects this job.
    assert {"targetLabel": "job", "replacement": "gpu-health-exporter-device-plugin-proxy"} in ep["relabelings"]
    (off,) = by_kind(render_chart({"serviceMonitor": {"enabled": True}}), "Service")
    assert [p["name"] for p in off["spec"]["ports"]] == ["metrics"]


def test_proxy_pod_leaves_with_nvidias_plugin_when_the_operator_pauses_the_node() -> None:
    """The proxy holds NVML handles and fronts the device plugin: it selects the operator's
    device-plugin deploy label (as NVIDIA's plugin does, values-gpu-operator.yaml), so a MIG change
    or driver upgrade takes both off the node."""
    pod = pod_spec(daemonset(render_chart({**PROXY, "gpuOperator": {"enabled": True}})))
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.deploy.device-plugin": "true"}
    assert pod["runtimeClassName"] == "nvidia"
    assert schedulable(pod, OPERATOR_NODE)
    for pause in ("paused-for-mig-change", "paused-for-driver-upgrade"):
        assert not schedulable(pod, paused(OPERATOR_NODE, pause))
    nvidia_values = yaml.safe_load((NVIDIA_DIR / "values-gpu-operator.yaml").read_text())
    assert set(nvidia_values["nodeSelector"]) <= set(pod["nodeSelector"])
    assert nvidia_values["runtimeClassName"] == pod["runtimeClassName"]


def test_proxy_is_off_by_default() -> None:
    for values in ({}, {"devicePlugin": {"enabled": True}}):
        ds = daemonset(render_chart(values))
        assert "device-plugin-proxy" not in container_names(ds)
        assert "upstream-device-plugins" not in volumes(ds)


# --- NVIDIA's side: the patch that moves its kubelet directory onto the proxy ---


def _patch() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((NVIDIA_DIR / "upstream-dir-patch.yaml").read_text())
    return data


def _kustomize_name_regex() -> re.Pattern[str]:
    kustomization = yaml.safe_load((NVIDIA_DIR / "kustomization.yaml").read_text())
    ((patch),) = kustomization["patches"]
    assert patch["path"] == "upstream-dir-patch.yaml"
    assert patch["target"]["kind"] == "DaemonSet" and patch["target"]["group"] == "apps"
    # kustomize anchors a target's name regex (^(?:...)$).
    return re.compile(f"^(?:{patch['target']['name']})$")


def test_patch_points_nvidias_plugin_volume_at_the_charts_upstream_dir() -> None:
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    (volume,) = _patch()["spec"]["template"]["spec"]["volumes"]
    assert volume == {
        "name": PLUGIN_VOLUME,
        "hostPath": {"path": chart_values["devicePluginProxy"]["upstreamDir"], "type": "DirectoryOrCreate"},
    }
    assert volume["hostPath"]["path"] == UPSTREAM_DIR


def test_patch_targets_only_the_plugins_daemonset() -> None:
    name = _kustomize_name_regex()
    for release in ("nvdp", "nvidia-device-plugin", "gpu"):
        fullname = release if "nvidia-device-plugin" in release else f"{release}-nvidia-device-plugin"
        assert name.match(fullname), fullname
        assert not name.match(f"{fullname}-mps-control-daemon")
        assert not name.match(f"{release}-gpu-feature-discovery")
    assert not name.match("nvidia-device-plugin-daemonset")  # the GPU Operator's own: not ours to patch


def test_docs_kubectl_patch_equals_the_shipped_patch() -> None:
    """docs/deployment.md gives the same patch as a `kubectl patch` one-liner for an installed release."""
    text = (ROOT / "docs/deployment.md").read_text()
    found = re.findall(r"kubectl -n \S+ patch daemonset \S+ --type strategic -p '([^']+)'", text)
    assert found, "docs/deployment.md: no `kubectl ... patch daemonset ... --type strategic -p '...'`"
    for body in found:
        assert yaml.safe_load(body) == {"spec": _patch()["spec"]}


def _nvidia_chart(tmp_path: Path) -> Path:
    """NVIDIA's standalone chart (k8s-device-plugin v0.20.0) from a local git mirror, if there is one."""
    if not (NVIDIA_GIT / "HEAD").exists():
        pytest.skip(f"no NVIDIA/k8s-device-plugin mirror at {NVIDIA_GIT} (set NVIDIA_DEVICE_PLUGIN_GIT)")
    git = ["git", f"--git-dir={NVIDIA_GIT}"]
    files = subprocess.run(
        [*git, "ls-tree", "-r", "--name-only", "HEAD", NVIDIA_CHART], capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        blob = subprocess.run([*git, "show", f"HEAD:{name}"], capture_output=True, check=True).stdout
        out = tmp_path / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(blob)
    return tmp_path / NVIDIA_CHART


def _render_nvidia(chart: Path, values: dict[str, Any]) -> str:
    from helm_python.chart import Chart

    with Chart.load(chart) as loaded:
        rendered = loaded.render(values, name="nvdp", namespace="nvidia-device-plugin")
    return "\n---\n".join(text for text in rendered.values() if text.strip())


def test_nvidias_chart_mounts_the_patched_volume_as_its_kubelet_dir(tmp_path: Path) -> None:
    """The facts the patch rests on, read from NVIDIA's chart itself: its plugin DaemonSet mounts
    volume kubelet-device-plugins-dir at /var/lib/kubelet/device-plugins, a hostPath no value
    changes; values-gpu-operator.yaml renders and takes the operator's labels and RuntimeClass."""
    chart = _nvidia_chart(tmp_path)
    values = yaml.safe_load((NVIDIA_DIR / "values-gpu-operator.yaml").read_text())
    docs = [d for d in yaml.safe_load_all(_render_nvidia(chart, values)) if d]
    daemonsets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "DaemonSet"}
    plugin = daemonsets["nvdp-nvidia-device-plugin"]
    spec = plugin["spec"]["template"]["spec"]
    (ctr,) = [c for c in spec["containers"] if c["name"] == "nvidia-device-plugin-ctr"]
    assert {"name": PLUGIN_VOLUME, "mountPath": "/var/lib/kubelet/device-plugins"} in ctr["volumeMounts"]
    assert {v["name"]: v for v in spec["volumes"]}[PLUGIN_VOLUME]["hostPath"]["path"] == KUBELET_DIR
    assert spec["nodeSelector"] == {"nvidia.com/gpu.deploy.device-plugin": "true"}
    assert "affinity" not in spec and spec["runtimeClassName"] == "nvidia"
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    assert env["PASS_DEVICE_SPECS"] == "true" and env["DEVICE_LIST_STRATEGY"] == "envvar"
    name = _kustomize_name_regex()
    assert [n for n in daemonsets if name.match(n)] == ["nvdp-nvidia-device-plugin"]


def test_kustomize_applies_the_patch_to_nvidias_rendered_chart(tmp_path: Path) -> None:
    """The shipped overlay, run by the real kustomize (kubectl kustomize) over NVIDIA's rendered chart."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl (kustomize) is not installed")
    chart = _nvidia_chart(tmp_path / "src")
    overlay = tmp_path / "overlay"
    shutil.copytree(NVIDIA_DIR, overlay)
    values = yaml.safe_load((NVIDIA_DIR / "values-gpu-operator.yaml").read_text())
    (overlay / "nvidia-device-plugin.yaml").write_text(_render_nvidia(chart, values))
    result = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    daemonsets = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] == "DaemonSet"}
    plugin = daemonsets.pop("nvdp-nvidia-device-plugin")
    vols = {v["name"]: v for v in plugin["volumes"]}
    assert vols[PLUGIN_VOLUME]["hostPath"] == {"path": UPSTREAM_DIR, "type": "DirectoryOrCreate"}
    (ctr,) = [c for c in plugin["containers"] if c["name"] == "nvidia-device-plugin-ctr"]
    assert {"name": PLUGIN_VOLUME, "mountPath": "/var/lib/kubelet/device-plugins"} in ctr["volumeMounts"]
    assert len(plugin["volumes"]) == len({v["name"] for v in plugin["volumes"]})  # merged, not appended
    for other in daemonsets.values():  # MPS control daemon (and GFD when on): untouched
        assert PLUGIN_VOLUME not in {v["name"] for v in other["volumes"]}


def test_rendered_proxy_command_runs_the_subcommand() -> None:
    """The chart's command and args against the real `device-plugin-proxy` subcommand (simulated
    GPUs, no kubelet, no exporter, no NVIDIA plugin): every flag parses, it serves the Registration API
    for NVIDIA's plugin at <upstreamDir>/kubelet.sock, /health and /metrics answer, /ready is 503."""
    proxy = container(daemonset(render_chart(PROXY)), "device-plugin-proxy")
    # A short directory: socket paths must fit a unix socket address (107 bytes).
    with tempfile.TemporaryDirectory(prefix="px") as tmp:
        root = Path(tmp)
        state, kubelet_dir, upstream = root / "state", root / "kubelet", root / "upstream"
        state.mkdir(mode=0o700)
        kubelet_dir.mkdir()
        upstream.mkdir()
        port = free_port()
        args = [
            a.replace("/var/lib/gpu-health-exporter", str(state))
            .replace(KUBELET_DIR, str(kubelet_dir))
            .replace(UPSTREAM_DIR, str(upstream))
            .replace("--address=:9403", f"--address=127.0.0.1:{port}")
            for a in proxy["args"]
        ]
        assert proxy["command"][0] == "python"
        cmd = [sys.executable, *proxy["command"][1:], *args, "--simulate"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if (upstream / "kubelet.sock").is_socket() and http_status(base + "/health") == 200:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, proc.communicate(timeout=10)[0]
            assert (upstream / "kubelet.sock").is_socket(), "no Registration API in the upstream directory"
            assert http_status(base + "/health") == 200
            assert http_status(base + "/ready") == 503  # no kubelet, no upstream plugin, no exporter
            with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
                body = r.read().decode()
            assert "\ngpuhealth_device_plugin_proxy_upstreams 0\n" in body
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out


def test_lint_proxy_mode_with_the_scheduler_features() -> None:
    from helm_python.chart import lint

    values = {
        **PROXY,
        "gpuOperator": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "scheduler": {"draDeviceTaints": {"effect": "NoSchedule", "admissionPolicy": {"enabled": False}}},
    }
    report = lint(CHART, values, strict=True)
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report
