"""The web configuration as the server uses it: loaded at start-up (an error there is exit 2), looked at
again for each new connection, as exporter-toolkit re-reads it, so certificates rotate without a restart.

Only a change is re-read: the file and the certificates it names are compared by stat (inode, size,
mtime; a Kubernetes Secret volume swaps a symlink, which changes the inode). A file that turns bad keeps
the last good configuration, and the reason is logged once per change.
"""

from __future__ import annotations

import os
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from exporter.tokenbucket import TokenBucket
from exporter.web.basicauth import BasicAuth
from exporter.web.config import WebConfig, WebConfigError, load_web_config
from exporter.web.tls import ClientCertRule, build_tls

log = structlog.get_logger("exporter.web")

_Stamp = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class ActiveWeb:
    """One loaded configuration, ready to serve with."""

    config: WebConfig
    ssl_context: ssl.SSLContext | None
    cert_rule: ClientCertRule
    auth: BasicAuth
    limiter: TokenBucket | None
    headers: tuple[tuple[str, str], ...]


def _stamp(paths: tuple[Path, ...]) -> _Stamp:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(p), -1, -1, -1))
    return tuple(out)


class WebConfigSource:
    def __init__(self, path: Path, probes_without_auth: bool) -> None:
        self.path = path
        self._probes = probes_without_auth
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="basic-auth")
        self.active = self._load()  # WebConfigError here: the daemon does not start
        self._stamp = self._stamp_of(self.active.config)
        self._failed_stamp: _Stamp | None = None
        for note in self._notes:
            log.info("web_config_note", path=str(path), note=note)
        log.info(
            "web_config_loaded",
            path=str(path),
            tls=self.active.ssl_context is not None,
            basic_auth=self.active.auth.enabled,
        )

    def _stamp_of(self, config: WebConfig) -> _Stamp:
        return _stamp((self.path, *config.tls.files()))

    def _load(self) -> ActiveWeb:
        config = load_web_config(self.path)
        notes: list[str] = []
        if config.http2 is not None:
            notes.append("http_server_config.http2: accepted and ignored, this server speaks HTTP/1.1")
        context = None
        rule = ClientCertRule(False, None)
        if config.tls.enabled:
            setup = build_tls(f"--web-config-file {self.path}", config.tls, self._probes)
            context, rule = setup.context, setup.rule
            notes += setup.notes
        self._notes = notes
        limiter = None
        if config.rate_limit.interval_s > 0:
            limiter = TokenBucket(1.0 / config.rate_limit.interval_s, config.rate_limit.burst)
        return ActiveWeb(config, context, rule, BasicAuth(config.users, self._executor), limiter, config.headers)

    def refresh(self) -> ActiveWeb:
        """Called for each new connection: the current configuration, re-read if a file changed."""
        stamp = self._stamp_of(self.active.config)  # taken before the read: a change during it is seen next time
        if stamp == self._stamp:
            return self.active
        try:
            fresh = self._load()
        except (WebConfigError, OSError) as exc:
            if stamp != self._failed_stamp:  # once per change, not once per connection
                self._failed_stamp = stamp
                log.warning("web_config_reload_failed", path=str(self.path), error=str(exc), kept="last good")
            return self.active
        tls_changed = (fresh.ssl_context is None) != (self.active.ssl_context is None)
        if tls_changed:
            # A listener cannot switch between plain HTTP and TLS under its clients' feet.
            if stamp != self._failed_stamp:
                self._failed_stamp = stamp
                log.warning(
                    "web_config_reload_failed",
                    path=str(self.path),
                    error="turning TLS on or off needs a restart",
                    kept="last good",
                )
            return self.active
        self.active, self._stamp, self._failed_stamp = fresh, stamp, None
        log.info("web_config_reloaded", path=str(self.path))
        return fresh

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
