"""`gpu-health-exporter device-plugin`: the kubelet device plugin as its own process.

In the chart it is a second container of the exporter's pod, sharing the state directory. It takes
its verdicts from the daemon's verdict stream (`exporter.health.stream.VerdictStream` on
`<state-dir>/control.sock`) and its devices from its own NVML discovery, so that

- while the exporter restarts or is upgraded, the plugin stays registered and keeps the last
  verdicts it heard (a fenced GPU stays fenced);
- started before the daemon (or without one), it takes the fences from the persisted state file,
  read-only: a fenced GPU is never advertised as Healthy;
- the exporter's liveness (a stuck collection) never restarts the plugin: it has its own probes on
  its own port (`/health`: its threads and gRPC servers alive; `/ready`: registered with the kubelet
  and hearing the daemon; `/metrics`: the device plugin's families).

The same `DevicePluginManager` runs in-process with `--device-plugin` for small setups: the only
difference is the `HealthView` it consumes (the engine itself, or the stream).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import structlog

from exporter.backend import Backend, BackendError
from exporter.config import Config, parse_config
from exporter.deviceplugin.manager import DevicePluginManager
from exporter.deviceplugin.settings import plugin_config
from exporter.health.stream import VerdictStream
from exporter.labels import RenderContext
from exporter.model import Inventory
from exporter.render import CONTENT_TYPE as CONTENT_TYPE
from exporter.server import HttpServer, Routes
from exporter.sidecar import SidecarLoops, run_sidecar, with_default_address

log = structlog.get_logger("exporter.deviceplugin.process")

DEFAULT_ADDRESS = ":9402"  # the exporter's is :9400; both containers share the pod's network


class PluginProcess:
    """Backend discovery + verdict stream + device plugin manager + probes."""

    def __init__(self, cfg: Config, backend: Backend) -> None:
        self.cfg = cfg
        self.backend = backend
        self._inventory = Inventory(driver_version="", gpus=())
        self._lock = threading.Lock()
        self.stream = VerdictStream(cfg.state_dir, parent_of=self._parent_of)
        self.manager = DevicePluginManager(
            plugin_config(cfg), self.inventory, self.stream, take_over=cfg.device_plugin_take_over
        )
        self.ctx = RenderContext(cfg.host_label, os.environ.get("NODE_NAME") or os.uname().nodename)
        self.loops = SidecarLoops("dp", self._discover, lambda: self.manager.render_metrics(self.ctx))
        self.server = HttpServer.for_config(  # ConfigError (exit 2) for a bad --web-config-file
            cfg, Routes(exposition=lambda: self.loops.exposition, health=self.liveness, ready=self.readiness)
        )

    # --- inventory ---
    def inventory(self) -> Inventory:
        with self._lock:
            return self._inventory

    def _parent_of(self, uuid: str) -> str | None:
        mig = self.inventory().mig_by_uuid(uuid)
        return mig.parent_uuid if mig is not None else None

    def _discover(self) -> None:
        try:
            inv = self.backend.discover()
        except Exception as exc:  # a failed discovery keeps the last inventory: devices stay advertised
            log.warning("device_plugin_discovery_failed", error=str(exc))
            return
        with self._lock:
            changed = inv.layout_key() != self._inventory.layout_key()
            self._inventory = inv
        if changed:
            self.ctx.rebuild(inv)
            log.info(
                "device_plugin_inventory",
                gpus=[g.uuid for g in inv.gpus],
                mig_devices=sum(len(g.migs) for g in inv.gpus),
            )
            self.manager.on_inventory_change()

    def _on_verdicts(self) -> None:
        """A device the daemon judges that we have not discovered (MIG re-layout): look again now."""
        inv = self.inventory()
        known = {g.uuid for g in inv.gpus} | {m.uuid for g in inv.gpus for m in g.migs}
        if set(self.stream.verdicts()) - known:
            self.loops.rediscover()

    # --- probes ---
    def liveness(self) -> tuple[bool, str]:
        return self.loops.liveness()

    def readiness(self) -> tuple[bool, str]:
        problems = self.manager.problems
        if problems:
            return False, "; ".join(problems)
        unregistered = self.manager.unregistered()
        if unregistered:
            return False, f"not registered with the kubelet: {', '.join(unregistered)}"
        stream_problem = self.stream.problem()
        if stream_problem is not None:
            return False, stream_problem
        return True, "ok"

    # --- lifecycle ---
    def start(self) -> None:
        self.backend.start()
        self._discover()
        self.stream.subscribe(self._on_verdicts)
        self.stream.start()
        self.manager.start()
        self.loops.start()
        self.server.start()
        log.info(
            "device_plugin_started",
            address=f"{self.cfg.address[0]}:{self.server.port}",
            state_dir=str(self.cfg.state_dir),
            verdicts=self.stream.source,
        )

    def stop(self) -> None:
        self.loops.stop()
        self.server.stop()
        self.manager.stop()
        self.stream.stop()
        self.backend.shutdown()


def run(argv: Sequence[str]) -> int:
    from exporter.app import make_backend
    from exporter.logs import configure_logging

    def build() -> PluginProcess:
        cfg = parse_config(with_default_address(argv, DEFAULT_ADDRESS))
        configure_logging(cfg.log_format, cfg.log_level)
        return PluginProcess(cfg, make_backend(cfg))

    return run_sidecar("gpu-health-exporter device-plugin", build, (BackendError, OSError))
