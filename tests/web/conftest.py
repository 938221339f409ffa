"""Real certificates (trustme) and a server started on a web configuration file."""

from __future__ import annotations

import gzip
import http.client
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from exporter.render import Exposition
from exporter.server import HttpServer, Routes
from exporter.web.settings import HttpSettings
from exporter.web.source import WebConfigSource

BODY = b'# TYPE x gauge\nx{a="1"} 1\n'


@dataclass
class Pki:
    dir: Path
    ca: trustme.CA
    server: trustme.LeafCert
    client: trustme.LeafCert  # SAN: DNS scraper.example, email prom@example.org
    other_ca: trustme.CA  # trusted by nobody here
    stranger: trustme.LeafCert  # a client certificate from other_ca

    def write(self, name: str, blob: trustme.Blob) -> Path:
        path = self.dir / name
        blob.write_to_path(str(path))
        return path

    def client_context(self, cert: trustme.LeafCert | None = None, **versions: ssl.TLSVersion) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        if cert is not None:
            cert.configure_cert(ctx)
        for attr, value in versions.items():
            setattr(ctx, attr, value)
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    p = Pki(
        tmp_path,
        ca,
        ca.issue_cert("localhost", "127.0.0.1"),
        ca.issue_cert("scraper.example", "prom@example.org"),
        other,
        other.issue_cert("scraper.example"),
    )
    p.write("server.crt", p.server.cert_chain_pems[0])
    p.write("server.key", p.server.private_key_pem)
    p.write("ca.crt", ca.cert_pem)
    return p


def start(config: Path, probes: bool = False, body: bytes = BODY) -> HttpServer:
    expo = Exposition(body, gzip.compress(body), 1.0)
    settings = HttpSettings(unauthenticated_probes=probes, web=WebConfigSource(config, probes))
    srv = HttpServer(
        "127.0.0.1",
        0,
        Routes(lambda: expo, lambda: (True, "ok"), lambda: (True, "ok")),
        settings=settings,
    )
    srv.start()
    return srv


@pytest.fixture
def serve() -> Iterator[list[HttpServer]]:
    """Servers started in a test, stopped after it."""
    started: list[HttpServer] = []
    yield started
    for srv in started:
        srv.stop()


def https_get(
    srv: HttpServer, path: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None
) -> http.client.HTTPResponse:
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=ctx, timeout=5)
    conn.request("GET", path, headers=headers or {})
    return conn.getresponse()
