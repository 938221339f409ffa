"""The kubelet's Registration API as the upstream plugin sees it: served at `<upstream dir>/kubelet.sock`.

NVIDIA's plugin runs with that host directory mounted as its /var/lib/kubelet/device-plugins, serves
`nvidia-<name>.sock` there and calls Register here. Like the kubelet we check the request, answer at
once and dial the plugin back afterwards (the `on_register` callback does that in its own thread).

`recreate()` binds a new socket file: NVIDIA's plugin watches the directory with fsnotify and restarts
its plugins, registering again, when kubelet.sock is created (cmd/nvidia-device-plugin/main.go). The
proxy does that when it starts and when the real kubelet restarts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc
import structlog

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2_grpc as pb_grpc
from exporter.deviceplugin.config import MAX_SOCKET_PATH, validate_resource_name
from exporter.deviceplugin.registration import API_VERSION, KUBELET_SOCKET
from exporter.deviceplugin.unixgrpc import UnixSocketServer

log = structlog.get_logger(__name__)

# Called with each accepted RegisterRequest; must not block (it starts the dial-back elsewhere).
OnRegister = Callable[[pb.RegisterRequest], None]


def check_request(upstream_dir: str, real_dir: str, request: pb.RegisterRequest) -> str | None:
    """Why the kubelet would refuse this registration (or why the proxy cannot relay it), else None."""
    if request.version != API_VERSION:
        return f"unsupported device plugin API version {request.version!r} (the kubelet speaks {API_VERSION})"
    try:
        validate_resource_name(request.resource_name)
    except ValueError as exc:
        return str(exc)
    endpoint = request.endpoint
    if not endpoint or os.sep in endpoint or endpoint in (".", "..", KUBELET_SOCKET):
        return f"endpoint {endpoint!r} is not a file name in the plugin directory"
    if not os.path.exists(os.path.join(upstream_dir, endpoint)):
        return f"endpoint {endpoint!r}: no such socket in {upstream_dir}"
    relay = os.path.join(real_dir, endpoint)  # the proxy serves the kubelet under the same name
    if len(relay.encode()) > MAX_SOCKET_PATH:
        return f"endpoint {endpoint!r}: {relay} is longer than a unix socket path may be ({MAX_SOCKET_PATH} bytes)"
    return None


class RegistrationServer:
    """gRPC Registration service on `<upstream dir>/kubelet.sock`; one server generation per socket file."""

    def __init__(self, upstream_dir: str, real_dir: str, on_register: OnRegister) -> None:
        self.upstream_dir = upstream_dir
        self.path = os.path.join(upstream_dir, KUBELET_SOCKET)
        self._real_dir = real_dir
        self._on_register = on_register
        self._grpc: UnixSocketServer | None = None
        self.registrations = 0
        self.refused = 0

    def Register(self, request: pb.RegisterRequest, context: Any) -> pb.Empty:
        problem = check_request(self.upstream_dir, self._real_dir, request)
        if problem is not None:
            self.refused += 1
            log.error("upstream registration refused", resource=request.resource_name, problem=problem)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        self.registrations += 1
        log.info("upstream registered", resource=request.resource_name, endpoint=request.endpoint)
        self._on_register(request)
        return pb.Empty()

    def recreate(self) -> None:
        """Serve on a newly created kubelet.sock (the old listener and file go first)."""
        self.stop()
        os.makedirs(self.upstream_dir, exist_ok=True)
        server = UnixSocketServer(
            self.path,
            lambda grpc_server: pb_grpc.add_RegistrationServicer_to_server(self, grpc_server),
            workers=4,
            thread_prefix="proxy-reg",
        )
        server.start()
        self._grpc = server
        log.info("registration socket created", path=self.path)

    def socket_ok(self) -> bool:
        """Serving, and the kubelet.sock in the directory is still our listener's."""
        return self._grpc is not None and self._grpc.socket_ok()

    def stop(self) -> None:
        server, self._grpc = self._grpc, None
        if server is not None:
            server.stop()
