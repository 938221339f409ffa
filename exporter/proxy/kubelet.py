"""Registering a proxied resource with the real kubelet, with the upstream's own options."""

from __future__ import annotations

import os
import socket

import grpc

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2_grpc as pb_grpc
from exporter.deviceplugin.registration import API_VERSION, KUBELET_SOCKET, REGISTER_TIMEOUT_S


def register(
    plugin_dir: str,
    endpoint: str,
    resource_name: str,
    options: pb.DevicePluginOptions,
    timeout: float = REGISTER_TIMEOUT_S,
) -> None:
    """Registration.Register on `<plugin_dir>/kubelet.sock`; raises grpc.RpcError when it fails.

    (exporter.deviceplugin.registration.register sends our own plugin's options; here they are the
    upstream's, so the kubelet sees that plugin.)"""
    target = f"unix://{os.path.join(plugin_dir, KUBELET_SOCKET)}"
    with grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")]) as channel:
        pb_grpc.RegistrationStub(channel).Register(
            pb.RegisterRequest(version=API_VERSION, endpoint=endpoint, resource_name=resource_name, options=options),
            timeout=timeout,
        )


def answers(path: str) -> bool:
    """Whether something accepts connections on the unix socket `path` (a leftover file does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True
