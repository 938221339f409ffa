"""Kubelet PodResources API: our own protos, generated stubs and a small client.

`podresources.client.PodResourcesClient` is the only thing the exporter uses;
it returns plain dataclasses so nothing above it depends on protobuf types.
"""
