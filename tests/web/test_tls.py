"""TLS and mTLS from a web configuration file, with real certificates: versions, CAs, client
certificates, SANs, probes without a certificate, rotation without a restart."""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from exporter.server import HttpServer
from tests.web.conftest import BODY, Pki, https_get, start


def config(pki: Pki, text: str) -> Path:
    path = pki.dir / "web.yml"
    path.write_text(text)
    return path


TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
MTLS = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"


def handshake_refused(srv: HttpServer, ctx: ssl.SSLContext, path: str = "/metrics") -> bool:
    """True when the server refuses the connection (in the handshake, or at the first read with TLS 1.3,
    where the client's certificate is checked after the client considers the handshake done)."""
    try:
        r = https_get(srv, path, ctx)
        r.read()
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    return False


def test_tls_1_2_and_1_3_serve_the_exposition(pki: Pki, serve: list[HttpServer]) -> None:
    srv = start(config(pki, TLS))
    serve.append(srv)
    for version, name in ((ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")):
        ctx = pki.client_context(minimum_version=version, maximum_version=version)
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=5)
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == BODY
        assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.version() == name
    # Plain HTTP on the TLS port gets nothing served.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            data = s.recv(65536)
        except ConnectionError:
            data = b""
        assert BODY not in data


def test_min_version_tls13_refuses_tls_1_2(pki: Pki, serve: list[HttpServer]) -> None:
    srv = start(config(pki, TLS + "  min_version: TLS13\n"))
    serve.append(srv)
    old = pki.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    assert handshake_refused(srv, old)
    assert https_get(srv, "/metrics", pki.client_context()).status == 200


def test_a_client_that_does_not_trust_our_ca_refuses_us(pki: Pki, serve: list[HttpServer]) -> None:
    srv = start(config(pki, TLS))
    serve.append(srv)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    pki.other_ca.configure_trust(ctx)
    with pytest.raises(ssl.SSLCertVerificationError):
        https_get(srv, "/metrics", ctx)


def test_mtls_requires_a_certificate_from_the_client_ca(pki: Pki, serve: list[HttpServer]) -> None:
    srv = start(config(pki, MTLS))
    serve.append(srv)
    assert handshake_refused(srv, pki.client_context())  # no certificate
    assert handshake_refused(srv, pki.client_context(pki.stranger))  # from another CA
    r = https_get(srv, "/metrics", pki.client_context(pki.client))
    assert r.status == 200 and r.read() == BODY


def test_client_allowed_sans_are_exact_matches(pki: Pki, serve: list[HttpServer]) -> None:
    allowed = start(config(pki, MTLS + '  client_allowed_sans: ["prom@example.org"]\n'))
    serve.append(allowed)
    assert https_get(allowed, "/metrics", pki.client_context(pki.client)).status == 200
    (pki.dir / "web2.yml").write_text(MTLS + '  client_allowed_sans: ["scraper", "example"]\n')
    refused = start(pki.dir / "web2.yml")
    serve.append(refused)
    assert handshake_refused(refused, pki.client_context(pki.client))


def test_probes_without_a_certificate_only_when_configured(pki: Pki, serve: list[HttpServer]) -> None:
    srv = start(config(pki, MTLS), probes=True)
    serve.append(srv)
    bare = pki.client_context()
    assert https_get(srv, "/health", bare).status == 200  # a kubelet probe presents no certificate
    assert https_get(srv, "/ready", bare).status == 200
    r = https_get(srv, "/metrics", bare)
    assert r.status == 403 and BODY not in r.read()
    assert https_get(srv, "/metrics", pki.client_context(pki.client)).status == 200


def test_inline_cert_and_key(pki: Pki, serve: list[HttpServer]) -> None:
    cert = pki.server.cert_chain_pems[0].bytes().decode()
    key = pki.server.private_key_pem.bytes().decode()

    def indent(text: str) -> str:
        return "\n".join("    " + line for line in text.splitlines())

    srv = start(config(pki, f"tls_server_config:\n  cert: |\n{indent(cert)}\n  key: |\n{indent(key)}\n"))
    serve.append(srv)
    assert https_get(srv, "/metrics", pki.client_context()).status == 200


def served_serial(srv: HttpServer, pki: Pki) -> int:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_certificates_rotate_without_a_restart_and_a_bad_file_keeps_the_last_good(
    pki: Pki, serve: list[HttpServer]
) -> None:
    srv = start(config(pki, TLS))
    serve.append(srv)
    first = served_serial(srv, pki)
    new = pki.ca.issue_cert("localhost", "127.0.0.1")
    # As a Secret volume does: the new files appear under new names, then replace the old ones at once.
    pki.write("server.crt.new", new.cert_chain_pems[0])
    pki.write("server.key.new", new.private_key_pem)
    os.replace(pki.dir / "server.key.new", pki.dir / "server.key")
    os.replace(pki.dir / "server.crt.new", pki.dir / "server.crt")
    deadline = time.monotonic() + 10
    while served_serial(srv, pki) == first:
        assert time.monotonic() < deadline, "the new certificate was never served"
        time.sleep(0.05)
    rotated = served_serial(srv, pki)
    from cryptography import x509

    assert rotated == x509.load_pem_x509_certificate(new.cert_chain_pems[0].bytes()).serial_number
    with capture_logs() as logs:
        (pki.dir / "server.crt").write_text("not a certificate")
        for _ in range(3):  # new connections keep the last good certificate
            assert served_serial(srv, pki) == rotated
    failed = [e for e in logs if e["event"] == "web_config_reload_failed"]
    assert len(failed) == 1 and "cert" in failed[0]["error"], logs
