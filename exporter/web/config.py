"""exporter-toolkit's web configuration file: the model and its strict loader.

Same keys and semantics as prometheus/exporter-toolkit (web/tls_config.go, web/handler.go): unknown keys and
duplicate keys are errors (yaml.UnmarshalStrict), min_version/max_version default to TLS12/TLS13,
prefer_server_cipher_suites and http2 default to true, relative paths resolve against the file's directory,
only the five security headers may be set, every basic_auth_users value must be a bcrypt hash. Each error
names the file and the key (or the path that could not be read).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.boundedread import read_regular_file
from exporter.flags import ConfigError


class WebConfigError(ConfigError):
    """A web configuration file that exporter-toolkit would refuse, or a file it names that cannot be read."""


# The web config and each certificate, key or CA file it names: a few KiB each; what a hostile one may cost.
MAX_FILE_BYTES = 1 << 20
TLS_VERSIONS = ("TLS10", "TLS11", "TLS12", "TLS13")
CLIENT_AUTH_TYPES = (
    "NoClientCert",
    "RequestClientCert",
    "RequireAnyClientCert",
    "RequireClientCert",  # exporter-toolkit's older name for RequireAnyClientCert
    "VerifyClientCertIfGiven",
    "RequireAndVerifyClientCert",
)
# Go's crypto/tls names (tls.CipherSuites()) -> OpenSSL's. TLS 1.3 suites are accepted and, as in Go, not
# configurable: they are always on.
CIPHER_SUITES: Mapping[str, str | None] = {
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
}
# exporter-toolkit's curve names -> OpenSSL's.
CURVES: Mapping[str, str] = {
    "CurveP256": "prime256v1",
    "CurveP384": "secp384r1",
    "CurveP521": "secp521r1",
    "X25519": "X25519",
}
# The only headers http_server_config.headers may set; a tuple lists the values allowed (exporter-toolkit's rule).
ALLOWED_HEADERS: Mapping[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}
# Go's bcrypt accepts $2$, $2a$, $2b$, $2y$ (any minor letter); cost 4..31; 22 salt + 31 hash characters.
_BCRYPT = re.compile(r"\$2[a-z]?\$(\d\d)\$[./A-Za-z0-9]{53}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class TlsServerConfig:
    cert_file: Path | None = None
    key_file: Path | None = None
    cert: str = ""
    key: str = ""
    client_auth_type: str = ""  # as written; "" and NoClientCert ask for no certificate
    client_ca_file: Path | None = None
    client_ca: str = ""
    client_allowed_sans: tuple[str, ...] | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: tuple[str, ...] = ()
    curve_preferences: tuple[str, ...] = ()
    prefer_server_cipher_suites: bool = True

    @property
    def enabled(self) -> bool:
        """exporter-toolkit's IsEnabled: any of these set turns TLS on (and then cert and key are required)."""
        return (
            bool(self.cert_file or self.cert or self.key_file or self.key or self.client_ca_file or self.client_ca)
            or self.client_auth_type != ""
        )

    def files(self) -> tuple[Path, ...]:
        """The files this configuration reads, whose changes a reload must notice."""
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p is not None)


@dataclass(frozen=True)
class RateLimit:
    interval_s: float = 0.0  # 0: off
    burst: int = 0


@dataclass(frozen=True)
class WebConfig:
    path: Path
    tls: TlsServerConfig = field(default_factory=TlsServerConfig)
    headers: tuple[tuple[str, str], ...] = ()
    http2: bool | None = None  # as written (exporter-toolkit's default: true); this server speaks HTTP/1.1 only
    users: tuple[tuple[str, str], ...] = ()  # user -> bcrypt hash
    rate_limit: RateLimit = field(default_factory=RateLimit)


def load_web_config(path: Path) -> WebConfig:
    """Read and check `path`; WebConfigError names the file and the key. Certificates are checked by
    exporter.web.tls when the context is built."""
    try:
        # Bounded and regular files only: it is re-read for new connections, and a FIFO put there
        # must not hang the server.
        text = read_regular_file(path, MAX_FILE_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WebConfigError(f"--web-config-file {path}: cannot read: {exc}") from None
    doc = _parse_yaml(path, text)
    if doc is None:
        return WebConfig(path)
    at = _At(path)
    top = at.mapping(doc, "", ("tls_server_config", "http_server_config", "basic_auth_users", "rate_limit"))
    tls = _tls(at, path.parent, top.get("tls_server_config"))
    headers, http2 = _http(at, top.get("http_server_config"))
    users = _users(at, top.get("basic_auth_users"))
    rate = _rate_limit(at, top.get("rate_limit"))
    config = WebConfig(path, tls, headers, http2, users, rate)
    if tls.enabled:
        _check_tls(at, tls)
    return config


# --- YAML ------------------------------------------------------------------------------------------------


def _parse_yaml(path: Path, text: str) -> Any:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses a key given twice (Go's yaml.UnmarshalStrict does)."""

    def mapping(loader: StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=StrictLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise WebConfigError(f"--web-config-file {path}: not valid YAML: {exc}") from None


class _At:
    """Type checks that name the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, why: str) -> WebConfigError:
        return WebConfigError(f"--web-config-file {self.path}: {key}: {why}")

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...] | None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key or "(top level)", f"expected a mapping, got {type(value).__name__}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(key or "(top level)", f"key {k!r} is not a string")
            if allowed is not None and k not in allowed:
                where = f"{key}.{k}" if key else k
                raise self.fail(where, f"unknown key (known: {', '.join(allowed)})")
        return value

    def string(self, value: Any, key: str) -> str:
        # Go's yaml.v2 decodes any scalar into a string field (`X-XSS-Protection: 1` is "1").
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise self.fail(key, f"expected a string, got {type(value).__name__}")

    def boolean(self, value: Any, key: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def strings(self, value: Any, key: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list, got {type(value).__name__}")
        return tuple(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))


# --- sections --------------------------------------------------------------------------------------------

_TLS_KEYS = (
    "cert",
    "key",
    "client_ca",
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "cipher_suites",
    "curve_preferences",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
    "client_allowed_sans",
)


def _tls(at: _At, base: Path, value: Any) -> TlsServerConfig:
    s = at.mapping(value, "tls_server_config", _TLS_KEYS)
    k = "tls_server_config."

    def path_of(name: str) -> Path | None:
        raw = at.string(s.get(name), k + name)
        return (base / raw) if raw else None  # base / an absolute path is that path

    auth = at.string(s.get("client_auth_type"), k + "client_auth_type")
    if auth and auth not in CLIENT_AUTH_TYPES:
        raise at.fail(k + "client_auth_type", f"invalid ClientAuth {auth!r} (one of {', '.join(CLIENT_AUTH_TYPES)})")
    versions = {}
    for name, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        v = at.string(s.get(name), k + name) or default
        if v not in TLS_VERSIONS:
            raise at.fail(k + name, f"unknown TLS version {v!r} (one of {', '.join(TLS_VERSIONS)})")
        versions[name] = v
    ciphers = at.strings(s.get("cipher_suites"), k + "cipher_suites") or ()
    for c in ciphers:
        if c not in CIPHER_SUITES:
            raise at.fail(k + "cipher_suites", f"unknown cipher {c!r}")
    curves = at.strings(s.get("curve_preferences"), k + "curve_preferences") or ()
    for c in curves:
        if c not in CURVES:
            raise at.fail(k + "curve_preferences", f"unknown curve {c!r} (one of {', '.join(CURVES)})")
    return TlsServerConfig(
        cert_file=path_of("cert_file"),
        key_file=path_of("key_file"),
        cert=at.string(s.get("cert"), k + "cert"),
        key=at.string(s.get("key"), k + "key"),
        client_auth_type=auth,
        client_ca_file=path_of("client_ca_file"),
        client_ca=at.string(s.get("client_ca"), k + "client_ca"),
        client_allowed_sans=at.strings(s.get("client_allowed_sans"), k + "client_allowed_sans"),
        min_version=versions["min_version"],
        max_version=versions["max_version"],
        cipher_suites=ciphers,
        curve_preferences=curves,
        prefer_server_cipher_suites=at.boolean(
            s.get("prefer_server_cipher_suites"), k + "prefer_server_cipher_suites", True
        ),
    )


def _check_tls(at: _At, tls: TlsServerConfig) -> None:
    k = "tls_server_config."
    if not tls.cert_file and not tls.cert:
        raise at.fail(k + "cert_file", "missing one of cert or cert_file")
    if not tls.key_file and not tls.key:
        raise at.fail(k + "key_file", "missing one of key or key_file")
    if (tls.client_ca_file or tls.client_ca) and tls.client_auth_type in ("", "NoClientCert"):
        raise at.fail(k + "client_auth_type", "client CA's have been configured without a Client Auth Policy")
    if TLS_VERSIONS.index(tls.min_version) > TLS_VERSIONS.index(tls.max_version):
        raise at.fail(k + "min_version", f"{tls.min_version} is above max_version {tls.max_version}")


def _http(at: _At, value: Any) -> tuple[tuple[tuple[str, str], ...], bool | None]:
    s = at.mapping(value, "http_server_config", ("http2", "headers"))
    http2 = None if s.get("http2") is None else at.boolean(s.get("http2"), "http_server_config.http2", True)
    raw = at.mapping(s.get("headers"), "http_server_config.headers", None)
    headers = []
    for name, v in raw.items():
        key = f"http_server_config.headers.{name}"
        if name not in ALLOWED_HEADERS:
            raise at.fail(key, f"HTTP header {name!r} can not be configured (only {', '.join(ALLOWED_HEADERS)})")
        text = at.string(v, key)
        allowed = ALLOWED_HEADERS[name]
        if allowed and text not in allowed:
            raise at.fail(key, f"invalid value {text!r}, expected one of {', '.join(allowed)}")
        if any(c in text for c in "\r\n\0"):
            raise at.fail(key, "a header value cannot hold a line break or NUL")
        headers.append((name, text))
    return tuple(headers), http2


def _users(at: _At, value: Any) -> tuple[tuple[str, str], ...]:
    s = at.mapping(value, "basic_auth_users", None)
    users = []
    for user, hashed in s.items():
        key = f"basic_auth_users.{user}"
        text = at.string(hashed, key)
        m = _BCRYPT.fullmatch(text)
        if m is None or not 4 <= int(m.group(1)) <= 31:
            raise at.fail(key, "not a bcrypt hash (e.g. from `htpasswd -nBC 10 USER`)")
        users.append((user, text))
    return tuple(users)


def _rate_limit(at: _At, value: Any) -> RateLimit:
    s = at.mapping(value, "rate_limit", ("burst", "interval"))
    burst = s.get("burst", 0)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 0:
        raise at.fail("rate_limit.burst", f"expected a whole number >= 0, got {burst!r}")
    return RateLimit(_duration(at, s.get("interval"), "rate_limit.interval"), burst)


def _duration(at: _At, value: Any, key: str) -> float:
    """Go's time.Duration as yaml.v2 reads it: a string like "1m30s", or an integer of nanoseconds."""
    if value is None:
        return 0.0
    if isinstance(value, int) and not isinstance(value, bool):
        return value * 1e-9
    text = at.string(value, key)
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise at.fail(key, f"invalid duration {text!r} (e.g. 1s, 500ms, 1m30s)")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise at.fail(key, "invalid duration ''")
    return total
