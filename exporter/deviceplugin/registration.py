"""Registering with the kubelet, and noticing when the kubelet restarts."""

from __future__ import annotations

import os

import grpc

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2_grpc as pb_grpc
from exporter.deviceplugin.server import OPTIONS

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
# At least 15 s: inside Register the kubelet dials our socket back and calls GetDevicePluginOptions.
REGISTER_TIMEOUT_S = 15.0

KubeletIdentity = tuple[int, int, int]


def kubelet_identity(plugin_dir: str) -> KubeletIdentity | None:
    """Identifies the current kubelet.sock file, or None when there is none.

    A restarted kubelet creates a new socket file. The inode number alone can be reused at once by the
    filesystem, so the change time goes into the identity as well.
    """
    try:
        st = os.stat(os.path.join(plugin_dir, KUBELET_SOCKET))
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


def register(plugin_dir: str, endpoint: str, resource_name: str, timeout: float = REGISTER_TIMEOUT_S) -> None:
    """Call Registration.Register; raises grpc.RpcError when the kubelet is not (yet) answering."""
    target = f"unix://{os.path.join(plugin_dir, KUBELET_SOCKET)}"
    # Recent grpcio sends the percent-encoded socket path as :authority unless told otherwise.
    with grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")]) as channel:
        pb_grpc.RegistrationStub(channel).Register(
            pb.RegisterRequest(version=API_VERSION, endpoint=endpoint, resource_name=resource_name, options=OPTIONS),
            timeout=timeout,
        )
