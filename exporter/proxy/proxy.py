"""DevicePluginProxy: upstream registrations in, kubelet registrations out, verdicts in between.

Threads:
- the Registration server's RPC threads take the upstream's Register (a new `Upstream` per call; the
  one it replaces is closed in the background);
- each `Upstream` reads its ListAndWatch and forwards every list at once (`ForwardedList`);
- `proxy-refresh` re-marks the lists when verdicts change (woken by HealthView.subscribe, well within
  100 ms; also every `_RESYNC_S` as a safety net);
- `proxy-watch` polls every `_POLL_S`: re-creates a relay socket the kubelet deleted, registers with
  the kubelet when one appears or is replaced (or dropped our stream), re-creates the upstream's
  kubelet.sock when the real kubelet restarted (NVIDIA's plugin then registers again), and brings
  back a deleted upstream kubelet.sock.

The relay socket in the real directory carries the upstream's endpoint name (`nvidia-gpu.sock`): the
kubelet sees that plugin, and our own device plugin's conflict check (a live `nvidia-<name>.sock`)
still keeps it off the resource. The name is fixed by the first registration of the resource.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.registration import KubeletIdentity, kubelet_identity
from exporter.health.verdict import HealthView
from exporter.proxy.forwarded import Counts, ForwardedList
from exporter.proxy.ids import DeviceIds
from exporter.proxy.kubelet import answers, register
from exporter.proxy.registrar import RegistrationServer
from exporter.proxy.relay import RelayCounts, RelayServer, RelayServicer
from exporter.proxy.upstream import Upstream

log = structlog.get_logger(__name__)

_POLL_S = 0.1
_RESYNC_S = 5.0
_BACKOFF_FIRST_S = 0.2
_BACKOFF_MAX_S = 5.0
_NO_STREAM_S = 3.0  # registered, but the kubelet has held no stream for this long: register again


@dataclass
class _Resource:
    """One proxied resource. `upstream` is swapped under the proxy's lock; the rest is the watch thread's."""

    name: str
    endpoint: str  # the relay socket's file name in the real directory
    forwarded: ForwardedList
    counts: RelayCounts = field(default_factory=RelayCounts)
    upstream: Upstream | None = None
    server: RelayServer | None = None
    registered_with: KubeletIdentity | None = None
    registered_options: bytes = b""
    registered_at: float = 0.0
    failures: int = 0
    next_attempt: float = 0.0
    refused: str | None = None  # why this resource is not served (a foreign live socket)


@dataclass(frozen=True)
class ResourceStatus:
    name: str
    streaming: bool
    registered: bool
    counts: Counts
    forwarded: dict[tuple[str, str], int]


class DevicePluginProxy:
    def __init__(
        self,
        upstream_dir: str,
        real_dir: str,
        health: HealthView,
        device_ids: Callable[[], DeviceIds],
        on_unplaced_id: Callable[[str], None] = lambda _id: None,
    ) -> None:
        self.upstream_dir = upstream_dir
        self.real_dir = real_dir
        self._health = health
        self._device_ids = device_ids
        self._on_unplaced_id = on_unplaced_id
        self._lock = threading.Lock()
        self._resources: dict[str, _Resource] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._kubelet_seen: KubeletIdentity | None = None
        self._kubelet_seen_once = False
        self.registrar = RegistrationServer(upstream_dir, real_dir, self._on_register)

    # --- lifecycle ---
    def start(self) -> None:
        """Serve the upstream's kubelet.sock (newly created, so a running NVIDIA plugin registers)."""
        self._health.subscribe(self._on_health_change)
        os.makedirs(self.real_dir, exist_ok=True)
        self.registrar.recreate()
        for name, target in (("proxy-refresh", self._refresh_loop), ("proxy-watch", self._watch_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Our sockets go: the kubelet marks the devices unhealthy; NVIDIA's plugin loses its kubelet."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        self.registrar.stop()
        with self._lock:
            resources = list(self._resources.values())
        for res in resources:
            if res.server is not None:
                res.server.stop()
                res.server = None
            if res.upstream is not None:
                res.upstream.close()
            res.registered_with = None

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)

    def status(self) -> list[ResourceStatus]:
        with self._lock:
            resources = sorted(self._resources.items())
        return [
            ResourceStatus(
                name,
                streaming=res.upstream is not None and res.upstream.streaming,
                registered=res.registered_with is not None,
                counts=res.forwarded.counts,
                forwarded=res.counts.snapshot(),
            )
            for name, res in resources
        ]

    def problems(self) -> list[str]:
        """Why the kubelet does not see every upstream resource as it should (for /ready)."""
        with self._lock:
            resources = sorted(self._resources.items())
        if not resources:
            return [f"no upstream device plugin has registered at {self.registrar.path} yet"]
        out: list[str] = []
        for name, res in resources:
            if res.refused:
                out.append(f"{name}: {res.refused}")
            elif res.upstream is None or not res.upstream.streaming:
                out.append(f"{name}: upstream plugin not streaming")
            elif res.registered_with is None:
                out.append(f"{name}: not registered with the kubelet")
        return out

    # --- fencing ---
    def is_fenced(self, device_id: str) -> bool:
        uuids = self._device_ids().uuids(device_id)
        if uuids is None:
            # Not ours to judge (an index of a device NVML has not shown us): the upstream's health stands.
            self._on_unplaced_id(device_id)
            return False
        try:
            return any(not self._health.verdict(u).healthy_for_scheduling for u in uuids)
        except Exception:  # a verdict we cannot obtain: do not vouch for the device
            log.exception("verdict lookup failed; holding the device back", device=device_id)
            return True

    def _on_health_change(self) -> None:
        if not self._stopping.is_set():
            self._wake.set()

    def _refresh_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(_RESYNC_S)
            self._wake.clear()  # before reading verdicts: a change during the refresh wakes us again
            if self._stopping.is_set():
                return
            self.refresh()

    def refresh(self) -> None:
        with self._lock:
            resources = list(self._resources.values())
        for res in resources:
            try:
                if res.forwarded.refresh(self.is_fenced):
                    c = res.forwarded.counts
                    log.info("proxy devices changed", resource=res.name, unhealthy=c.unhealthy, fenced=c.fenced)
            except Exception:
                log.exception("proxy refresh failed; the last list stays", resource=res.name)

    # --- the upstream ---
    def _on_register(self, request: pb.RegisterRequest) -> None:
        with self._lock:
            res = self._resources.get(request.resource_name)
            if res is None:
                res = _Resource(request.resource_name, request.endpoint, ForwardedList(request.resource_name))
                self._resources[request.resource_name] = res
            old = res.upstream
            new = Upstream(self.upstream_dir, request, self._on_list, self._on_down)
            res.upstream = new
        if old is not None:  # closing joins its reader: not in the upstream's Register call
            threading.Thread(target=old.close, name="proxy-up-close", daemon=True).start()
        new.start()

    def _current(self, upstream: Upstream) -> _Resource | None:
        with self._lock:
            res = self._resources.get(upstream.resource)
        return res if res is not None and res.upstream is upstream else None

    def _on_list(self, upstream: Upstream, devices: list[pb.Device]) -> None:
        res = self._current(upstream)
        if res is None:
            return
        first = not res.forwarded.listed
        res.forwarded.upstream_list(devices, self.is_fenced)
        if first:
            log.info("upstream listed its devices", resource=res.name, devices=len(devices))

    def _on_down(self, upstream: Upstream) -> None:
        res = self._current(upstream)
        if res is not None:
            res.forwarded.upstream_down(self.is_fenced)

    def _upstream_of(self, name: str) -> Callable[[], Upstream | None]:
        def current() -> Upstream | None:
            with self._lock:
                res = self._resources.get(name)
                return res.upstream if res is not None else None

        return current

    # --- the kubelet ---
    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._watch_once()
            except Exception:
                log.exception("proxy watch failed")
            self._stopping.wait(_POLL_S)

    def _watch_once(self) -> None:
        kubelet = kubelet_identity(self.real_dir)
        if kubelet != self._kubelet_seen:
            restarted = self._kubelet_seen_once and kubelet is not None
            self._kubelet_seen, self._kubelet_seen_once = kubelet, True
            if restarted:
                # As without the proxy: a new kubelet.sock makes NVIDIA's plugin restart and register again.
                log.info("kubelet restarted; re-creating the upstream's kubelet.sock", path=self.registrar.path)
                self.registrar.recreate()
            with self._lock:
                for res in self._resources.values():
                    res.registered_with, res.failures, res.next_attempt = None, 0, 0.0
        if not self.registrar.socket_ok():
            log.warning("the upstream's kubelet.sock is gone; re-creating it", path=self.registrar.path)
            self.registrar.recreate()
        with self._lock:
            resources = list(self._resources.values())
        for res in resources:
            if self._stopping.is_set():
                return
            self._serve(res)
            self._register(res, kubelet)

    def _serve(self, res: _Resource) -> None:
        if res.server is not None and res.server.socket_ok():
            return
        path = os.path.join(self.real_dir, res.endpoint)
        if res.server is not None:
            log.info("relay socket gone (kubelet restart?); re-creating", path=path)
            res.server.stop()
            res.server = None
        elif answers(path):
            # Someone else serves this name in the kubelet's directory: NVIDIA's plugin mounted the real
            # directory too. Two plugins for one resource make the kubelet flap; do not take it over.
            if res.refused is None:
                res.refused = (
                    f"{path} is served by another process (is the upstream also given the kubelet's directory?)"
                )
                log.error("relay socket taken; not serving this resource", resource=res.name, path=path)
            return
        res.refused = None
        res.registered_with = None
        if time.monotonic() < res.next_attempt:
            return
        servicer = RelayServicer(res.forwarded, self._upstream_of(res.name), self.is_fenced, res.counts)
        server = RelayServer(path, servicer)
        try:
            server.start()
        except Exception as exc:
            server.stop()
            self._backoff(res)
            log.error("relay cannot serve", path=path, error=str(exc))
            return
        res.server = server

    def _register(self, res: _Resource, kubelet: KubeletIdentity | None) -> None:
        upstream = res.upstream
        if kubelet is None or res.server is None or upstream is None or not res.forwarded.listed:
            return  # nothing to tell the kubelet before the upstream's first list
        options = upstream.options.SerializeToString(deterministic=True)
        now = time.monotonic()
        if res.registered_with == kubelet:
            quiet_since = max(res.registered_at, res.forwarded.last_stream_change)
            if res.forwarded.streams_open == 0 and now - quiet_since > _NO_STREAM_S:
                log.warning("the kubelet holds no ListAndWatch stream of ours; registering again", resource=res.name)
            elif options == res.registered_options:
                return
        if now < res.next_attempt:
            return
        try:
            register(self.real_dir, res.endpoint, res.name, upstream.options)
        except grpc.RpcError as exc:
            res.registered_with = None
            self._backoff(res)
            log.warning(
                "kubelet registration failed; retrying",
                resource=res.name,
                code=str(exc.code()),
                details=exc.details(),
                failures=res.failures,
            )
            return
        res.registered_with, res.registered_options = kubelet, options
        res.registered_at, res.failures = time.monotonic(), 0
        log.info("registered with the kubelet", resource=res.name, endpoint=res.endpoint)

    @staticmethod
    def _backoff(res: _Resource) -> None:
        res.failures += 1
        res.next_attempt = time.monotonic() + min(_BACKOFF_FIRST_S * 2 ** (res.failures - 1), _BACKOFF_MAX_S)
