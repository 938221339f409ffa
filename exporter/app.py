"""Wiring: build every part from the Config, start them, stop them cleanly.

Start-up problems the user can fix (bad flags, counters file, policy) raise ConfigError or
CountersError; problems of the environment (NVML missing, port in use) raise BackendError or
OSError. exporter/cli.py turns them into exit codes. Once running, faults degrade one part and
are logged; they never stop the daemon.

The device plugin (grpc) and the pod and Node status features (kubernetes) are imported only
when their flag enables them.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import structlog

from exporter.backend import Backend, BackendError
from exporter.collector import Collector
from exporter.config import Config, ConfigError
from exporter.counters import CountersError, load_counters
from exporter.dcgmexp import DcgmExpFamilies
from exporter.events import EventPump
from exporter.health.engine import HealthEngine
from exporter.health.expose import gpus_json
from exporter.labels import RenderContext
from exporter.model import Inventory
from exporter.render import Renderer
from exporter.server import HttpServer, Routes
from exporter.snapshot import Snapshot
from exporter.xid import XidTracker

if TYPE_CHECKING:  # grpc and kubernetes: imported only when the feature is enabled
    from exporter.deviceplugin import DevicePluginManager
    from exporter.health.nodestatus import NodeStatusReporter
    from exporter.pods.gpushare import GpuShare
    from exporter.pods.mapper import PodMapper
    from exporter.scheduling.parts import SchedulingParts

log = structlog.get_logger("exporter.app")


class Part(Protocol):
    """What App starts and stops."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class _Closes:
    """A part that has nothing to start and ends with close() (the pod mapper), as a Part."""

    def __init__(self, name: str, close: Callable[[], None]) -> None:
        self.name = name
        self._close = close

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self._close()


def hostname() -> str:
    return os.environ.get("NODE_NAME") or socket.gethostname()


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
        self.interval_s = cfg.collect_interval_s
        self.collector = Collector(
            self.backend,
            self.counters,
            cfg.devices,
            interval_s=self.interval_s,
            device_timeout_s=cfg.device_timeout_s,
            process_interval=cfg.process_interval if cfg.process_metrics != "off" else 0,
        )
        self.xids = XidTracker(cfg.xid_count_window_s)
        self.health = self._make_health()
        # The DCGM_EXP_* families the counters file lists (exporter/dcgmexp.py).
        self.dcgmexp = DcgmExpFamilies(
            self.counters, self.xids, self.health, cfg.clock_events_count_window_s, mig_layout=cfg.mig_layout
        )
        self.pods = self._make_pods()
        self.dcgmexp.pods = self.pods  # pod labels on the DCGM_EXP_* families too, as dcgm-exporter
        self.gpushare = self._make_gpushare()
        self.ctx = RenderContext(cfg.host_label, hostname())
        self.renderer = Renderer(self.ctx, self.xids, self.backend.name, pods=self.pods, mig_layout=cfg.mig_layout)
        self.events = EventPump(self.backend, lambda: self.collector.inventory, self.collector.request_rediscovery)
        self.plugin: DevicePluginManager | None = None
        self.node_status: NodeStatusReporter | None = None
        self.scheduling = self._make_scheduling()
        self.server = HttpServer.for_config(  # ConfigError (exit 2) for a bad --web-config-file
            cfg,
            Routes(
                exposition=lambda: self.renderer.current,
                health=self.liveness,
                ready=self.readiness,
                gpus_json=self.gpus_json,
            ),
        )
        self.backend_ready = False

    # --- parts that live in their own packages ---
    def _make_health(self) -> HealthEngine:
        from exporter.health.policy import Policy, PolicyError

        cfg = self.cfg
        try:
            policy = Policy.build(
                fence_xids=cfg.health_fence_xids,
                warn_xids=cfg.health_warn_xids,
                ignore_xids=cfg.health_ignore_xids,
                nvml_timeout_grace_s=cfg.health_nvml_timeout_grace_s,
                slowdown_s=cfg.health_slowdown_s,
                auto_recover=cfg.health_auto_recover,
            )
        except PolicyError as exc:
            raise ConfigError(f"health policy: {exc}") from None
        return HealthEngine(policy, cfg.state_dir)

    def _make_pods(self) -> PodMapper | None:
        if not self.cfg.kubernetes:
            return None
        from exporter.pods.mapper import PodMapper, PodMappingConfig

        cfg = self.cfg
        return PodMapper(
            PodMappingConfig(
                socket_path=cfg.pod_resources_socket,
                kubelet_timeout_s=cfg.pod_resources_timeout_s,
                gpu_id_type=cfg.kubernetes_gpu_id_type,
                resource_names=cfg.nvidia_resource_names,
                shared_mode=cfg.kubernetes_shared_gpus,
                enable_pod_uid=cfg.kubernetes_enable_pod_uid,
                enable_pod_labels=cfg.kubernetes_enable_pod_labels,
                pod_labels_allowlist=cfg.kubernetes_pod_labels_allowlist,
                dra=cfg.kubernetes_dra,
                process_metrics=cfg.process_metrics != "off",
                kubeconfig=cfg.kubeconfig,
            )
        )

    def _make_gpushare(self) -> GpuShare | None:
        """--process-metrics: who uses how much of each GPU; pod names come from the pod mapper's pod
        watch (-k), without it processes are still reported, with empty pod names."""
        if self.cfg.process_metrics == "off":
            return None
        from exporter.pods.gpushare import GpuShare

        if not self.cfg.host_proc.is_dir():  # every process would be "unknown": say so at start-up instead
            raise ConfigError(f"--host-proc {self.cfg.host_proc}: not a directory (the host's /proc is needed)")
        pods = self.pods
        return GpuShare(
            self.cfg.host_proc,
            per_pid=self.cfg.process_metrics == "per-pid",
            pod_items=pods.pod_items if pods is not None else None,
        )

    def gpus_json(self) -> bytes:
        """/gpus: the health view of each device, with its processes under --process-metrics."""
        devices = self.health.list()
        if self.gpushare is not None:
            devices = self.gpushare.add_processes(devices)
        return gpus_json(devices)

    def _make_scheduling(self) -> SchedulingParts | None:
        """DeviceTaintRules, the Node taint, pod Events (kubernetes: imported only when one is on)."""
        from exporter.scheduling import parts  # the package itself imports nothing heavy

        if not parts.wanted(self.cfg):
            return None
        return parts.SchedulingParts(self.cfg, self.health, lambda: self.collector.inventory, self.pods)

    def _make_plugin(self) -> DevicePluginManager:
        from exporter.deviceplugin import DevicePluginManager
        from exporter.deviceplugin.settings import plugin_config

        cfg = self.cfg
        config = plugin_config(cfg)  # the same settings as the device plugin's own process

        def inventory() -> Inventory:  # discovered by the first cycle, which runs before the plugin starts
            return self.collector.inventory or Inventory(driver_version="", gpus=())

        return DevicePluginManager(config, inventory, self.health, take_over=cfg.device_plugin_take_over)

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
        rendered_at = self.renderer.current.rendered_at
        if snap is None or not rendered_at:  # the first cycle's bytes are not served yet
            return False, "no collection yet"
        if not snap.inventory.gpus:
            return False, "no GPUs found"
        if not snap.samples:
            return False, f"no GPU selected by --devices {str(self.cfg.devices)!r}: nothing is collected"
        age = time.time() - rendered_at
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
        self.dcgmexp.on_snapshot(snapshot)  # before the render that reads it
        if self.gpushare is not None:
            self.gpushare.on_snapshot(snapshot)  # resolves new PIDs to pods (cached); before the render
        self.renderer.render(snapshot)

    def reload_counters(self) -> None:
        path = self.cfg.collectors
        try:
            counters = load_counters(path)
        except CountersError as exc:
            log.error("counters_reload_failed", error=str(exc), keeping=self.collector.counters.source)
            return
        self.collector.set_counters(counters)
        self.dcgmexp.set_counters(counters)
        log.info("counters_reloaded", source=counters.source, fields=len(counters.fields))

    def start(self) -> None:
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
        # Right after the DCGM block, where dcgm-exporter's own families used to be rendered.
        self.renderer.contributors.append(self.dcgmexp)
        if self.pods is not None:  # starts its worker on the first refresh
            self.renderer.contributors.append(self.pods)
        if self.gpushare is not None:
            self.renderer.contributors.append(self.gpushare)
        self.renderer.contributors.append(self.health)
        self.renderer.contributors.append(self.events)
        self.server.start()
        # First cycle before the loop, so /ready turns green as soon as possible; /ready waits
        # for the event thread's registration too, so no XID after it turns green is missed.
        self.collector.run_once()
        self.events.start()
        if self.cfg.device_plugin:
            plugin = self.plugin = self._make_plugin()
            self.collector.add_layout_listener(lambda _inv: plugin.on_inventory_change())
            self.renderer.contributors.append(plugin)
            plugin.start()
        if self.scheduling is not None:  # after the first cycle: the inventory is known
            scheduling = self.scheduling
            self.collector.add_layout_listener(lambda _inv: scheduling.wake())
            self.renderer.contributors.extend(scheduling.contributors)
            for part in scheduling.parts:
                part.start()
        self.collector.start()
        log.info(
            "started",
            address=str(self.cfg.address),
            port=self.server.port,
            backend=self.backend.name,
            interval_ms=round(self.cfg.collect_interval_s * 1000),
            fields=len(self.counters.fields),
        )

    def parts(self) -> list[Part]:
        """The parts to stop, in order: the device plugin first (the kubelet stops allocating), health last
        (it flushes the state file)."""
        pods = _Closes(type(self.pods).__name__, self.pods.close) if self.pods is not None else None
        scheduling = self.scheduling.parts if self.scheduling is not None else []
        # The scheduling consumers before the pod mapper: pod Events read it.
        parts = (self.plugin, self.events, self.collector, self.server, *scheduling, pods, self.node_status)
        parts += (self.health,)
        return [part for part in parts if part is not None]

    def stop(self) -> None:
        log.info("stopping")
        for part in self.parts():
            name = part.name if isinstance(part, _Closes) else type(part).__name__
            began = time.monotonic()
            try:
                part.stop()
            except Exception:
                log.exception("stop_failed", part=name)
            took = time.monotonic() - began
            if took > 1.0:  # a stop that lingers (a thread past its join timeout) says which part it was
                log.warning("stop_slow", part=name, seconds=round(took, 2))
        try:
            self.backend.shutdown()
        except Exception:
            log.exception("backend_shutdown_failed")
        log.info("stopped")
