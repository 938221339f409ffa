"""HttpSettings: the HTTP server's limits and its web configuration, built once from the flags.

Built before anything starts: a bad web configuration file raises ConfigError (exit 2), naming the key or
the path. Imports nothing heavy unless a web configuration file is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exporter.config import Config
    from exporter.web.source import WebConfigSource

# Not flags: no measured need to tune them. A request line longer than this is 414 (nginx's default buffer).
MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_HEADER_COUNT = 100


@dataclass(frozen=True)
class HttpSettings:
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 60.0
    max_connections: int = 256
    max_header_bytes: int = 16 * 1024
    unauthenticated_probes: bool = False
    web: WebConfigSource | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> HttpSettings:
        web = None
        if cfg.web_config_file is not None:
            from exporter.web.source import WebConfigSource

            web = WebConfigSource(cfg.web_config_file, cfg.web_unauthenticated_probes)
        return cls(
            header_timeout_s=cfg.http_header_timeout_s,
            idle_timeout_s=cfg.http_idle_timeout_s,
            max_connections=cfg.http_max_connections,
            max_header_bytes=cfg.http_max_header_bytes,
            unauthenticated_probes=cfg.web_unauthenticated_probes,
            web=web,
        )
