"""A fake kubelet device manager: a real gRPC Registration server on `<dir>/kubelet.sock`.

Built from the same proto as the plugin. Like the real kubelet, on Register it dials the plugin's
socket back (authority "localhost"), calls GetDevicePluginOptions, opens ListAndWatch and records every
message; the latest message per resource gives capacity (all devices) and allocatable (Healthy ones).
A second registration of a resource replaces the first (its stream is cancelled). `restart()` does what
a kubelet restart does to the directory: delete every socket in it, then create a new kubelet.sock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2_grpc as pb_grpc

CHECKPOINT = "kubelet_internal_checkpoint"


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() when the message arrived
    devices: tuple[tuple[str, str, tuple[int, ...]], ...]  # (ID, health, NUMA nodes)

    @property
    def healthy(self) -> set[str]:
        return {d for d, h, _ in self.devices if h == "Healthy"}

    @property
    def ids(self) -> set[str]:
        return {d for d, _, _ in self.devices}

    def health_of(self, device_id: str) -> str:
        for d, h, _ in self.devices:
            if d == device_id:
                return h
        raise KeyError(device_id)


@dataclass
class _Endpoint:
    resource: str
    endpoint: str
    channel: Any
    stream: Any = None
    options: Any = None
    messages: list[Received] = field(default_factory=list)


class FakeKubelet:
    def __init__(self, plugin_dir: str) -> None:
        self.plugin_dir = plugin_dir
        self.socket = os.path.join(plugin_dir, "kubelet.sock")
        self._cond = threading.Condition()
        self._server: Any = None
        self._endpoints: dict[str, _Endpoint] = {}
        self.registrations: list[tuple[float, Any]] = []  # (time.monotonic(), RegisterRequest)
        self.errors: list[str] = []
        self.ended: dict[str, int] = {}  # resource -> streams the plugin ended cleanly

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeKubelet:
        os.makedirs(self.plugin_dir, exist_ok=True)
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RegistrationServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        with self._cond:
            endpoints = list(self._endpoints.values())
            self._endpoints.clear()
        for ep in endpoints:
            self._close(ep)
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None
        if os.path.exists(self.socket):
            os.unlink(self.socket)

    def restart(self) -> None:
        """Kubelet restart: connections drop, every socket in the dir is deleted, a new kubelet.sock appears."""
        self.stop()
        for name in os.listdir(self.plugin_dir):
            if name != CHECKPOINT:
                os.unlink(os.path.join(self.plugin_dir, name))
        with self._cond:
            self.registrations.clear()
        self.start()

    # --- Registration service -------------------------------------------------------------------

    def Register(self, request: Any, context: Any) -> Any:
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported version {request.version}")
        path = os.path.join(self.plugin_dir, request.endpoint)
        if os.sep in request.endpoint or not os.path.exists(path):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"endpoint {request.endpoint} is not a socket in the dir")
        with self._cond:
            self.registrations.append((time.monotonic(), request))
        # The real kubelet also answers Register first and connects back asynchronously.
        threading.Thread(target=self._run_client, args=(request,), daemon=True).start()
        return pb.Empty()

    def _run_client(self, request: Any) -> None:
        channel = grpc.insecure_channel(
            f"unix://{os.path.join(self.plugin_dir, request.endpoint)}",
            options=[("grpc.default_authority", "localhost")],
        )
        ep = _Endpoint(request.resource_name, request.endpoint, channel)
        with self._cond:
            old = self._endpoints.get(request.resource_name)
            self._endpoints[request.resource_name] = ep
        if old is not None:
            self._close(old)
        stub = pb_grpc.DevicePluginStub(channel)
        try:
            ep.options = stub.GetDevicePluginOptions(pb.Empty(), timeout=10)
            ep.stream = stub.ListAndWatch(pb.Empty())
            for msg in ep.stream:
                rec = Received(
                    time.monotonic(),
                    tuple((d.ID, d.health, tuple(n.ID for n in d.topology.nodes)) for d in msg.devices),
                )
                with self._cond:
                    ep.messages.append(rec)
                    self._cond.notify_all()
            with self._cond:  # the plugin ended the stream (the real kubelet then stops the endpoint)
                self.ended[request.resource_name] = self.ended.get(request.resource_name, 0) + 1
                self._cond.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                with self._cond:
                    self.errors.append(f"{request.resource_name}: {exc.code()} {exc.details()}")
                    self._cond.notify_all()

    def drop_streams(self, resource: str) -> None:
        """Stop reading a plugin's stream without restarting (what a kubelet does to an endpoint it stops)."""
        with self._cond:
            ep = self._endpoints.get(resource)
        if ep is not None and ep.stream is not None:
            ep.stream.cancel()

    @staticmethod
    def _close(ep: _Endpoint) -> None:
        if ep.stream is not None:
            ep.stream.cancel()
        ep.channel.close()

    # --- what the kubelet knows -------------------------------------------------------------------

    def resources(self) -> set[str]:
        with self._cond:
            return set(self._endpoints)

    def messages(self, resource: str) -> list[Received]:
        with self._cond:
            ep = self._endpoints.get(resource)
            return list(ep.messages) if ep else []

    def latest(self, resource: str) -> Received | None:
        msgs = self.messages(resource)
        return msgs[-1] if msgs else None

    def capacity(self, resource: str) -> int:
        last = self.latest(resource)
        return len(last.devices) if last else 0

    def allocatable(self, resource: str) -> int:
        last = self.latest(resource)
        return len(last.healthy) if last else 0

    def options(self, resource: str) -> Any:
        with self._cond:
            return self._endpoints[resource].options

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def stub(self, resource: str) -> Any:
        """A DevicePlugin client on the registered endpoint of `resource` (Allocate etc.)."""
        with self._cond:
            return pb_grpc.DevicePluginStub(self._endpoints[resource].channel)


@contextlib.contextmanager
def running_kubelet() -> Iterator[FakeKubelet]:
    """A started fake kubelet in its own short /tmp directory (unix socket paths are limited to 107
    bytes); stopped and removed afterwards."""
    plugin_dir = tempfile.mkdtemp(prefix="ghe-dp-", dir="/tmp")
    kubelet = FakeKubelet(plugin_dir).start()
    try:
        yield kubelet
    finally:
        kubelet.stop()
        shutil.rmtree(plugin_dir, ignore_errors=True)
