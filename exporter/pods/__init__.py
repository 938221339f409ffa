"""Pod attribution from the kubelet PodResources API (see docs/pod-attribution.md), and who uses how
much of a shared GPU (docs/gpu-share.md).

`PodMapper` is resolved on first use (PEP 562): it imports grpc, which --process-metrics without -k
(exporter.pods.gpushare) must not pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from exporter.pods.mapper import PodMapper, PodMappingConfig

__all__ = ["PodMapper", "PodMappingConfig"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from exporter.pods import mapper

        return getattr(mapper, name)
    raise AttributeError(f"module 'exporter.pods' has no attribute {name!r}")
