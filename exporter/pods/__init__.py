"""Pod attribution from the kubelet PodResources API (see docs/pod-attribution.md)."""

from exporter.pods.mapper import PodMapper, PodMappingConfig

__all__ = ["PodMapper", "PodMappingConfig"]
