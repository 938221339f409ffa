"""The chart's web configuration (webConfig), its ServiceMonitor and its NetworkPolicy.

The rendered exporter command and web configuration file run against the real daemon (simulated
GPUs) with real certificates: the kubelet's probe (HTTPS, no certificate verified, none presented, no
password) reaches /health and /ready, /metrics needs Prometheus's client certificate and password."""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import trustme
import yaml
from helm_python.errors import HelmRenderError

from tests.deploy.deploy_common import ROOT, by_kind, full_values, render_chart
from tests.deploy.k8s_objects import container, container_names, daemonset, pod_spec, validate

PASSWORD = "scrape-me"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
TLS_DIR = "/etc/gpu-health-exporter/tls"
WEB_DIR = "/etc/gpu-health-exporter/web"
MONITOR_AUTH: dict[str, Any] = {
    "basicAuth": {"username": {"name": "scrape", "key": "user"}, "password": {"name": "scrape", "key": "pass"}},
    "tlsConfig": {
        "cert": {"secret": {"name": "client", "key": "tls.crt"}},
        "keySecret": {"name": "client", "key": "tls.key"},
    },
}


def mtls_values(**web: Any) -> dict[str, Any]:
    config = {
        "enabled": True,
        "tls": {
            "secretName": "ghe-tls",
            "clientAuthType": "RequireAndVerifyClientCert",
            "clientAllowedSans": ["prometheus.monitoring.svc"],
        },
        "basicAuthUsers": {"prometheus": HASH},
        "headers": {"X-Content-Type-Options": "nosniff"},
        **web,
    }
    return {"webConfig": config, "podMapping": {"enabled": False}, "serviceMonitor": {"enabled": True, **MONITOR_AUTH}}


def web_config_file(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (doc,) = [
        d for d in by_kind(rendered, "Secret") + by_kind(rendered, "ConfigMap") if "web-config" in d["metadata"]["name"]
    ]
    text = (doc.get("stringData") or doc["data"])["web-config.yml"]
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def test_mtls_and_basic_auth_reach_every_serving_container() -> None:
    for extra, name in (
        ({"devicePlugin": {"enabled": True}}, "device-plugin"),
        ({"devicePluginProxy": {"enabled": True}}, "device-plugin-proxy"),
    ):
        rendered = render_chart({**mtls_values(), **extra, "podMapping": {"enabled": True}})
        for doc in [d for docs in rendered.values() for d in docs]:
            validate(doc)
        ds = daemonset(rendered)
        assert container_names(ds) == ["exporter", name]
        for c in (container(ds), container(ds, name)):
            assert f"--web-config-file={WEB_DIR}/web-config.yml" in c["args"]
            assert "--web-unauthenticated-probes" in c["args"]
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            # Whole directories, read-only, no subPath: a renewed Secret reaches the running pod.
            assert mounts["web-config"] == {"name": "web-config", "mountPath": WEB_DIR, "readOnly": True}
            assert mounts["web-tls"] == {"name": "web-tls", "mountPath": TLS_DIR, "readOnly": True}
            assert not [m for m in c["volumeMounts"] if "subPath" in m]
            for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
                assert c[probe]["httpGet"]["scheme"] == "HTTPS" and c[probe]["httpGet"]["path"] == path
                assert "httpHeaders" not in c[probe]["httpGet"]  # no password in the pod spec
        volumes = {v["name"]: v for v in pod_spec(ds)["volumes"]}
        # Hashes make the web configuration a Secret, not a ConfigMap.
        assert volumes["web-config"]["secret"]["secretName"] == "gpu-health-exporter-web-config"
        assert volumes["web-tls"]["secret"]["secretName"] == "ghe-tls"
        assert not by_kind(rendered, "ConfigMap")
    assert web_config_file(rendered) == {
        "tls_server_config": {
            "cert_file": f"{TLS_DIR}/tls.crt",
            "key_file": f"{TLS_DIR}/tls.key",
            "min_version": "TLS12",
            "client_auth_type": "RequireAndVerifyClientCert",
            "client_ca_file": f"{TLS_DIR}/ca.crt",
            "client_allowed_sans": ["prometheus.monitoring.svc"],
        },
        "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}},
        "basic_auth_users": {"prometheus": HASH},
    }


def test_tls_only_is_a_configmap_and_probes_need_no_flag() -> None:
    rendered = render_chart({"webConfig": {"enabled": True, "tls": {"secretName": "ghe-tls"}}})
    assert web_config_file(rendered) == {
        "tls_server_config": {
            "cert_file": f"{TLS_DIR}/tls.crt",
            "key_file": f"{TLS_DIR}/tls.key",
            "min_version": "TLS12",
        }
    }
    assert not by_kind(rendered, "Secret")
    c = container(daemonset(rendered))
    assert "--web-unauthenticated-probes" not in c["args"]
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_probes_without_the_flag_become_tcp_checks() -> None:
    """unauthenticatedProbes: false keeps /health and /ready behind the same rules as /metrics; the kubelet
    cannot pass them, so the chart falls back to a TCP connect rather than restart-looping the pod."""
    rendered = render_chart(mtls_values(unauthenticatedProbes=False))
    c = container(daemonset(rendered))
    assert "--web-unauthenticated-probes" not in c["args"]
    assert c["livenessProbe"]["tcpSocket"] == {"port": "metrics"} and "httpGet" not in c["livenessProbe"]
    assert c["readinessProbe"]["tcpSocket"] == {"port": "metrics"}
    assert c["livenessProbe"]["periodSeconds"] == 10


def test_existing_secret_and_cert_manager() -> None:
    rendered = render_chart(
        {
            "webConfig": {
                "enabled": True,
                "existingSecret": "my-web-config",
                "existingSecretKey": "config.yml",
                "tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca-issuer", "kind": "ClusterIssuer"}}},
            },
            "serviceMonitor": {"enabled": True, **MONITOR_AUTH},
        }
    )
    assert not [
        d for d in by_kind(rendered, "Secret") + by_kind(rendered, "ConfigMap") if "web-config" in d["metadata"]["name"]
    ]
    (cert,) = by_kind(rendered, "Certificate")
    validate(cert)
    assert cert["spec"]["secretName"] == "gpu-health-exporter-tls"
    assert cert["spec"]["dnsNames"][0] == "gpu-health-exporter.gpu-health-exporter.svc"
    assert cert["spec"]["issuerRef"] == {"name": "ca-issuer", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    ds = daemonset(rendered)
    c = container(ds)
    assert f"--web-config-file={WEB_DIR}/config.yml" in c["args"]
    # The chart cannot read the user's file: it may hold users, so the probes are opened.
    assert "--web-unauthenticated-probes" in c["args"]
    volumes = {v["name"]: v for v in pod_spec(ds)["volumes"]}
    assert volumes["web-config"]["secret"]["secretName"] == "my-web-config"
    assert volumes["web-tls"]["secret"]["secretName"] == "gpu-health-exporter-tls"
    (monitor,) = by_kind(rendered, "ServiceMonitor")
    (ep,) = monitor["spec"]["endpoints"]
    assert ep["scheme"] == "https"
    assert ep["tlsConfig"] == {
        "ca": {"secret": {"name": "gpu-health-exporter-tls", "key": "ca.crt"}},
        "serverName": "gpu-health-exporter.gpu-health-exporter.svc",
        **MONITOR_AUTH["tlsConfig"],
    }
    assert ep["basicAuth"] == MONITOR_AUTH["basicAuth"]


def test_service_monitor_endpoints_all_use_the_web_config() -> None:
    rendered = render_chart({**mtls_values(), "devicePlugin": {"enabled": True}})
    (monitor,) = by_kind(rendered, "ServiceMonitor")
    validate(monitor)
    assert [ep["port"] for ep in monitor["spec"]["endpoints"]] == ["metrics", "plugin-metrics"]
    for ep in monitor["spec"]["endpoints"]:
        assert ep["scheme"] == "https" and ep["basicAuth"] == MONITOR_AUTH["basicAuth"]
        assert ep["tlsConfig"]["ca"] == {"secret": {"name": "ghe-tls", "key": "ca.crt"}}
    plain = by_kind(render_chart({"serviceMonitor": {"enabled": True}}), "ServiceMonitor")[0]["spec"]["endpoints"][0]
    assert "scheme" not in plain and "tlsConfig" not in plain and "basicAuth" not in plain


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"webConfig": {"enabled": True, "basicAuthUsers": {"prometheus": "hunter2"}, "tls": {"secretName": "t"}}},
         r"webConfig\.basicAuthUsers\.prometheus is not a bcrypt hash .*plaintext passwords are never accepted"),
        ({"webConfig": {"enabled": True}}, r"webConfig\.tls\.enabled needs webConfig\.tls\.secretName"),
        ({"webConfig": {"enabled": True, "tls": {"secretName": "t", "clientAuthType": "Always"}}},
         r"webConfig\.tls\.clientAuthType \"Always\" is not one of"),
        ({"webConfig": {"enabled": True, "tls": {"secretName": "t", "minVersion": "TLS14"}}},
         r"webConfig\.tls\.minVersion \"TLS14\" is not one of"),
        ({"webConfig": {"enabled": True, "tls": {"enabled": False, "clientAuthType": "RequireAndVerifyClientCert"}}},
         r"clientAuthType RequireAndVerifyClientCert needs webConfig\.tls\.enabled"),
        ({"webConfig": {"enabled": True, "tls": {"certManager": {"enabled": True}}}},
         r"needs webConfig\.tls\.certManager\.issuerRef\.name"),
        ({**mtls_values(), "serviceMonitor": {"enabled": True}},
         r"webConfig\.basicAuthUsers needs serviceMonitor\.basicAuth"),
        ({**mtls_values(), "serviceMonitor": {"enabled": True, "basicAuth": MONITOR_AUTH["basicAuth"]}},
         r"RequireAndVerifyClientCert needs serviceMonitor\.tlsConfig\.cert"),
    ],
)  # fmt: skip
def test_bad_web_values_fail_the_render_naming_the_value(values: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmRenderError, match=message):
        render_chart(values)


# --- The rendered command against the real daemon ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(port: int, path: str, ctx: ssl.SSLContext, password: str | None = None) -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        headers = {}
        if password is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def kubelet_probe_context() -> ssl.SSLContext:
    """What the kubelet's HTTPS prober uses: no verification of the server, no client certificate
    (kubernetes pkg/probe/http: tls.Config{InsecureSkipVerify: true})."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _start_rendered(
    values: dict[str, Any], tmp: Path
) -> tuple[subprocess.Popen[str], int, trustme.CA, trustme.LeafCert]:
    """Write the rendered web configuration and a TLS Secret's three files under tmp (the paths the
    chart mounts, re-rooted), then run the rendered exporter args on simulated GPUs."""
    rendered = render_chart(values)
    exporter = container(daemonset(rendered))
    ca = trustme.CA()
    tls, web, state = tmp / "tls", tmp / "web", tmp / "state"
    for d in (tls, web, state):
        d.mkdir()
    server = ca.issue_cert("gpu-health-exporter.gpu-health-exporter.svc", "127.0.0.1")
    server.cert_chain_pems[0].write_to_path(str(tls / "tls.crt"))
    server.private_key_pem.write_to_path(str(tls / "tls.key"))
    ca.cert_pem.write_to_path(str(tls / "ca.crt"))
    text = yaml.safe_dump(web_config_file(rendered)).replace(TLS_DIR, str(tls))
    (web / "web-config.yml").write_text(text)
    port = _free_port()
    args = [
        a.replace(f"--address=:{values.get('port', 9400)}", f"--address=127.0.0.1:{port}")
        .replace(WEB_DIR, str(web))
        .replace("/var/lib/gpu-health-exporter", str(state))
        for a in exporter["args"]
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", *args, "--simulate", "--collect-interval=500"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "NODE_NAME": "test-node"},
    )  # fmt: skip
    client = ca.issue_cert("prometheus.monitoring.svc")
    return proc, port, ca, client


def _wait_for_status(proc: subprocess.Popen[str], check: Any, want: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate(timeout=10)[0]
        with contextlib.suppress(OSError):
            last = check()
            if last == want:
                return
        time.sleep(0.1)
    raise AssertionError(f"wanted {want}, last {last!r}")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    return out


def test_rendered_mtls_config_lets_kubelet_probes_in_and_keeps_metrics_closed(tmp_path: Path) -> None:
    """RequireAndVerifyClientCert + client_allowed_sans + basic auth + --web-unauthenticated-probes:
    the handshake asks for a certificate but does not require one (exporter/web/tls.py build_tls:
    CERT_OPTIONAL when probes are open), the probe paths need none, every other path needs both."""
    proc, port, ca, client = _start_rendered(mtls_values(), tmp_path)
    try:
        probe = kubelet_probe_context()
        _wait_for_status(proc, lambda: _get(port, "/ready", probe), 200)
        assert _get(port, "/health", probe) == 200
        assert _get(port, "/metrics", probe) == 403  # no client certificate
        assert _get(port, "/gpus", probe, PASSWORD) == 403
        prometheus = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca.configure_trust(prometheus)
        client.configure_cert(prometheus)
        prometheus.check_hostname = False  # the ServiceMonitor's serverName is checked by Prometheus, not here
        assert _get(port, "/metrics", prometheus) == 401  # certificate, no password
        assert _get(port, "/metrics", prometheus, "wrong") == 401
        assert _get(port, "/metrics", prometheus, PASSWORD) == 200
        # A certificate from the right CA with another SAN is refused even with the password.
        stranger = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca.configure_trust(stranger)
        ca.issue_cert("someone.else.svc").configure_cert(stranger)
        stranger.check_hostname = False
        # With the probes open the connection is kept (exporter/server.py) and every other path refuses.
        assert _get(port, "/metrics", stranger, PASSWORD) == 403
        assert _get(port, "/health", stranger) == 200
    finally:
        out = _stop(proc)
    assert "Traceback" not in out


def test_rendered_tcp_probe_config_keeps_probe_paths_closed(tmp_path: Path) -> None:
    """unauthenticatedProbes: false: the same rules on /health as on /metrics (so the chart's probes are
    tcpSocket): a client without a certificate does not get through the handshake at all."""
    proc, port, _ca, _client = _start_rendered(mtls_values(unauthenticatedProbes=False), tmp_path)
    try:
        probe = kubelet_probe_context()
        deadline = time.monotonic() + 30
        refused = False
        while time.monotonic() < deadline and not refused:
            assert proc.poll() is None, proc.communicate(timeout=10)[0]
            try:
                _get(port, "/health", probe)
            except ConnectionRefusedError:
                time.sleep(0.1)  # not listening yet
            except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
                refused = True  # the server requires a certificate in the handshake
        assert refused
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # what the tcpSocket probe checks: the port accepts connections
    finally:
        _stop(proc)


# --- NetworkPolicy ---


def _policy(values: dict[str, Any]) -> dict[str, Any]:
    (policy,) = by_kind(render_chart(values), "NetworkPolicy")
    validate(policy)
    return policy


def test_network_policy_admits_only_prometheus_to_the_serving_ports() -> None:
    policy = _policy({})
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "gpu-health-exporter",
        "app.kubernetes.io/instance": "gpu-health-exporter",
    }
    # Egress is not restricted by default: the API features reach the API server.
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    plugin = _policy({"devicePlugin": {"enabled": True}})["spec"]["ingress"][0]["ports"]
    assert plugin == [{"port": "metrics", "protocol": "TCP"}, {"port": "plugin-metrics", "protocol": "TCP"}]
    # In-process the plugin serves on the exporter's port: no second port.
    inproc = _policy({"devicePlugin": {"enabled": True, "inProcess": True}})["spec"]["ingress"][0]["ports"]
    assert inproc == [{"port": "metrics", "protocol": "TCP"}]
    proxy = _policy({"devicePluginProxy": {"enabled": True}})["spec"]["ingress"][0]["ports"]
    assert proxy == [{"port": "metrics", "protocol": "TCP"}, {"port": "proxy-metrics", "protocol": "TCP"}]
    # Every named port exists on the pod (a policy naming a missing port admits nothing there).
    for values in ({}, {"devicePlugin": {"enabled": True}}, {"devicePluginProxy": {"enabled": True}}):
        ds = daemonset(render_chart(values))
        names = {p["name"] for c in pod_spec(ds)["containers"] for p in c.get("ports", [])}
        assert {p["port"] for p in _policy(values)["spec"]["ingress"][0]["ports"]} == names


def test_network_policy_peers_egress_and_off() -> None:
    extra = {"ipBlock": {"cidr": "10.0.0.0/8"}}
    egress = [{"to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]
    spec = _policy(
        {
            "networkPolicy": {
                "prometheusNamespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
                "prometheusPodSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                "extraIngressFrom": [extra],
                "egress": egress,
            }
        }
    )["spec"]
    assert spec["ingress"][0]["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        },
        extra,
    ]
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["egress"] == egress
    assert not by_kind(render_chart({"networkPolicy": {"enabled": False}}), "NetworkPolicy")
    # The full profile narrows to Prometheus's pods.
    full = _policy(full_values())["spec"]["ingress"][0]["from"][0]
    assert full["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
