"""The TLS side of the web configuration: an ssl.SSLContext per loaded configuration, and the client
certificate rules exporter-toolkit applies (client_auth_type, client_allowed_sans).

Python's ssl module verifies every client certificate it asks for; it cannot accept one unverified. So
RequestClientCert asks for a certificate only when a CA is configured (then one that does not verify
fails the handshake), and RequireAnyClientCert needs a CA (with one it verifies, stricter than Go). Both
are said once in the log and in docs/security.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.boundedread import read_regular_file
from exporter.web.config import CIPHER_SUITES, CURVES, MAX_FILE_BYTES, TlsServerConfig, WebConfigError

MAX_PEM_BYTES = MAX_FILE_BYTES

_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
REQUIRES_CERT = ("RequireAnyClientCert", "RequireClientCert", "RequireAndVerifyClientCert")


@dataclass(frozen=True)
class ClientCertRule:
    """What the HTTP layer checks on a connection's client certificate (after the handshake)."""

    required: bool  # a request without a verified certificate is refused
    allowed_sans: tuple[str, ...] | None  # None: any SAN

    def refusal(self, peercert: dict[str, Any] | None) -> str | None:
        """Why this connection's certificate does not pass, or None."""
        if not peercert:
            return "client certificate required" if self.required or self.allowed_sans is not None else None
        if self.allowed_sans is None:
            return None
        found = cert_sans(peercert)
        if any(_same_san(san, allowed) for san in found for allowed in self.allowed_sans):
            return None
        return f"client certificate SANs {list(found)} not in client_allowed_sans"


def cert_sans(peercert: dict[str, Any]) -> tuple[str, ...]:
    """DNS names, email addresses, IP addresses and URIs, as Go's VerifyPeerCertificate collects them."""
    kinds = {"DNS", "email", "IP Address", "URI"}
    return tuple(str(v) for k, v in peercert.get("subjectAltName", ()) if k in kinds)


def _same_san(found: str, allowed: str) -> bool:
    if found == allowed:
        return True
    try:  # Python writes IPv6 SANs uncompressed; Go compares its compressed form
        return ipaddress.ip_address(found.strip()) == ipaddress.ip_address(allowed)
    except ValueError:
        return False


@dataclass(frozen=True)
class TlsSetup:
    context: ssl.SSLContext
    rule: ClientCertRule
    notes: tuple[str, ...]  # deviations worth one log line (http2, curves, unverifiable client certs)


def build_tls(where: str, tls: TlsServerConfig, probes_without_cert: bool) -> TlsSetup:
    """The server context for `tls`; WebConfigError names the key or the file that failed.

    probes_without_cert: a certificate the configuration requires is enforced per request instead of in
    the handshake, so kubelet probes (which never present one) reach /health and /ready."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    k = f"{where}: tls_server_config."
    notes: list[str] = []
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.maximum_version = _VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    _load_cert_chain(ctx, k, tls)
    names = [n for n in (CIPHER_SUITES[c] for c in tls.cipher_suites) if n]
    if names:
        try:
            ctx.set_ciphers(":".join(names))
        except ssl.SSLError as exc:
            raise WebConfigError(f"{k}cipher_suites: none usable here: {exc}") from None
    if tls.curve_preferences:
        # Python's ssl can set one group; the first (most preferred) one is used.
        ctx.set_ecdh_curve(CURVES[tls.curve_preferences[0]])
        if len(tls.curve_preferences) > 1:
            notes.append(f"curve_preferences: only {tls.curve_preferences[0]} is offered (Python's ssl sets one)")
    has_ca = _load_client_cas(ctx, k, tls)
    auth = tls.client_auth_type or "NoClientCert"
    if auth in ("RequireAnyClientCert", "RequireClientCert") and not has_ca:
        raise WebConfigError(
            f"{k}client_auth_type: {auth} without client_ca_file cannot work here: Python's ssl verifies "
            "every client certificate; set client_ca_file (certificates are then verified against it)"
        )
    if auth in ("RequireAnyClientCert", "RequireClientCert"):
        notes.append(f"client_auth_type {auth}: client certificates are verified against client_ca_file")
    if auth == "RequestClientCert" and not has_ca:
        notes.append("client_auth_type RequestClientCert without a CA: no client certificate is asked for")
    required = auth in REQUIRES_CERT
    asks = auth in ("VerifyClientCertIfGiven", *REQUIRES_CERT) or (auth == "RequestClientCert" and has_ca)
    if not asks:
        ctx.verify_mode = ssl.CERT_NONE
    elif required and not probes_without_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    if asks and not has_ca:
        ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)  # Go verifies against the system roots then
    return TlsSetup(ctx, ClientCertRule(required, tls.client_allowed_sans), tuple(notes))


def _pem_text(k: str, name: str, inline: str, path: Path | None) -> str:
    """The PEM text of `name`: inline, or read from its file (bounded, regular files only: a FIFO there
    must not hang the server, which re-reads the configuration for new connections)."""
    if path is None:
        return inline
    try:
        return read_regular_file(path, MAX_PEM_BYTES).decode("utf-8")
    except OSError as exc:
        raise WebConfigError(f"{k}{name}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise WebConfigError(f"{k}{name}: {path} is not PEM text") from None


def _load_cert_chain(ctx: ssl.SSLContext, k: str, tls: TlsServerConfig) -> None:
    cert = _pem_text(k, "cert_file", tls.cert, tls.cert_file)
    key = _pem_text(k, "key_file", tls.key, tls.key_file)
    with _as_file(cert) as cert_path, _as_file(key) as key_path:
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            what = f"{tls.cert_file or 'cert'} / {tls.key_file or 'key'}"
            raise WebConfigError(f"{k}cert_file: failed to load the certificate and key ({what}): {exc}") from None


def _load_client_cas(ctx: ssl.SSLContext, k: str, tls: TlsServerConfig) -> bool:
    if tls.client_ca_file is None and not tls.client_ca:
        return False
    cas = _pem_text(k, "client_ca_file", tls.client_ca, tls.client_ca_file)
    try:
        ctx.load_verify_locations(cadata=cas)
    except (ssl.SSLError, OSError, ValueError) as exc:
        where = f"client_ca_file ({tls.client_ca_file})" if tls.client_ca_file else "client_ca"
        raise WebConfigError(f"{k}{where}: no usable CA certificate: {exc}") from None
    return True


@contextlib.contextmanager
def _as_file(pem: str) -> Iterator[str]:
    """load_cert_chain reads files only: the PEM goes through an anonymous memfd (never on disk)."""
    data = pem.encode()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("web-config-pem", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile() as f:  # 0600, removed on exit
        f.write(data)
        f.flush()
        yield f.name
