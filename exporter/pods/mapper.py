"""Pod attribution: which container uses which GPU / MIG device, from the kubelet.

The collection loop calls `refresh(inventory)` once per cycle; that only wakes a background
worker, so a slow or dead kubelet never delays collection. The worker calls PodResources List
(+ GetAllocatableResources), resolves device IDs against the inventory and publishes an
immutable mapping that `labels_for` and `render_metrics` read without locks or I/O.
The last good mapping stays in use while the kubelet is unreachable; its age is exported.

The mapping itself is `exporter.pods.attribution.attribute` (pure), the families and their text
`exporter.pods.expose`, pod label names `exporter.pods.podlabels`; this module is the worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from exporter.labels import RenderContext
from exporter.model import Inventory
from exporter.pods.attribution import Attribution, DeviceResources, LabelSet, attribute
from exporter.pods.deviceids import DeviceIndex
from exporter.pods.expose import render_pods
from exporter.pods.kube import (
    PodMeta,
    Reflector,
    SliceDevices,
    dra_device_index,
    make_api_client,
    pod_reflector,
    resource_slice_reflector,
)
from exporter.pods.settings import PodMappingConfig
from podresources.client import (
    AllocatableResources,
    BackingOffError,
    PodResources,
    PodResourcesClient,
    PodResourcesError,
)

__all__ = ["PodMapper", "PodMappingConfig", "PodRef"]

log = structlog.get_logger("exporter.pods")
_API_FEATURES = "pod labels, pod UIDs, DRA, pod names of GPU processes"


@dataclass(frozen=True)
class PodRef:
    """A pod holding a device, as the kubelet reports it; `uid` only where the pod watch knows it."""

    namespace: str
    name: str
    uid: str = ""


@dataclass(frozen=True)
class _Mapping:
    """What the worker publishes: one attribution and when its kubelet reply arrived."""

    attribution: Attribution
    built_at: float


class PodMapper:
    """Implements PodAttribution (labels_for) and the contributor protocol (render_metrics)."""

    metrics_part = "pods"  # the part label of gpuhealth_render_success

    def __init__(
        self,
        config: PodMappingConfig,
        *,
        client: PodResourcesClient | None = None,
        api_client_factory: Callable[[str | None], Any] = make_api_client,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._client = client or PodResourcesClient(config.socket_path, timeout_s=config.kubelet_timeout_s)
        self._api_client_factory = api_client_factory
        self._clock = clock
        self._mapping: _Mapping | None = None
        self._refresh_ok = False
        self._cond = threading.Condition()
        self._pending: Inventory | None = None
        self._busy = False
        self._stopped = False
        self._worker: threading.Thread | None = None
        self._pods_reflector: Reflector[PodMeta] | None = None
        self._slices_reflector: Reflector[SliceDevices] | None = None
        # Worker-thread state (only the worker touches these).
        self._index: DeviceIndex | None = None
        self._last_pods: list[PodResources] | None = None
        self._last_alloc: AllocatableResources | None = None
        self._device_resources: DeviceResources = {}
        self._last_error: str | None = None

    # ------------------------------------------------------------------ collection-loop side

    def refresh(self, inventory: Inventory) -> None:
        """Ask for a new mapping; returns at once. Calls made while one is in flight coalesce."""
        with self._cond:
            if self._stopped:
                return
            self._pending = inventory
            if self._worker is None:
                self._start()
            self._cond.notify_all()

    def labels_for(self, gpu_uuid: str, gpu_instance_id: int | None) -> tuple[LabelSet, ...]:
        mapping = self._mapping
        if mapping is None:
            return ()
        return mapping.attribution.labels_for(gpu_uuid, gpu_instance_id)

    def render_metrics(self, ctx: RenderContext) -> str:
        mapping = self._mapping
        return render_pods(
            ctx,
            refresh_ok=self._refresh_ok,
            request_counts=self._client.request_counts(),
            attribution=mapping.attribution if mapping is not None else None,
            age_s=max(0.0, self._clock() - mapping.built_at) if mapping is not None else 0.0,
        )

    def holders(self, uuid: str) -> tuple[PodRef, ...]:
        """The pods holding this GPU (or any MIG device on it) or this MIG device, from the last mapping.

        Sorted by (namespace, name); empty before the first kubelet reply. Reads no I/O."""
        mapping = self._mapping
        if mapping is None:
            return ()
        index = mapping.attribution.index
        gpu = index.gpus.get(uuid)
        wanted = {uuid, *(m.uuid for m in gpu.migs)} if gpu is not None else {uuid}
        meta = self._pods_reflector.snapshot()[1] if self._pods_reflector is not None else {}
        pods = {(ns, pod) for dev, _res, ns, pod, _c in mapping.attribution.allocation if pod and dev in wanted}
        return tuple(
            PodRef(ns, pod, pm.uid if (pm := meta.get((ns, pod))) is not None else "") for ns, pod in sorted(pods)
        )

    def pod_items(self) -> tuple[int, dict[Any, PodMeta]] | None:
        """The pod watch's (version, (namespace, name) -> PodMeta); None while no watch runs (none is
        wanted, NODE_NAME unset, no API access). Reads no I/O."""
        reflector = self._pods_reflector
        return reflector.snapshot() if reflector is not None else None

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no refresh is pending or running (for tests and orderly shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for r in (self._pods_reflector, self._slices_reflector):
            if r is not None:
                r.stop()
        if self._worker is not None:
            self._worker.join(timeout_s)
        for r in (self._pods_reflector, self._slices_reflector):
            if r is not None:
                r.join(timeout_s)
        self._client.close()

    # ------------------------------------------------------------------ worker

    def _start(self) -> None:
        self._start_kube()
        self._worker = threading.Thread(target=self._run, name="pod-mapper", daemon=True)
        self._worker.start()

    def _start_kube(self) -> None:
        if not (self.config.needs_pod_watch or self.config.dra):
            return
        node = self.config.resolved_node_name()
        if node is None:
            # Watching every pod of the cluster from every node would hurt the API server.
            log.warning("pod_api_features_disabled", reason="NODE_NAME is not set", disabled=_API_FEATURES)
            return
        try:
            api = self._api_client_factory(self.config.kubeconfig)
        except Exception as err:
            log.warning(
                "pod_api_features_disabled",
                reason="no Kubernetes API access",
                error=str(err),
                disabled=_API_FEATURES,
            )
            return
        kw = {"watch_timeout_s": self.config.watch_timeout_s}
        if self.config.needs_pod_watch:
            self._pods_reflector = pod_reflector(api, node, **kw)
            self._pods_reflector.start()
        if self.config.dra:
            self._slices_reflector = resource_slice_reflector(api, node, **kw)
            self._slices_reflector.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopped:
                    self._cond.wait()
                inventory = self._pending
                if self._stopped or inventory is None:
                    return
                self._pending = None
                self._busy = True
            try:
                self._refresh_once(inventory)
            except Exception:  # never let one bad reply kill attribution for good
                log.exception("pod_mapping_refresh_failed")
                self._refresh_ok = False
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _refresh_once(self, inventory: Inventory) -> None:
        layout = inventory.layout_key()
        if self._index is None or self._index.layout != layout:
            self._index = DeviceIndex(inventory)
            self._device_resources = {}
        try:
            pods = self._client.list()
        except BackingOffError:
            self._rebuild_if_stale()
            return
        except PodResourcesError as err:
            self._refresh_ok = False
            self._log_error(f"kubelet PodResources List failed: {err}")
            self._rebuild_if_stale()
            return
        try:
            self._last_alloc = self._client.get_allocatable_resources()
        except PodResourcesError as err:
            # Health view stays as last seen; attribution itself worked.
            self._log_error(f"kubelet GetAllocatableResources failed: {err}")
        self._last_pods = pods
        self._refresh_ok = True
        if self._last_error is not None:
            log.info("kubelet_reachable_again")
            self._last_error = None
        self._mapping = self._build(self._index, pods, self._last_alloc)

    def _rebuild_if_stale(self) -> None:
        """Kubelet unreachable: keep the last pods, but re-resolve them if the GPU layout changed."""
        mapping = self._mapping
        if mapping is not None and self._index is not None and mapping.attribution.index is not self._index:
            self._mapping = self._build(self._index, self._last_pods or [], self._last_alloc, mapping.built_at)

    def _log_error(self, msg: str) -> None:
        # Log on change only: a dead kubelet would otherwise log every cycle.
        if msg != self._last_error:
            log.warning("pod_mapping_refresh_failed", error=msg, keeping="last good mapping")
            self._last_error = msg

    def _build(
        self,
        index: DeviceIndex,
        pods: Iterable[PodResources],
        alloc: AllocatableResources | None,
        built_at: float | None = None,
    ) -> _Mapping:
        config = self.config
        dra = (
            dra_device_index(self._slices_reflector.snapshot()[1].values())
            if self._slices_reflector is not None
            else None
        )
        meta = self._pods_reflector.snapshot()[1] if self._pods_reflector is not None else None
        attribution = attribute(
            index,
            pods,
            alloc,
            config,
            pod_meta=meta if config.needs_pod_metadata else None,
            dra_devices=dra if config.dra else None,
            device_resources=self._device_resources,
        )
        self._device_resources = attribution.device_resources
        return _Mapping(attribution, self._clock() if built_at is None else built_at)
