"""Wiring: build every part from the Config, start them, stop them cleanly.

Start-up problems the user can fix (bad flags, counters file, policy) exit
with code 2 and a message naming what is wrong; problems of the environment
(NVML missing, port in use) exit with code 1. Once running, faults degrade one
part and are logged; they never stop the daemon.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from exporter.backend import Backend, BackendError
from exporter.cli import EXIT_STARTUP, EXIT_USAGE
from exporter.collector import Collector
from exporter.config import Config, ConfigError, parse_config
from exporter.counters import CountersError, load_counters
from exporter.devices import parse_device_selector
from exporter.events import EventPump
from exporter.labels import RenderContext
from exporter.logs import configure_logging
from exporter.render import Renderer
from exporter.server import HttpServer, Routes
from exporter.snapshot import Snapshot
from exporter.xid import XidTracker

log = structlog.get_logger("exporter.app")


def hostname() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


def parse_xid_list(text: str, flag: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(f"{flag}: {part!r} is not an XID number") from None
    return out


def make_backend(cfg: Config) -> Backend:
    if cfg.simulate is not None:
        from exporter.simulate import SimulatedBackend

        try:
            return SimulatedBackend.from_spec(cfg.simulate or None)
        except ValueError as exc:
            raise ConfigError(f"--simulate: {exc}") from None
    from exporter.nvml import NvmlBackend

    return NvmlBackend(cfg.nvml_library)


class App:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.counters = load_counters(cfg.collectors)
        self.backend = make_backend(cfg)
        self.started = time.monotonic()
        self.interval_s = cfg.collect_interval_ms / 1000
        self.collector = Collector(
            self.backend,
            self.counters,
            parse_device_selector(cfg.devices),
            interval_s=self.interval_s,
            device_timeout_s=cfg.device_timeout_ms / 1000,
        )
        self.xids = XidTracker(cfg.xid_count_window_ms / 1000)
        self.health = self._make_health()
        self.pods = self._make_pods()
        self.ctx = RenderContext(cfg.host_label, hostname())
        self.renderer = Renderer(self.ctx, self.xids, self.backend.name, pods=self.pods)
        self.events = EventPump(self.backend, lambda: self.collector.inventory, self.collector.request_rediscovery)
        self.plugin: Any = None
        self.node_status: Any = None
        self.server = HttpServer(
            *cfg.listen,
            Routes(
                exposition=lambda: self.renderer.current,
                health=self.liveness,
                ready=self.readiness,
                gpus_json=self.health.gpus_json,
            ),
        )
        self.backend_ready = False

    # --- parts that live in their own packages ---
    def _make_health(self) -> Any:
        from exporter.health.engine import HealthEngine
        from exporter.health.policy import Policy, PolicyError

        cfg = self.cfg
        try:
            policy = Policy.build(
                fence_xids=parse_xid_list(cfg.health_fence_xids, "--health-fence-xids"),
                warn_xids=parse_xid_list(cfg.health_warn_xids, "--health-warn-xids"),
                ignore_xids=parse_xid_list(cfg.health_ignore_xids, "--health-ignore-xids"),
                nvml_timeout_grace_s=cfg.health_nvml_timeout_grace_s,
                slowdown_s=cfg.health_slowdown_s,
                auto_recover=cfg.health_auto_recover,
            )
        except PolicyError as exc:
            raise ConfigError(f"health policy: {exc}") from None
        return HealthEngine(policy, Path(cfg.state_dir))

    def _make_pods(self) -> Any:
        if not self.cfg.kubernetes:
            return None
        from exporter.pods.mapper import PodMapper, PodMappingConfig

        cfg = self.cfg
        return PodMapper(
            PodMappingConfig(
                socket_path=cfg.pod_resources_socket,
                gpu_id_type="device-name" if cfg.kubernetes_gpu_id_type == "device-name" else "uid",
                resource_names=tuple(n.strip() for n in cfg.nvidia_resource_names.split(",") if n.strip()),
                shared_mode="first-pod" if cfg.kubernetes_shared_gpus == "first-pod" else "per-pod",
                enable_pod_uid=cfg.kubernetes_enable_pod_uid,
                enable_pod_labels=cfg.kubernetes_enable_pod_labels,
                pod_labels_allowlist=cfg.kubernetes_pod_labels_allowlist,
                dra=cfg.kubernetes_dra,
                kubeconfig=cfg.kubeconfig,
            )
        )

    def _make_plugin(self) -> Any:
        from exporter.deviceplugin import DevicePluginConfig, DevicePluginManager

        cfg = self.cfg
        try:
            config = DevicePluginConfig(
                resource_name=cfg.resource_name,
                plugin_dir=cfg.device_plugin_dir,
                mig_strategy=cfg.mig_strategy,
                replicas=cfg.replicas,
                device_list_strategy=cfg.device_list_strategy,
            )
        except ValueError as exc:
            raise ConfigError(f"device plugin: {exc}") from None

        def inventory() -> Any:
            return self.collector.inventory

        return DevicePluginManager(config, inventory, self.health)

    # --- probes ---
    def liveness(self) -> tuple[bool, str]:
        """Alive while the collection loop keeps turning (it never blocks past its deadlines)."""
        limit = max(3 * self.interval_s, self.interval_s + 2 * self.collector.device_timeout_s + 10)
        age = time.monotonic() - self.collector.heartbeat
        if age > limit:
            return False, f"collection loop stuck for {age:.0f}s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """Ready only while what we serve can be trusted: fresh bytes, GPUs collected, XIDs
        watched, verdicts judged and on disk. The reason names the first thing that is not."""
        if not self.backend_ready:
            return False, "NVML not initialised"
        snap = self.collector.last_snapshot
        if snap is None:
            return False, "no collection yet"
        if not snap.inventory.gpus:
            return False, "no GPUs found"
        if not snap.samples:
            return False, f"no GPU selected by --devices {self.cfg.devices!r}: nothing is collected"
        age = time.time() - self.renderer.current.rendered_at
        if age > 3 * self.interval_s:
            return False, f"served metrics are {age:.0f}s old (more than 3 collection intervals)"
        for problem in (self.events.problem(), self.health.monitor_problem(), self.health.durability_problem()):
            if problem:
                return False, problem
        return True, "ok"

    # --- per-cycle work, in the collector thread ---
    def on_snapshot(self, snapshot: Snapshot) -> None:
        if self.pods is not None:
            self.pods.refresh(snapshot.inventory)
        self.health.on_snapshot(snapshot)
        collector = self.collector
        self.renderer.render(snapshot, collector.counters.fields, collector.nvml_errors, collector.collections)

    def reload_counters(self) -> None:
        path = self.cfg.collectors
        try:
            counters = load_counters(path)
        except CountersError as exc:
            log.error("counters_reload_failed", error=str(exc), keeping=self.collector.counters.source)
            return
        self.collector.set_counters(counters)
        self._warn_dcp(counters.fields)
        log.info("counters_reloaded", source=counters.source, fields=len(counters.fields))

    @staticmethod
    def _warn_dcp(fields: Sequence[Any]) -> None:
        from exporter.fields import Dcp

        for spec in fields:
            if isinstance(spec.reader, Dcp):
                log.warning(
                    "field_skipped",
                    field=spec.name,
                    reason="DCGM profiling field: NVML cannot provide it without DCGM",
                )

    def start(self) -> None:
        self._warn_dcp(self.counters.fields)
        self.backend.start()
        self.backend_ready = True
        from exporter.health.control import ControlError
        from exporter.health.state import StateError

        try:
            self.health.start()
        except ControlError as exc:
            raise BackendError(f"health control socket: {exc}") from None
        except StateError as exc:  # a newer version's file, a dir that is not ours: left untouched
            raise BackendError(str(exc)) from None
        if self.cfg.kubernetes_node_status:
            from exporter.health.nodestatus import NodeStatusReporter

            node = os.environ.get("NODE_NAME")
            if not node:
                raise ConfigError("--kubernetes-node-status needs NODE_NAME (set it from the downward API)")
            self.node_status = NodeStatusReporter(self.health, node, kubeconfig=self.cfg.kubeconfig)
            self.node_status.start()
        self.collector.add_listener(self.on_snapshot)
        self.events.add_listener(self.xids.on_events)
        self.events.add_listener(self.health.on_events)
        self.events.add_status_listener(self.health.set_xid_monitoring)
        if self.pods is not None:
            self.renderer.contributors.append(self.pods)
            start = getattr(self.pods, "start", None)
            if start is not None:
                start()
        self.renderer.contributors.append(self.health)
        self.renderer.contributors.append(self.events)
        self.server.start()
        # First cycle before the loop, so /ready turns green as soon as possible; /ready waits
        # for the event thread's registration too, so no XID after it turns green is missed.
        self.collector.run_once()
        self.events.start()
        if self.cfg.device_plugin:
            self.plugin = self._make_plugin()
            self.collector.add_layout_listener(lambda _inv: self.plugin.on_inventory_change())
            self.renderer.contributors.append(self.plugin)
            self.plugin.start()
        self.collector.start()
        log.info(
            "started",
            address=self.cfg.address,
            port=self.server.port,
            backend=self.backend.name,
            interval_ms=self.cfg.collect_interval_ms,
            fields=len(self.counters.fields),
        )

    def stop(self) -> None:
        log.info("stopping")
        for part in (self.plugin, self.events, self.collector, self.server, self.pods, self.node_status, self.health):
            stop = getattr(part, "stop", None) or getattr(part, "close", None)
            if stop is None:
                continue
            try:
                stop()
            except Exception:
                log.exception("stop_failed", part=type(part).__name__)
        try:
            self.backend.shutdown()
        except Exception:
            log.exception("backend_shutdown_failed")


def run(argv: Sequence[str]) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        print(f"gpu-health-exporter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(cfg.log_format, cfg.log_level)
    try:
        app = App(cfg)
    except (ConfigError, CountersError) as exc:
        print(f"gpu-health-exporter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stop = threading.Event()

    def _terminate(signum: int, _frame: FrameType | None) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    def _hup(_signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=app.reload_counters, name="reload", daemon=True).start()

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    signal.signal(signal.SIGHUP, _hup)
    try:
        app.start()
    except BackendError as exc:  # NVML unusable, or another daemon owns the state dir
        log.error("startup_failed", error=str(exc))
        print(f"gpu-health-exporter: {exc}", file=sys.stderr)
        app.stop()
        return EXIT_STARTUP
    except OSError as exc:
        log.error("startup_failed", error=str(exc))
        print(f"gpu-health-exporter: cannot listen on {cfg.address}: {exc}", file=sys.stderr)
        app.stop()
        return EXIT_STARTUP
    except ConfigError as exc:
        print(f"gpu-health-exporter: {exc}", file=sys.stderr)
        app.stop()
        return EXIT_USAGE
    while not stop.wait(1.0):
        pass
    app.stop()
    return 0
