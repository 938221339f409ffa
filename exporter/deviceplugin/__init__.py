"""Kubelet device plugin (API v1beta1) that advertises GPUs with the health engine's verdicts.

Replaces NVIDIA's k8s-device-plugin on a node; see docs/device-plugin.md.
"""

from exporter.deviceplugin.config import DevicePluginConfig
from exporter.deviceplugin.manager import DevicePluginManager

__all__ = ["DevicePluginConfig", "DevicePluginManager"]
