"""The web configuration loader: what exporter-toolkit accepts is accepted, what it refuses is refused
with the file and the key (or the path) named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exporter.web.config import WebConfigError, load_web_config
from exporter.web.source import WebConfigSource
from tests.web.conftest import Pki

HASH = "$2y$10$qRTBuFoULoYNA7AQ/F3ck.trZBPyjV64.oA4ZsSBCIWvXuvQlQTuu"


def write(tmp: Path, text: str) -> Path:
    path = tmp / "web.yml"
    path.write_text(text)
    return path


def test_an_empty_file_is_plain_http_without_auth(tmp_path: Path) -> None:
    cfg = load_web_config(write(tmp_path, ""))
    assert not cfg.tls.enabled and cfg.users == () and cfg.headers == ()


def test_everything_exporter_toolkit_accepts(pki: Pki) -> None:
    path = write(
        pki.dir,
        f"""
tls_server_config:
  cert_file: server.crt
  key_file: server.key
  client_auth_type: VerifyClientCertIfGiven
  client_ca_file: ca.crt
  client_allowed_sans: [scraper.example]
  min_version: TLS12
  max_version: TLS13
  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]
  curve_preferences: [X25519, CurveP256]
  prefer_server_cipher_suites: false
http_server_config:
  http2: false
  headers:
    X-Frame-Options: sameorigin
    X-XSS-Protection: 1
    Strict-Transport-Security: max-age=31536000; includeSubDomains
    Content-Security-Policy: "default-src 'self'"
basic_auth_users:
  alice: {HASH}
rate_limit:
  interval: 1m30s
  burst: 5
""",
    )
    cfg = load_web_config(path)
    assert cfg.tls.cert_file == pki.dir / "server.crt"  # relative to the file's directory
    assert cfg.tls.client_allowed_sans == ("scraper.example",)
    assert ("X-XSS-Protection", "1") in cfg.headers  # a YAML integer read as the string Go reads
    assert cfg.users == (("alice", HASH),)
    assert cfg.rate_limit.interval_s == 90.0 and cfg.rate_limit.burst == 5
    assert cfg.http2 is False
    source = WebConfigSource(path, False)  # builds the TLS context: certificates readable, CA loaded
    assert source.active.ssl_context is not None and source.active.auth.enabled
    source.close()


@pytest.mark.parametrize(
    "text, named",
    [
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  bogus: 1\n", "tls_server_config.bogus: unknown key"),
        ("web_server_config: {}\n", "web_server_config: unknown key"),
        ("http_server_config:\n  headers:\n    X-Powered-By: me\n", "http_server_config.headers.X-Powered-By"),
        ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", "X-Frame-Options: invalid value"),
        ("http_server_config:\n  http2: maybe\n", "http_server_config.http2: expected true or false"),
        ("basic_auth_users:\n  bob: plaintext\n", "basic_auth_users.bob: not a bcrypt hash"),
        ("basic_auth_users:\n  bob: $2y$99$" + "a" * 53 + "\n", "basic_auth_users.bob"),
        ("tls_server_config:\n  client_auth_type: NoClientCert\n", "missing one of cert or cert_file"),
        ("tls_server_config:\n  cert_file: a\n", "missing one of key or key_file"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Maybe\n", "invalid ClientAuth"),
        (
            "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_ca_file: c\n",
            "client CA's have been configured without a Client Auth Policy",
        ),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS14\n", "unknown TLS version"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: [RC4]\n", "unknown cipher"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  curve_preferences: [P999]\n", "unknown curve"),
        ("rate_limit:\n  interval: soon\n", "rate_limit.interval: invalid duration"),
        ("basic_auth_users:\n  bob: " + HASH + "\n  bob: " + HASH + "\n", "given twice"),
        ("tls_server_config: [1, 2]\n", "tls_server_config: expected a mapping"),
        ("{{{ not yaml", "not valid YAML"),
    ],
)
def test_what_exporter_toolkit_refuses_is_refused_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(WebConfigError) as err:
        WebConfigSource(path, False)
    assert str(path) in str(err.value) and named in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "tls, named",
    [
        ("  cert_file: missing.crt\n  key_file: server.key\n", "cert_file: cannot read"),
        ("  cert_file: server.crt\n  key_file: missing.key\n", "key_file: cannot read"),
        ("  cert_file: server.key\n  key_file: server.key\n", "failed to load the certificate and key"),
        (
            "  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAndVerifyClientCert\n"
            "  client_ca_file: nope.crt\n",
            "client_ca_file: cannot read",
        ),
        (
            "  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: RequireAnyClientCert\n",
            "RequireAnyClientCert without client_ca_file",
        ),
    ],
)
def test_unreadable_or_wrong_certificates_name_the_key_and_path(pki: Pki, tls: str, named: str) -> None:
    path = write(pki.dir, "tls_server_config:\n" + tls)
    with pytest.raises(WebConfigError) as err:
        WebConfigSource(path, False)
    assert named in str(err.value), str(err.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError, match=r"nowhere\.yml: cannot read"):
        load_web_config(tmp_path / "nowhere.yml")


def test_a_fifo_in_place_of_the_config_or_a_certificate_is_refused_not_waited_on(pki: Pki) -> None:
    """The file is re-read for new connections: a FIFO put there must not hang the server's loop."""
    fifo = pki.dir / "config.fifo"
    os.mkfifo(fifo)
    with pytest.raises(WebConfigError, match=r"config\.fifo: cannot read: not a regular file \(a FIFO\)"):
        load_web_config(fifo)
    os.mkfifo(pki.dir / "cert.fifo")
    path = write(pki.dir, "tls_server_config:\n  cert_file: cert.fifo\n  key_file: server.key\n")
    with pytest.raises(WebConfigError, match=r"cert_file: cannot read .*cert\.fifo: not a regular file \(a FIFO\)"):
        WebConfigSource(path, False)
