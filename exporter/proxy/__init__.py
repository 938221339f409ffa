"""`gpu-health-exporter device-plugin-proxy`: a health proxy in front of NVIDIA's device plugin.

NVIDIA's plugin registers with the proxy (its kubelet directory is a host directory the proxy
serves); the proxy registers the same resources with the real kubelet and forwards every RPC,
marking fenced GPUs Unhealthy in each device list (docs/device-plugin-proxy.md).
"""
