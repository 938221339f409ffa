"""`gpu-health-exporter device-plugin-proxy`: the proxy as its own process (a container beside NVIDIA's
device plugin, sharing the exporter's state directory for the verdict stream).

Like `gpu-health-exporter device-plugin` (exporter/deviceplugin/process.py) it takes verdicts from the
daemon's verdict stream (the persisted state file until it hears the daemon, the last verdicts when
the daemon goes away) and has its own probes on its own port: `/health` (its threads alive), `/ready`
(every upstream resource streaming and registered with the kubelet, and the daemon heard), `/metrics`.
NVML (or --simulate) is read only for the inventory: a MIG device's GPU, index-shaped IDs. Without
NVML the proxy still forwards and fences by UUID; /ready says NVML is missing and discovery is retried.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import structlog

from exporter.backend import Backend
from exporter.config import Config, ConfigError, parse_config
from exporter.health.stream import VerdictStream
from exporter.model import Inventory
from exporter.proxy import metrics
from exporter.proxy.ids import DeviceIds
from exporter.proxy.proxy import DevicePluginProxy
from exporter.server import HttpServer, Routes
from exporter.sidecar import SidecarLoops, run_sidecar, with_default_address

log = structlog.get_logger("exporter.proxy.process")

DEFAULT_ADDRESS = ":9403"  # the exporter's is :9400, our device plugin's :9402
NAME = "gpu-health-exporter device-plugin-proxy"


def proxy_config(argv: Sequence[str]) -> Config:
    """The flags, checked for the proxy: --upstream-dir is required and is not the kubelet's directory."""
    cfg = parse_config(with_default_address(argv, DEFAULT_ADDRESS))
    if cfg.upstream_dir is None:
        raise ConfigError(
            "--upstream-dir is required: the host directory NVIDIA's device plugin has mounted as its "
            "/var/lib/kubelet/device-plugins (the chart uses /var/run/gpu-health-exporter/nvidia-device-plugin)"
        )
    for flag, path in (("--upstream-dir", str(cfg.upstream_dir)), ("--device-plugin-dir", cfg.device_plugin_dir)):
        if not os.path.isabs(path):
            raise ConfigError(f"{flag} {path}: must be an absolute path (the kubelet's and NVIDIA's plugin's are)")
    if os.path.realpath(cfg.upstream_dir) == os.path.realpath(cfg.device_plugin_dir):
        raise ConfigError(
            f"--upstream-dir {cfg.upstream_dir} is the kubelet's own directory (--device-plugin-dir): the proxy "
            "would register with itself; give NVIDIA's plugin a directory of its own"
        )
    return cfg


class ProxyProcess:
    def __init__(self, cfg: Config, backend: Backend) -> None:
        assert cfg.upstream_dir is not None
        self.cfg = cfg
        self.backend = backend
        self._lock = threading.Lock()
        self._inventory = Inventory(driver_version="", gpus=())
        self._ids = DeviceIds(self._inventory)
        self._nvml_problem: str | None = None
        self._backend_started = False
        self.stream = VerdictStream(cfg.state_dir, parent_of=self._parent_of)
        self.proxy = DevicePluginProxy(
            str(cfg.upstream_dir), cfg.device_plugin_dir, self.stream, self.device_ids, self._unplaced
        )
        # Discovery also runs at once when the upstream lists an ID the inventory cannot place.
        self.loops = SidecarLoops(
            "proxy", self._discover, lambda: metrics.render(self.proxy.status(), self.stream.source)
        )
        self.server = HttpServer.for_config(  # ConfigError (exit 2) for a bad --web-config-file
            cfg, Routes(exposition=lambda: self.loops.exposition, health=self.liveness, ready=self.readiness)
        )

    # --- inventory ---
    def device_ids(self) -> DeviceIds:
        with self._lock:
            return self._ids

    def _parent_of(self, uuid: str) -> str | None:
        with self._lock:
            mig = self._inventory.mig_by_uuid(uuid)
        return mig.parent_uuid if mig is not None else None

    def _unplaced(self, device_id: str) -> None:
        self.loops.rediscover()

    def _discover(self) -> None:
        try:
            if not self._backend_started:
                self.backend.start()
                self._backend_started = True
            inv = self.backend.discover()
        except Exception as exc:  # keep the last inventory; UUID-named devices are still judged
            if self._nvml_problem is None:
                log.error("proxy_discovery_failed", error=str(exc))
            self._nvml_problem = f"NVML discovery failing: {exc}"
            return
        self._nvml_problem = None
        with self._lock:
            changed = inv.layout_key() != self._inventory.layout_key()
            self._inventory, self._ids = inv, DeviceIds(inv)
        if changed:
            log.info("proxy_inventory", gpus=[g.uuid for g in inv.gpus], mig_devices=sum(len(g.migs) for g in inv.gpus))
            self.proxy.refresh()

    # --- probes ---
    def liveness(self) -> tuple[bool, str]:
        return self.loops.liveness(self.proxy.threads)

    def readiness(self) -> tuple[bool, str]:
        problems = self.proxy.problems()
        stream_problem = self.stream.problem()
        if stream_problem is not None:
            problems.append(stream_problem)
        if self._nvml_problem is not None:
            problems.append(self._nvml_problem)
        return (False, "; ".join(problems)) if problems else (True, "ok")

    # --- lifecycle ---
    def start(self) -> None:
        # The inventory and the verdicts (at least the state file's) come first: the first list the
        # kubelet gets from us already fences what is known to be fenced.
        self._discover()
        self.stream.start()
        self.server.start()
        self.proxy.start()
        self.loops.start()
        log.info(
            "device_plugin_proxy_started",
            address=f"{self.cfg.address[0]}:{self.server.port}",
            upstream_dir=str(self.cfg.upstream_dir),
            device_plugin_dir=self.cfg.device_plugin_dir,
            verdicts=self.stream.source,
        )

    def stop(self) -> None:
        self.loops.stop()
        self.server.stop()
        self.proxy.stop()
        self.stream.stop()
        if self._backend_started:
            self.backend.shutdown()


def run(argv: Sequence[str]) -> int:
    from exporter.app import make_backend
    from exporter.logs import configure_logging

    def build() -> ProxyProcess:
        cfg = proxy_config(argv)
        configure_logging(cfg.log_format, cfg.log_level)
        return ProxyProcess(cfg, make_backend(cfg))

    return run_sidecar(NAME, build)  # OSError at start: a port or a directory we cannot use
