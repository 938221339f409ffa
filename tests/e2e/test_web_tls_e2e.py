"""The daemon on the fake NVML behind a web configuration: TLS 1.2 and 1.3, a client certificate
required (and missing, and from another CA), basic auth, probes open for the kubelet, certificate
rotation without a restart, and a real Prometheus scraping it over TLS with a client certificate and
basic auth. A bad web configuration stops the start with exit 2, naming the key or the path."""

from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import time
from pathlib import Path

import bcrypt
import trustme
from cryptography import x509

from tests.deploy.prom_helpers import running_prometheus
from tests.e2e.harness import run_exporter
from tests.e2e.nvmlnode import NvmlNode
from tests.fakenvmllib import FakeNvmlBuild

PASSWORD = "scrape-me"


def write_pki(tmp: Path) -> tuple[trustme.CA, trustme.LeafCert, trustme.LeafCert]:
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("prometheus.monitoring.svc")
    server.cert_chain_pems[0].write_to_path(str(tmp / "server.crt"))
    server.private_key_pem.write_to_path(str(tmp / "server.key"))
    ca.cert_pem.write_to_path(str(tmp / "ca.crt"))
    client.cert_chain_pems[0].write_to_path(str(tmp / "client.crt"))
    client.private_key_pem.write_to_path(str(tmp / "client.key"))
    return ca, server, client


def web_config(tmp: Path) -> Path:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    path = tmp / "web-config.yml"
    path.write_text(
        "tls_server_config:\n"
        "  cert_file: server.crt\n"
        "  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n"
        "  client_ca_file: ca.crt\n"
        "  client_allowed_sans: [prometheus.monitoring.svc]\n"
        "http_server_config:\n"
        "  headers:\n"
        "    X-Content-Type-Options: nosniff\n"
        f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    )
    return path


def context(ca: trustme.CA, cert: trustme.LeafCert | None, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def get(port: int, path: str, ctx: ssl.SSLContext, auth: str | None = PASSWORD) -> tuple[int, bytes, str]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    headers = {"Authorization": "Basic " + base64.b64encode(f"prometheus:{auth}".encode()).decode()} if auth else {}
    conn.request("GET", path, headers=headers)
    r = conn.getresponse()
    body = r.read()
    version = conn.sock.version() if isinstance(conn.sock, ssl.SSLSocket) else ""
    conn.close()
    return r.status, body, version or ""


def served_serial(port: int) -> int:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def wait_ready_over_tls(node: NvmlNode, ctx: ssl.SSLContext, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        assert node.exporter.proc.poll() is None, node.exporter.logs()
        try:
            status, body, _ = get(node.exporter.port, "/ready", ctx, auth=None)  # probes need no auth here
            if status == 200:
                return
            last = f"{status} {body!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise AssertionError(f"not ready over TLS after {timeout}s ({last}):\n{node.exporter.logs()}")


def test_tls_mtls_basic_auth_rotation_and_prometheus(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca, _, client = write_pki(pki)
    config = web_config(pki)
    node = NvmlNode(
        fakenvml_build,
        tmp_path,
        "h100x8",
        ["-c", "500", "--web-config-file", str(config), "--web-unauthenticated-probes"],
    )
    port = node.exporter.port
    try:
        probe = context(ca, None)  # the kubelet: no client certificate, no password
        wait_ready_over_tls(node, probe)
        assert get(port, "/health", probe, auth=None)[0] == 200

        for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
            status, body, negotiated = get(port, "/metrics", context(ca, client, version))
            assert (status, negotiated) == (200, name)
            assert b"DCGM_FI_DEV_GPU_TEMP{" in body

        assert get(port, "/metrics", context(ca, client), auth="wrong")[0] == 401
        assert get(port, "/metrics", context(ca, client), auth=None)[0] == 401
        assert get(port, "/metrics", probe)[0] == 403  # the right password, but no client certificate
        stranger = trustme.CA().issue_cert("prometheus.monitoring.svc")
        try:
            refused = get(port, "/metrics", context(ca, stranger))[0] != 200
        except (ssl.SSLError, OSError):
            refused = True
        assert refused, "a client certificate from another CA was accepted"

        scrape = {
            "job_name": "gpu-health-exporter",
            "scheme": "https",
            "honor_labels": True,
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            "tls_config": {
                "ca_file": str(pki / "ca.crt"),
                "cert_file": str(pki / "client.crt"),
                "key_file": str(pki / "client.key"),
                "server_name": "localhost",
            },
            "basic_auth": {"username": "prometheus", "password": PASSWORD},
        }
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [scrape],
        }
        with running_prometheus(config=prom_config, workdir=tmp_path / "prom") as prom:
            prom.wait_for_targets_up(timeout=60)
            temps = prom.wait_for('DCGM_FI_DEV_GPU_TEMP{job="gpu-health-exporter"}', timeout=30)
            assert len(temps) == 8

            # Rotation, as a Secret volume does it: new files swapped in; no restart, no dropped scrape.
            first = served_serial(port)
            new = ca.issue_cert("localhost", "127.0.0.1")
            new.cert_chain_pems[0].write_to_path(str(pki / "server.crt.new"))
            new.private_key_pem.write_to_path(str(pki / "server.key.new"))
            os.replace(pki / "server.key.new", pki / "server.key")
            os.replace(pki / "server.crt.new", pki / "server.crt")
            deadline = time.monotonic() + 15
            while served_serial(port) == first:
                assert time.monotonic() < deadline, "the rotated certificate was never served"
                time.sleep(0.1)
            rotated_at = time.time()
            up = 'up{job="gpu-health-exporter"}'
            prom.wait_for(f"timestamp({up}) > {rotated_at + 1} and {up} == 1", timeout=30)
            assert prom.query('min_over_time(up{job="gpu-health-exporter"}[30s])')[0]["value"][1] == "1"
        assert node.exporter.proc.poll() is None
        assert "Traceback" not in node.exporter.logs()
    finally:
        assert node.exporter.stop() == 0


def test_a_bad_web_config_exits_2_naming_the_key_or_path(tmp_path: Path) -> None:
    cases = {
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth: x\n": (
            "tls_server_config.client_auth: unknown key"
        ),
        "basic_auth_users:\n  alice: not-a-hash\n": "basic_auth_users.alice: not a bcrypt hash",
        "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n": "missing.crt",
    }
    for text, named in cases.items():
        path = tmp_path / "web.yml"
        path.write_text(text)
        r = run_exporter(["--simulate", "--state-dir", str(tmp_path / "state"), "--web-config-file", str(path)])
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert named in r.stderr and "Traceback" not in r.stderr, r.stderr
