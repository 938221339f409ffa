"""Kubelet PodResources API: our own protos, generated stubs and a small client.

`podresources.client.PodResourcesClient` is the only thing the exporter uses;
it returns plain dataclasses so nothing above it depends on protobuf types.
This module imports nothing, so the exporter's configuration can take the default
socket from here without loading grpc.
"""

# Where the kubelet serves the PodResources API.
DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
