"""Pod attribution settings (`PodMappingConfig`): what the worker and the mapping function read."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from exporter.config import DEFAULTS, GpuIdType, SharedGpus


@dataclass(frozen=True)
class PodMappingConfig:
    """Pod attribution settings; the CLI flags map 1:1 onto these fields."""

    socket_path: str = DEFAULTS.pod_resources_socket  # --pod-resources-kubelet-socket
    gpu_id_type: GpuIdType = DEFAULTS.kubernetes_gpu_id_type  # --kubernetes-gpu-id-type (both forms are recognised)
    resource_names: tuple[str, ...] = ()  # --nvidia-resource-names, in addition to the NVIDIA defaults
    shared_mode: SharedGpus = DEFAULTS.kubernetes_shared_gpus  # --kubernetes-shared-gpus
    enable_pod_uid: bool = False  # --kubernetes-enable-pod-uid
    enable_pod_labels: bool = False  # --kubernetes-enable-pod-labels
    pod_labels_allowlist: str | None = None  # --kubernetes-pod-labels-allowlist (full match on the key)
    dra: bool = False  # --kubernetes-dra
    process_metrics: bool = False  # --process-metrics other than off: GPU processes named by the pod watch
    kubeconfig: str | None = None  # --kubeconfig; None: in-cluster, then ~/.kube/config
    node_name: str | None = None  # None: env NODE_NAME
    kubelet_timeout_s: float = 10.0
    watch_timeout_s: int = 300

    def __post_init__(self) -> None:
        if self.gpu_id_type not in ("uid", "device-name"):
            raise ValueError(f"gpu id type must be uid or device-name, not {self.gpu_id_type!r}")
        if self.shared_mode not in ("per-pod", "first-pod"):
            raise ValueError(f"shared GPU mode must be per-pod or first-pod, not {self.shared_mode!r}")
        if self.pod_labels_allowlist is not None:
            re.compile(self.pod_labels_allowlist)  # fail at start-up, not in the worker

    @property
    def needs_pod_metadata(self) -> bool:
        return self.enable_pod_uid or self.enable_pod_labels

    @property
    def needs_pod_watch(self) -> bool:
        return self.needs_pod_metadata or self.process_metrics

    def resolved_node_name(self) -> str | None:
        return self.node_name or os.environ.get("NODE_NAME") or None
