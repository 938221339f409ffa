"""The gRPC DevicePlugin service for one resource, served on one unix socket.

Concurrency choice: a *sync* grpc.server with a bounded thread pool, not grpc.aio. The rest of the
exporter is threads (collector, event thread, health engine callbacks), and the only long-lived RPC is
ListAndWatch, of which the kubelet holds exactly one per registered endpoint. Each server therefore
gets `_WORKERS` threads and keeps at most `_MAX_STREAMS` concurrent ListAndWatch streams (the kubelet's
plus slack for a re-registration overlap or a debugging client); a further stream is served and the
*oldest* one is ended, never the newest: the kubelet's newest stream is the one its current endpoint
reads, and refusing it would take the resource away. So at least `_WORKERS - _MAX_STREAMS` threads
always remain for Allocate and GetPreferredAllocation, which the kubelet calls without a timeout.
grpc.aio would avoid pinning threads but would add an event loop thread plus cross-thread hand-offs
for every health change, for no benefit at one stream per resource.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog

from exporter.deviceplugin import cdi
from exporter.deviceplugin.allocate import (
    AllocateError,
    MigMinors,
    Target,
    cdi_names,
    container_response,
    read_mig_minors,
    runtime_ids,
    targets_for,
)
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2_grpc as pb_grpc
from exporter.deviceplugin.config import DevicePluginConfig
from exporter.deviceplugin.placement import EMPTY, Topology
from exporter.deviceplugin.rm import HEALTHY, UNHEALTHY, ResourceDevices, preferred_allocation
from exporter.deviceplugin.unixgrpc import UnixSocketServer
from exporter.model import Inventory

log = structlog.get_logger(__name__)

RESULT_SUCCESS = "success"
RESULT_UNKNOWN = "unknown_device"
RESULT_UNHEALTHY = "unhealthy_device"
RESULTS = (RESULT_SUCCESS, RESULT_UNKNOWN, RESULT_UNHEALTHY)

_WORKERS = 8
_MAX_STREAMS = 4
# A stream re-checks its RPC context at least this often even without a notification, so a stream whose
# kubelet vanished without a clean cancel frees its worker thread promptly.
_STREAM_RECHECK_S = 1.0
_MAX_MESSAGE = 16 * 1024 * 1024

OPTIONS = pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


class ResourceState:
    """The current devices and health of one resource, shared by every server generation.

    Written by the manager's refresh thread (`publish`), read by RPC threads. The ListAndWatch message
    is built once per change, not per stream.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._version = 0
        self._key: tuple[tuple[str, bool, int | None], ...] | None = None
        self._devices = ResourceDevices(name, (), False)
        self._health: dict[str, bool] = {}
        self._topology: Topology = EMPTY
        self._message = pb.ListAndWatchResponse()
        self._allocations = dict.fromkeys(RESULTS, 0)
        # Open ListAndWatch streams (every server generation) and when the last one ended: the manager
        # re-registers when the kubelet closed our stream and did not open another.
        self.streams_open = 0
        self.last_stream_change = time.monotonic()

    def stream_opened(self) -> None:
        with self._cond:
            self.streams_open += 1
            self.last_stream_change = time.monotonic()

    def stream_closed(self) -> None:
        with self._cond:
            self.streams_open -= 1
            self.last_stream_change = time.monotonic()

    def publish(self, devices: ResourceDevices, health: dict[str, bool], topology: Topology) -> bool:
        """Install a new device list; wake the streams only when what the kubelet sees changed."""
        key = tuple((d.id, health.get(d.id, False), d.numa_node) for d in devices.devices)
        with self._cond:
            self._devices, self._health, self._topology = devices, health, topology
            if key == self._key:
                return False
            self._key = key
            self._message = pb.ListAndWatchResponse(
                devices=[_device_pb(d.id, health.get(d.id, False), d.numa_node) for d in devices.devices]
            )
            self._version += 1
            self._cond.notify_all()
            return True

    def snapshot(self) -> tuple[ResourceDevices, dict[str, bool], Topology]:
        with self._cond:
            return self._devices, self._health, self._topology

    def counts(self) -> tuple[int, int]:
        """(healthy, unhealthy) devices as last advertised."""
        with self._cond:
            healthy = sum(1 for d in self._devices.devices if self._health.get(d.id, False))
            return healthy, len(self._devices) - healthy

    def allocations(self) -> dict[str, int]:
        with self._cond:
            return dict(self._allocations)

    def count_allocation(self, result: str) -> None:
        with self._cond:
            self._allocations[result] += 1

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_newer(self, seen: int, done: Callable[[], bool]) -> tuple[int, pb.ListAndWatchResponse] | None:
        """Block until a version newer than `seen` exists (return it) or `done()` (return None)."""
        with self._cond:
            while self._version == seen:
                if done():
                    return None
                self._cond.wait(_STREAM_RECHECK_S)
            if done():
                return None
            return self._version, self._message


def _device_pb(device_id: str, healthy: bool, numa: int | None) -> pb.Device:
    dev = pb.Device(ID=device_id, health=HEALTHY if healthy else UNHEALTHY)
    if numa is not None:
        dev.topology.nodes.append(pb.NUMANode(ID=numa))
    return dev


class DevicePluginServicer:
    """The five DevicePlugin RPCs for one resource (one instance per server generation)."""

    def __init__(
        self, state: ResourceState, config: DevicePluginConfig, inventory: Callable[[], Inventory] | None = None
    ) -> None:
        self._state = state
        self._config = config
        self._options = config.allocate_options()
        # Allocate needs minors, indices and MIG instance ids, which the advertised devices do not carry.
        self._inventory = inventory or (lambda: Inventory(driver_version="", gpus=()))
        self._specs = cdi.spec_index(config.cdi_spec_dirs) if self._options.any_cdi else None
        self._minors_logged: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._closed = False
        self._streams: list[threading.Event] = []  # open streams, oldest first; set() ends one

    def close(self) -> None:
        """End this generation's streams (the server is being replaced or stopped)."""
        with self._lock:
            self._closed = True
        self._state.wake()

    def GetDevicePluginOptions(self, request: pb.Empty, context: Any) -> pb.DevicePluginOptions:
        return OPTIONS

    def ListAndWatch(self, request: pb.Empty, context: Any) -> Iterator[pb.ListAndWatchResponse]:
        ended = threading.Event()
        with self._lock:
            if self._closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{self._state.name}: plugin shutting down")
            superseded = self._streams[: max(0, len(self._streams) - _MAX_STREAMS + 1)]
            self._streams.append(ended)
        for old in superseded:  # the newest stream is the kubelet's current one: end the oldest instead
            log.warning("device plugin ListAndWatch: too many streams, ending the oldest", resource=self._state.name)
            old.set()
        if superseded:
            self._state.wake()
        self._state.stream_opened()
        # A cancelled stream (kubelet gone) must not wait for the next health change to free its thread.
        context.add_callback(self._state.wake)
        log.info("device plugin ListAndWatch opened", resource=self._state.name)
        try:
            seen = 0
            while True:
                nxt = self._state.wait_newer(seen, lambda: self._closed or ended.is_set() or not context.is_active())
                if nxt is None:
                    return
                seen, message = nxt
                yield message
        finally:
            with self._lock:
                self._streams.remove(ended)
            self._state.stream_closed()
            log.info("device plugin ListAndWatch closed", resource=self._state.name)

    def GetPreferredAllocation(
        self, request: pb.PreferredAllocationRequest, context: Any
    ) -> pb.PreferredAllocationResponse:
        devices, _, topology = self._state.snapshot()
        response = pb.PreferredAllocationResponse()
        for req in request.container_requests:
            ids = preferred_allocation(
                devices, topology, list(req.available_deviceIDs), list(req.must_include_deviceIDs), req.allocation_size
            )
            response.container_responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=ids))
        return response

    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        devices, health, _ = self._state.snapshot()
        response = pb.AllocateResponse()
        for req in request.container_requests:
            ids = list(req.devices_ids)
            unknown = [i for i in ids if i not in devices.by_id]
            if unknown:
                self._state.count_allocation(RESULT_UNKNOWN)
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{self._state.name}: unknown device IDs: {', '.join(unknown)}"
                )
            unhealthy = [i for i in ids if not health.get(i, False)]
            if unhealthy:
                self._state.count_allocation(RESULT_UNHEALTHY)
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{self._state.name}: devices are unhealthy (fenced): {', '.join(unhealthy)}",
                )
            # Replicas of one GPU map to the same UUID: the container sees that GPU once.
            uuids = list(dict.fromkeys(devices.by_id[i].uuid for i in ids))
            try:
                targets = targets_for(self._inventory(), uuids)
                if self._specs is not None:
                    self._check_cdi_specs(targets)
                container = container_response(targets, self._options, mig_minors=self._mig_minors)
            except AllocateError as exc:
                # Fail admission with the reason rather than hand the runtime names or nodes it cannot
                # resolve: the container would fail later with a far less telling error.
                log.error("device plugin Allocate refused", resource=self._state.name, error=str(exc))
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self._state.name}: {exc}")
            response.container_responses.append(container)
        self._state.count_allocation(RESULT_SUCCESS)
        return response

    def _check_cdi_specs(self, targets: list[Target]) -> None:
        assert self._specs is not None
        names = cdi_names(runtime_ids(targets, self._options.id_strategy), self._options.cdi_kind)
        missing = self._specs.missing(names)
        if missing:
            where = ", ".join(self._specs.dirs)
            hint = (
                f"it is regenerated into {self._config.cdi_spec_file} on inventory changes; see the log"
                if self._config.generates_cdi_spec
                else "generate one, e.g. with nvidia-ctk cdi generate"
            )
            raise AllocateError(f"no CDI spec in {where} defines {', '.join(missing)} ({hint})")

    def _mig_minors(self) -> MigMinors:
        table = read_mig_minors(self._config.mig_minors_file)
        if table.problems and table.problems != self._minors_logged:
            self._minors_logged = table.problems  # once per distinct content, not per Allocate
            log.warning("MIG minors file has unusable lines", path=table.source, problems=list(table.problems))
        return table

    def PreStartContainer(self, request: pb.PreStartContainerRequest, context: Any) -> pb.PreStartContainerResponse:
        # pre_start_required is false: the kubelet never calls this; answer anyway for completeness.
        return pb.PreStartContainerResponse()


class PluginServer:
    """One gRPC server generation on `path`. A kubelet restart deletes the socket: then the manager
    stops this generation and starts a new one (a unix listener cannot be re-attached to a new file)."""

    def __init__(
        self,
        state: ResourceState,
        path: str,
        config: DevicePluginConfig,
        inventory: Callable[[], Inventory] | None = None,
    ) -> None:
        self.path = path
        self._state = state
        self._servicer = DevicePluginServicer(state, config, inventory)
        self._grpc = UnixSocketServer(
            path,
            lambda server: pb_grpc.add_DevicePluginServicer_to_server(self._servicer, server),
            workers=_WORKERS,
            thread_prefix="dp-grpc",
            max_message=_MAX_MESSAGE,
        )

    def start(self) -> None:
        self._grpc.start()

    def socket_ok(self) -> bool:
        """True while serving and our listener's socket file is still the one in the directory."""
        return self._grpc.socket_ok()

    def stop(self) -> None:
        self._servicer.close()
        self._grpc.stop()
