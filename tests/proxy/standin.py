"""A stand-in for NVIDIA's k8s-device-plugin, as far as the proxy can tell: real gRPC on unix sockets.

What it copies from internal/plugin/server.go and cmd/nvidia-device-plugin/main.go:
- serves `nvidia-<name>.sock` in its plugin directory, then calls Register on `<dir>/kubelet.sock`
  with GetPreferredAllocationAvailable (no deadline on Register; a failed start is retried later);
- its ListAndWatch sends the whole list at once and again on each health change;
- it watches the directory and restarts (a new socket, a new Register) when kubelet.sock is created;
  NVIDIA's uses fsnotify, this one polls the file's identity every 20 ms.
Allocate answers with a recognisable response (an env naming the devices and a serial number, a
mount, a device spec, an annotation, a CDI device), so a test can compare bytes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2_grpc as pb_grpc

OPTIONS = pb.DevicePluginOptions(get_preferred_allocation_available=True)
_RETRY_S = 0.3  # NVIDIA's plugin retries a failed start after 30 s; tests need it sooner


def _deadline(context: Any) -> float | None:
    """The caller's time left; None for no deadline (grpc reports that as about 9e18 s)."""
    remaining: float | None = context.time_remaining()
    return None if remaining is None or remaining > 1e9 else remaining


def allocate_response(request: pb.AllocateRequest, serial: int) -> pb.AllocateResponse:
    response = pb.AllocateResponse()
    for req in request.container_requests:
        ids = ",".join(req.devices_ids)
        c = response.container_responses.add()
        c.envs["NVIDIA_VISIBLE_DEVICES"] = ids
        c.envs["STANDIN_SERIAL"] = str(serial)
        c.mounts.add(container_path="/var/run/nvidia-container-devices/x", host_path="/dev/null", read_only=True)
        c.devices.add(container_path="/dev/nvidia0", host_path="/dev/nvidia0", permissions="rw")
        c.annotations["cdi.k8s.io/standin"] = f"k8s.device-plugin.nvidia.com/gpu={ids}"
        c.cdi_devices.add(name=f"k8s.device-plugin.nvidia.com/gpu={ids}")
    return response


class StandInPlugin:
    def __init__(
        self,
        plugin_dir: str,
        devices: list[str],
        resource: str = "nvidia.com/gpu",
        numa: int | None = 0,
        options: pb.DevicePluginOptions = OPTIONS,
    ) -> None:
        self.plugin_dir = plugin_dir
        self.resource = resource
        self.endpoint = f"nvidia-{resource.rsplit('/', 1)[-1]}.sock"
        self.path = os.path.join(plugin_dir, self.endpoint)
        self.kubelet_socket = os.path.join(plugin_dir, "kubelet.sock")
        self.options = options
        self._devices = list(devices)
        self._numa = numa
        self._cond = threading.Condition()
        self._unhealthy: set[str] = set()
        self._version = 0
        self._server: Any = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.registered = threading.Event()
        self.registrations = 0
        self.starts = 0
        self.allocations: list[tuple[bytes, bytes]] = []  # (request bytes, response bytes)
        self.preferred_requests: list[pb.PreferredAllocationRequest] = []
        self.prestarts = 0
        self.deadlines: list[float | None] = []  # time_remaining() of each unary call
        self.allocate_error: tuple[grpc.StatusCode, str] | None = None
        self.allocate_delay_s = 0.0

    # --- what the kubelet (through the proxy) sees ---
    def _message(self) -> pb.ListAndWatchResponse:
        out = pb.ListAndWatchResponse()
        for d in self._devices:
            dev = out.devices.add(ID=d, health="Unhealthy" if d in self._unhealthy else "Healthy")
            if self._numa is not None:
                dev.topology.nodes.add(ID=self._numa)
        return out

    def mark_unhealthy(self, device_id: str) -> None:
        """What NVIDIA's health check does on a critical XID (no way back short of a restart)."""
        with self._cond:
            self._unhealthy.add(device_id)
            self._version += 1
            self._cond.notify_all()

    # --- DevicePlugin service ---
    def GetDevicePluginOptions(self, request: pb.Empty, context: Any) -> pb.DevicePluginOptions:
        self.deadlines.append(_deadline(context))
        return self.options

    def ListAndWatch(self, request: pb.Empty, context: Any) -> Iterator[pb.ListAndWatchResponse]:
        server = self._server
        seen = -1
        while context.is_active() and self._server is server and server is not None:
            with self._cond:
                if self._version == seen:
                    self._cond.wait(0.05)
                    continue
                seen, message = self._version, self._message()
            yield message

    def GetPreferredAllocation(
        self, request: pb.PreferredAllocationRequest, context: Any
    ) -> pb.PreferredAllocationResponse:
        self.preferred_requests.append(request)
        self.deadlines.append(_deadline(context))
        response = pb.PreferredAllocationResponse()
        for req in request.container_requests:
            ids = list(req.must_include_deviceIDs)
            ids += [i for i in req.available_deviceIDs if i not in ids][: max(0, req.allocation_size - len(ids))]
            response.container_responses.add(deviceIDs=ids)
        return response

    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        self.deadlines.append(_deadline(context))
        if self.allocate_delay_s:
            time.sleep(self.allocate_delay_s)  # a slow plugin: the caller's deadline must apply
        if self.allocate_error is not None:
            context.abort(*self.allocate_error)
        response = allocate_response(request, len(self.allocations) + 1)
        self.allocations.append((request.SerializeToString(), response.SerializeToString()))
        return response

    def PreStartContainer(self, request: pb.PreStartContainerRequest, context: Any) -> pb.PreStartContainerResponse:
        self.prestarts += 1
        return pb.PreStartContainerResponse()

    # --- lifecycle, as cmd/nvidia-device-plugin/main.go runs it ---
    def start(self) -> StandInPlugin:
        self._stop.clear()
        self._start_plugin()
        self._watcher = threading.Thread(target=self._watch, name="standin-watch", daemon=True)
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        self._stop_plugin()

    def restart(self) -> None:
        """The plugin's container restarts: a new server, health rechecked from scratch."""
        self.stop()
        with self._cond:
            self._unhealthy.clear()
            self._version += 1
        self.start()

    def _start_plugin(self) -> bool:
        self.starts += 1
        self.registered.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_DevicePluginServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.path}")
        server.start()
        self._server = server
        try:
            with grpc.insecure_channel(
                f"unix://{self.kubelet_socket}", options=[("grpc.default_authority", "localhost")]
            ) as channel:
                pb_grpc.RegistrationStub(channel).Register(
                    pb.RegisterRequest(
                        version="v1beta1", endpoint=self.endpoint, resource_name=self.resource, options=self.options
                    ),
                    timeout=5,
                )
        except grpc.RpcError:
            self._stop_plugin()  # like NVIDIA's: Stop on a failed Register, retry the whole start later
            return False
        self.registrations += 1
        self.registered.set()
        return True

    def _stop_plugin(self) -> None:
        server, self._server = self._server, None
        with self._cond:
            self._cond.notify_all()
        if server is not None:
            server.stop(grace=None).wait(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.kubelet_socket)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_ctime_ns)

    def _watch(self) -> None:
        seen = self._identity()
        retry_at = None if self._server is not None else time.monotonic() + _RETRY_S
        while not self._stop.wait(0.02):
            now = self._identity()
            created = now is not None and now != seen
            seen = now
            if created or (retry_at is not None and time.monotonic() >= retry_at):
                self._stop_plugin()
                retry_at = None if self._start_plugin() else time.monotonic() + _RETRY_S
