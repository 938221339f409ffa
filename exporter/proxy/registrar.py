"""The kubelet's Registration API as the upstream plugin sees it: served at `<upstream dir>/kubelet.sock`.

NVIDIA's plugin runs with that host directory mounted as its /var/lib/kubelet/device-plugins, serves
`nvidia-<name>.sock` there and calls Register here. Like the kubelet we check the request, answer at
once and dial the plugin back afterwards (the `on_register` callback does that in its own thread).

`recreate()` binds a new socket file: NVIDIA's plugin watches the directory with fsnotify and restarts
its plugins, registering again, when kubelet.sock is created (cmd/nvidia-device-plugin/main.go). The
proxy does that when it starts and when the real kubelet restarts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import structlog

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2_grpc as pb_grpc
from exporter.deviceplugin.config import MAX_SOCKET_PATH, validate_resource_name
from exporter.deviceplugin.registration import API_VERSION, KUBELET_SOCKET

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
        self._server: Any = None
        self._inode: tuple[int, int] | None = None
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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="proxy-reg"))
        pb_grpc.add_RegistrationServicer_to_server(self, server)
        try:
            bound = server.add_insecure_port(f"unix://{self.path}")
        except RuntimeError:  # recent grpcio raises instead of returning 0
            bound = 0
        if not bound:
            raise OSError(f"cannot listen on {self.path}")
        server.start()
        self._server = server
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        log.info("registration socket created", path=self.path)

    def socket_ok(self) -> bool:
        """Serving, and the kubelet.sock in the directory is still our listener's."""
        return self._server is not None and self._file_is_ours()

    def _file_is_ours(self) -> bool:
        if self._inode is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait(5)
        if self._file_is_ours():  # a file someone else created since is left alone
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._inode = None
