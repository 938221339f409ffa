"""DevicePluginManager: resources, servers, registration and metrics, wired for the app.

Two threads:
- `dp-refresh` recomputes the advertised devices when health or the inventory changes (woken at once
  by HealthView.subscribe / on_inventory_change; also every `_RESYNC_S` as a safety net) and publishes
  them to the streams. Health callbacks only set an Event: the engine may call them under its own lock,
  and we must not call back into it (verdict()) from there.
- `dp-watch` polls the plugin directory every `_POLL_S`: re-creates a socket the kubelet deleted, and
  (re-)registers when a kubelet.sock appears or is replaced, or when the kubelet closed our
  ListAndWatch stream and opened none for `_NO_STREAM_S`. Polling a directory entry is cheap, needs
  no inotify support in the container runtime, and bounds the reaction time to well under 1 s.

Never fight another plugin: the kubelet does not close the replaced client when a second plugin
registers the same resource, so both would keep replacing the device set, and when the old stream
ends the kubelet stops the current endpoint. Before registering a resource we look for NVIDIA's
plugin socket for it (`nvidia-<name>.sock`, e.g. nvidia-gpu.sock, nvidia-mig-1g.10gb.sock) in the
plugin directory; while one answers, that resource is not registered (a log line, and
gpuhealth_device_plugin_conflict{resource} 1) unless `take_over` says to.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import structlog

from exporter.deviceplugin import cdi
from exporter.deviceplugin.config import DevicePluginConfig, check_socket_path, socket_name
from exporter.deviceplugin.registration import KubeletIdentity, kubelet_identity, register
from exporter.deviceplugin.rm import ResourceDevices, ResourcePlan, build_plan, device_health
from exporter.deviceplugin.server import RESULTS, PluginServer, ResourceState
from exporter.family import Family
from exporter.health.verdict import HealthView
from exporter.labels import RenderContext, escape_label_value
from exporter.model import Inventory

log = structlog.get_logger(__name__)

_POLL_S = 0.2
_RESYNC_S = 5.0
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0
_NO_STREAM_S = 3.0  # registered, but no ListAndWatch stream for this long: the kubelet dropped us
_CONFLICT_RECHECK_S = 5.0  # how often a conflict is looked at again (a connect attempt each time)

# The device_plugin part's families (DevicePluginManager.render_metrics), one series set per resource.
REGISTERED = Family(
    "gpuhealth_device_plugin_registered", "gauge", "1 while registered with the kubelet", "resource", "device_plugin"
)
DEVICES = Family(
    "gpuhealth_device_plugin_devices",
    "gauge",
    "Devices advertised to the kubelet, by health",
    "resource, health",
    "device_plugin",
)
ALLOCATIONS = Family(
    "gpuhealth_device_plugin_allocations_total",
    "counter",
    "Allocate calls by result",
    "resource, result",
    "device_plugin",
)
CONFLICT = Family(
    "gpuhealth_device_plugin_conflict",
    "gauge",
    "1 while another device plugin (NVIDIA's) serves this resource, so ours does not register it",
    "resource",
    "device_plugin",
)
VERDICT_SOURCE = Family(
    "gpuhealth_device_plugin_verdict_source",
    "gauge",
    "1 for where the plugin's verdicts come from: in_process (the daemon's engine), daemon (its verdict "
    "stream), last_known (the daemon went away), state_file (not heard yet), none",
    "source",
    "device_plugin",
)
FAMILIES = (REGISTERED, DEVICES, ALLOCATIONS, CONFLICT, VERDICT_SOURCE)
VERDICT_SOURCES = ("in_process", "daemon", "last_known", "state_file", "none")


def nvidia_plugin_socket(plugin_dir: str, resource_name: str) -> str | None:
    """The path of NVIDIA's device plugin socket for this resource if one is live there, else None.

    NVIDIA's k8s-device-plugin serves `<plugin dir>/nvidia-<name>.sock` for `<domain>/<name>`
    (internal/plugin/server.go getPluginSocketPath). A file nobody answers on is a leftover, no conflict."""
    path = os.path.join(plugin_dir, f"nvidia-{resource_name.rsplit('/', 1)[-1]}.sock")
    if not os.path.exists(path):
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return None
    finally:
        probe.close()
    return path


@dataclass
class _Plugin:
    """Per-resource bookkeeping, touched only by the watch thread (and stop() after it has ended)."""

    state: ResourceState
    path: str
    server: PluginServer | None = None
    registered_with: KubeletIdentity | None = None
    kubelet_seen: KubeletIdentity | None = None
    failures: int = 0
    next_attempt: float = 0.0
    registered_at: float = 0.0
    conflict: str | None = None  # NVIDIA's socket for this resource, while it answers
    conflict_checked: float = -1e9


class DevicePluginManager:
    """Serves one device plugin per resource and keeps the kubelet's view in step with health."""

    metrics_part = "device_plugin"  # the part label of gpuhealth_render_success

    def __init__(
        self,
        config: DevicePluginConfig,
        inventory: Callable[[], Inventory],
        health: HealthView,
        take_over: bool = False,
    ) -> None:
        config.validate()
        self._config = config
        self._take_over = take_over
        self._inventory = inventory
        self._health = health
        self._lock = threading.Lock()
        self._plugins: dict[str, _Plugin] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._inventory_dirty = True
        self._last_inventory: Inventory | None = None
        self._plan: ResourcePlan | None = None
        self._problems: tuple[str, ...] = ()
        self._threads: list[threading.Thread] = []
        self._started = False

    # --- public API ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Compute the first device list, serve every resource's socket, then register in the background.

        The first ListAndWatch message therefore already carries the health known at start. A missing
        kubelet is fine: registration happens when kubelet.sock appears.
        """
        if self._started:
            raise RuntimeError("DevicePluginManager.start() called twice")
        self._started = True
        # Subscribe first: a verdict changing during the first refresh then still wakes the refresh thread.
        self._health.subscribe(self._on_health_change)
        self._refresh()
        try:
            os.makedirs(self._config.plugin_dir, exist_ok=True)
        except OSError as exc:
            log.warning("device plugin dir not creatable; will retry", dir=self._config.plugin_dir, error=str(exc))
        self._serve_all()
        for name, target in (("dp-refresh", self._refresh_loop), ("dp-watch", self._watch_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop serving and remove our sockets (the kubelet then marks the devices unhealthy)."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        with self._lock:
            plugins = list(self._plugins.values())
        for plugin in plugins:
            if plugin.server is not None:
                plugin.server.stop()
                plugin.server = None
            plugin.registered_with = None

    def on_inventory_change(self) -> None:
        """Called by the collector when GPUs or MIG devices appear, vanish or move."""
        self._inventory_dirty = True
        self._wake.set()

    def render_metrics(self, ctx: RenderContext) -> str:
        # ctx is unused: these families are per resource, not per device.
        with self._lock:
            plugins = sorted(self._plugins.items())
        reg = [REGISTERED.header]
        devs = [DEVICES.header]
        allocs = [ALLOCATIONS.header]
        conflicts = [CONFLICT.header]
        for name, plugin in plugins:
            res = f'resource="{escape_label_value(name)}"'
            reg.append(REGISTERED.sample(res, int(plugin.registered_with is not None)))
            healthy, unhealthy = plugin.state.counts()
            devs.append(DEVICES.sample(f'{res},health="healthy"', healthy))
            devs.append(DEVICES.sample(f'{res},health="unhealthy"', unhealthy))
            counts = plugin.state.allocations()
            allocs.extend(ALLOCATIONS.sample(f'{res},result="{r}"', counts[r]) for r in RESULTS)
            conflicts.append(CONFLICT.sample(res, int(plugin.conflict is not None)))
        source = getattr(self._health, "source", "in_process")
        sources = [VERDICT_SOURCE.header]
        sources += [VERDICT_SOURCE.sample(f'source="{s}"', int(s == source)) for s in VERDICT_SOURCES]
        return "".join(reg + devs + allocs + conflicts + sources)

    @property
    def problems(self) -> tuple[str, ...]:
        """Why devices are withheld under the current MIG strategy (empty when the layout fits)."""
        return self._problems

    def unregistered(self) -> list[str]:
        """The resources not registered with the current kubelet (all of them while there is none)."""
        with self._lock:
            return [name for name, p in self._plugins.items() if p.registered_with is None]

    # --- refresh ------------------------------------------------------------------------------------

    def _on_health_change(self) -> None:
        if not self._stopping.is_set():
            self._wake.set()

    def _refresh_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(_RESYNC_S)
            # Cleared before reading health: a change arriving during _refresh sets it again.
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._refresh()
            except Exception:
                log.exception("device plugin refresh failed; keeping the last advertised devices")

    def _refresh(self) -> None:
        # Take the dirty flag before reading the inventory: a change signalled after this point is
        # seen by the next refresh, never lost.
        dirty, self._inventory_dirty = self._inventory_dirty, False
        try:
            inventory = self._inventory()
        except Exception:
            self._inventory_dirty = self._inventory_dirty or dirty
            raise
        plan = self._plan
        if plan is None or dirty or inventory is not self._last_inventory:
            plan = build_plan(inventory, self._config)
            if plan.problems != self._problems:
                for problem in plan.problems:
                    log.error("device plugin layout problem", mig_strategy=self._config.mig_strategy, problem=problem)
            self._plan, self._last_inventory, self._problems = plan, inventory, plan.problems
            cdi.regenerate(self._config)  # the CDI spec must name the devices of this inventory
        health = device_health(plan, self._health)
        with self._lock:
            for name in plan.resources:
                if name not in self._plugins:
                    self._plugins[name] = _Plugin(
                        state=ResourceState(name), path=os.path.join(self._config.plugin_dir, socket_name(name))
                    )
            plugins = list(self._plugins.items())
        replicated = self._config.replicas > 1
        for name, plugin in plugins:
            # A resource that vanished (MIG reconfigured) keeps its socket and advertises no devices, so
            # its capacity drops to 0 at once instead of lingering for the kubelet's 5-minute grace.
            res = plan.resources.get(name) or ResourceDevices(name, (), replicated)
            if plugin.state.publish(res, health.get(name, {}), plan.topology):
                unhealthy = [i for i, ok in health.get(name, {}).items() if not ok]
                log.info("device plugin devices changed", resource=name, devices=len(res), unhealthy=unhealthy)

    # --- serving and registration -------------------------------------------------------------------

    def _serve_all(self) -> None:
        with self._lock:
            plugins = list(self._plugins.values())
        for plugin in plugins:
            if plugin.server is None or not plugin.server.socket_ok():
                self._serve(plugin)

    def _serve(self, plugin: _Plugin) -> None:
        if plugin.server is not None:
            log.info("device plugin socket gone (kubelet restart?); re-creating", path=plugin.path)
            plugin.server.stop()
            plugin.server = None
        plugin.registered_with = None
        if time.monotonic() < plugin.next_attempt:
            return
        server = PluginServer(plugin.state, plugin.path, self._config, self._inventory)
        try:
            check_socket_path(self._config.plugin_dir, plugin.state.name)
            server.start()
        except Exception as exc:
            server.stop()
            self._backoff(plugin)
            log.error("device plugin cannot serve", path=plugin.path, error=str(exc))
            return
        plugin.server = server
        plugin.failures = 0
        plugin.next_attempt = 0.0

    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._watch_once()
            except Exception:
                log.exception("device plugin watch failed")
            self._stopping.wait(_POLL_S)

    def _watch_once(self) -> None:
        self._serve_all()
        kubelet = kubelet_identity(self._config.plugin_dir)
        with self._lock:
            plugins = list(self._plugins.values())
        for plugin in plugins:
            if self._stopping.is_set():
                return
            if kubelet != plugin.kubelet_seen:
                # A new kubelet: forget the old registration and retry at once, whatever the backoff.
                plugin.kubelet_seen = kubelet
                plugin.registered_with = None
                plugin.failures = 0
                plugin.next_attempt = 0.0
            now = time.monotonic()
            if plugin.registered_with is not None and plugin.registered_with == kubelet:
                quiet_since = max(plugin.registered_at, plugin.state.last_stream_change)
                if plugin.state.streams_open == 0 and now - quiet_since > _NO_STREAM_S:
                    # The kubelet closed our stream (or never opened one) and did not come back.
                    log.warning("device plugin has no ListAndWatch stream; re-registering", resource=plugin.state.name)
                    plugin.registered_with = None
            if kubelet is None or plugin.server is None or plugin.registered_with == kubelet:
                continue
            if time.monotonic() < plugin.next_attempt:
                continue
            if self._conflicting(plugin, now):
                continue
            endpoint = os.path.basename(plugin.path)
            try:
                register(self._config.plugin_dir, endpoint, plugin.state.name)
            except grpc.RpcError as exc:
                self._backoff(plugin)
                log.warning(
                    "device plugin registration failed; retrying",
                    resource=plugin.state.name,
                    code=str(exc.code()),
                    details=exc.details(),
                    failures=plugin.failures,
                )
                continue
            plugin.registered_with = kubelet
            plugin.registered_at = time.monotonic()
            plugin.failures = 0
            log.info("device plugin registered with the kubelet", resource=plugin.state.name, endpoint=endpoint)

    def _conflicting(self, plugin: _Plugin, now: float) -> bool:
        """Whether NVIDIA's plugin serves this resource (checked at most every `_CONFLICT_RECHECK_S`)."""
        if now - plugin.conflict_checked < _CONFLICT_RECHECK_S:
            return plugin.conflict is not None and not self._take_over
        plugin.conflict_checked = now
        found = nvidia_plugin_socket(self._config.plugin_dir, plugin.state.name)
        if found != plugin.conflict:
            if found is None:
                log.info("device plugin conflict gone; registering", resource=plugin.state.name)
            elif self._take_over:
                log.warning(
                    "another device plugin serves this resource; taking over as configured",
                    resource=plugin.state.name,
                    socket=found,
                )
            else:
                log.error(
                    "another device plugin serves this resource: not registering it (two plugins for one "
                    "resource make the kubelet flap); remove one, or pass --device-plugin-take-over",
                    resource=plugin.state.name,
                    socket=found,
                )
            plugin.conflict = found
        return found is not None and not self._take_over

    @staticmethod
    def _backoff(plugin: _Plugin) -> None:
        plugin.failures += 1
        delay = min(_BACKOFF_FIRST_S * 2 ** (plugin.failures - 1), _BACKOFF_MAX_S)
        plugin.next_attempt = time.monotonic() + delay
