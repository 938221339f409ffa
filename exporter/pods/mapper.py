"""Pod attribution: which container uses which GPU / MIG device, from the kubelet.

The collection loop calls `refresh(inventory)` once per cycle; that only wakes a background
worker, so a slow or dead kubelet never delays collection. The worker calls PodResources List
(+ GetAllocatableResources), resolves device IDs against the inventory and publishes an
immutable mapping that `labels_for` and `render_metrics` read without locks or I/O.
The last good mapping stays in use while the kubelet is unreachable; its age is exported.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from exporter.config import DEFAULTS, GpuIdType, SharedGpus
from exporter.family import DEVICE_LABELS, Family
from exporter.labels import RenderContext, format_labels
from exporter.model import Inventory
from exporter.pods.deviceids import DeviceIndex, DeviceKey
from exporter.pods.kube import (
    DRA_DRIVER,
    PodMeta,
    Reflector,
    SliceDevices,
    dra_device_index,
    make_api_client,
    pod_reflector,
    resource_slice_reflector,
)
from podresources.client import (
    AllocatableResources,
    BackingOffError,
    PodResources,
    PodResourcesClient,
    PodResourcesError,
)

log = structlog.get_logger("exporter.pods")

LabelSet = tuple[tuple[str, str], ...]

DEFAULT_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared")
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"

# The pods part's families (PodMapper.render_metrics).
REFRESH_SUCCESS = Family(
    "gpuhealth_pod_mapping_refresh_success", "gauge", "1 if the last kubelet PodResources List worked.", "", "pods"
)
MAPPING_AGE = Family("gpuhealth_pod_mapping_age_seconds", "gauge", "Age of the pod mapping in use.", "", "pods")
KUBELET_REQUESTS = Family(
    "gpuhealth_kubelet_requests_total",
    "counter",
    "Kubelet PodResources calls by method and gRPC code.",
    "method, code",
    "pods",
)
ALLOCATION_INFO = Family(
    "gpuhealth_gpu_allocation_info",
    "gauge",
    "1 per device and container it is allocated to; free devices have empty pod, namespace, container.",
    f"{DEVICE_LABELS}, resource, namespace, pod, container",
    "pods",
)
KUBELET_DEVICE_UNHEALTHY = Family(
    "gpuhealth_kubelet_device_unhealthy",
    "gauge",
    "1 if NVML sees the device but the kubelet's allocatable omits it (the kubelet deems it unhealthy).",
    f"{DEVICE_LABELS}, resource",
    "pods",
)
FAMILIES = (REFRESH_SUCCESS, MAPPING_AGE, KUBELET_REQUESTS, ALLOCATION_INFO, KUBELET_DEVICE_UNHEALTHY)

# Pod label keys that would collide with labels already on GPU series (a duplicate label name
# makes the whole scrape invalid), so they are never copied from pod labels.
RESERVED_LABELS = frozenset(
    {
        "gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID", "Hostname",
        "hostname", "DCGM_FI_DRIVER_VERSION", "err_code", "err_msg", "xid", "window_size_in_ms",
        "container", "namespace", "pod", "pod_uid", "vgpu", "resource", "job", "instance",
    }
)  # fmt: skip
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


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

    def resolved_node_name(self) -> str | None:
        return self.node_name or os.environ.get("NODE_NAME") or None


@dataclass(frozen=True)
class _Use:
    """One container's use of one device under one resource."""

    namespace: str
    pod: str
    container: str
    resource: str
    replica: int | None


@dataclass(frozen=True)
class _Mapping:
    index: DeviceIndex
    labels: dict[DeviceKey, tuple[LabelSet, ...]]
    # (label uuid, resource, namespace, pod, container); free devices have empty pod fields
    allocation: tuple[tuple[str, str, str, str, str], ...]
    # (label uuid, resource, 1 unhealthy | 0 listed as allocatable)
    kubelet_health: tuple[tuple[str, str, int], ...]
    built_at: float


def sanitize_label_name(key: str) -> str:
    name = _INVALID_LABEL_CHARS.sub("_", key)
    return f"_{name}" if name[:1].isdigit() else name


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
        self._resources = frozenset(DEFAULT_RESOURCES) | frozenset(config.resource_names)
        self._allowlist = re.compile(config.pod_labels_allowlist) if config.pod_labels_allowlist else None
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
        self._device_resources: dict[DeviceKey, set[str]] = {}
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
        if gpu_instance_id is None and mapping.index.mig_enabled(gpu_uuid):
            # A MIG-enabled GPU's own series describe the whole GPU, shared by every instance's pods.
            return ()
        return mapping.labels.get((gpu_uuid, gpu_instance_id), ())

    def render_metrics(self, ctx: RenderContext) -> str:
        mapping = self._mapping
        out = [REFRESH_SUCCESS.header, REFRESH_SUCCESS.scalar(1 if self._refresh_ok else 0), MAPPING_AGE.header]
        if mapping is not None:
            out.append(MAPPING_AGE.scalar(f"{max(0.0, self._clock() - mapping.built_at):.3f}"))
        out.append(KUBELET_REQUESTS.header)
        for (method, code), n in sorted(self._client.request_counts().items()):
            out.append(KUBELET_REQUESTS.sample(format_labels((("method", method), ("code", code))), n))
        if mapping is None:
            return "".join(out)
        out.append(ALLOCATION_INFO.header)
        for uuid, resource, ns, pod, container in mapping.allocation:
            dev = ctx.device_labels(uuid)
            if dev:
                extra = format_labels(
                    (("resource", resource), ("namespace", ns), ("pod", pod), ("container", container))
                )
                out.append(ALLOCATION_INFO.sample(f"{dev},{extra}", 1))
        out.append(KUBELET_DEVICE_UNHEALTHY.header)
        for uuid, resource, value in mapping.kubelet_health:
            dev = ctx.device_labels(uuid)
            if dev:
                out.append(KUBELET_DEVICE_UNHEALTHY.sample(f"{dev},{format_labels([('resource', resource)])}", value))
        return "".join(out)

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
        if not (self.config.needs_pod_metadata or self.config.dra):
            return
        node = self.config.resolved_node_name()
        if node is None:
            # Watching every pod of the cluster from every node would hurt the API server.
            log.warning(
                "pod_api_features_disabled", reason="NODE_NAME is not set", disabled="pod labels, pod UIDs, DRA"
            )
            return
        try:
            api = self._api_client_factory(self.config.kubeconfig)
        except Exception as err:
            log.warning(
                "pod_api_features_disabled",
                reason="no Kubernetes API access",
                error=str(err),
                disabled="pod labels, pod UIDs, DRA",
            )
            return
        kw = {"watch_timeout_s": self.config.watch_timeout_s}
        if self.config.needs_pod_metadata:
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
        if self._mapping is not None and self._index is not None and self._mapping.index is not self._index:
            self._mapping = self._build(self._index, self._last_pods or [], self._last_alloc, self._mapping.built_at)

    def _log_error(self, msg: str) -> None:
        # Log on change only: a dead kubelet would otherwise log every cycle.
        if msg != self._last_error:
            log.warning("pod_mapping_refresh_failed", error=msg, keeping="last good mapping")
            self._last_error = msg

    def _relevant(self, resource: str) -> bool:
        return resource in self._resources or resource.startswith(MIG_RESOURCE_PREFIX)

    def _pod_metadata(self) -> dict[Any, PodMeta]:
        if self._pods_reflector is None:
            return {}
        return self._pods_reflector.snapshot()[1]

    def _dra_index(self) -> dict[tuple[str, str], dict[str, str]]:
        if self._slices_reflector is None:
            return {}
        return dra_device_index(self._slices_reflector.snapshot()[1].values())

    def _build(
        self,
        index: DeviceIndex,
        pods: Iterable[PodResources],
        alloc: AllocatableResources | None,
        built_at: float | None = None,
    ) -> _Mapping:
        uses: dict[DeviceKey, list[_Use]] = {}
        dra = self._dra_index() if self.config.dra else {}
        for pod in pods:
            for c in pod.containers:
                for dev in c.devices:
                    if not self._relevant(dev.resource_name):
                        continue
                    for device_id in dev.device_ids:
                        ref = index.resolve(device_id)
                        if ref is not None:
                            uses.setdefault(ref.key, []).append(
                                _Use(pod.namespace, pod.name, c.name, dev.resource_name, ref.replica)
                            )
                for claim in c.dynamic_resources if self.config.dra else ():
                    for cr in claim.claim_resources:
                        if cr.driver_name != DRA_DRIVER:
                            continue
                        key = self._resolve_dra(index, dra.get((cr.pool_name, cr.device_name)))
                        if key is not None:
                            uses.setdefault(key, []).append(_Use(pod.namespace, pod.name, c.name, DRA_DRIVER, None))

        meta = self._pod_metadata() if self.config.needs_pod_metadata else {}
        labels: dict[DeviceKey, tuple[LabelSet, ...]] = {}
        for key, key_uses in uses.items():
            key_uses.sort(key=lambda u: (-1 if u.replica is None else u.replica, u.namespace, u.pod, u.container))
            labels[key] = self._label_sets(key_uses, meta)

        allocatable: dict[DeviceKey, set[str]] = {}
        if alloc is not None:
            for dev in alloc.devices:
                if self._relevant(dev.resource_name):
                    for device_id in dev.device_ids:
                        ref = index.resolve(device_id)
                        if ref is not None:
                            allocatable.setdefault(ref.key, set()).add(dev.resource_name)
        return _Mapping(
            index=index,
            labels=labels,
            allocation=self._allocation(index, uses, allocatable),
            kubelet_health=self._kubelet_health(index, uses, allocatable) if alloc is not None else (),
            built_at=self._clock() if built_at is None else built_at,
        )

    @staticmethod
    def _resolve_dra(index: DeviceIndex, attrs: dict[str, str] | None) -> DeviceKey | None:
        if attrs is None:
            return None
        uuid = attrs.get("uuid", "")
        ref = index.resolve(uuid) if uuid else None
        if ref is not None:
            return ref.key
        # A MIG device published without a resolvable MIG UUID: parent GPU + profile, if unambiguous.
        parent = attrs.get("parentUUID")
        profile = attrs.get("profile")
        gpu = index.gpus.get(parent or "")
        if gpu is None or profile is None:
            return None
        matches = [m for m in gpu.migs if m.profile == profile]
        return (gpu.uuid, matches[0].gpu_instance_id) if len(matches) == 1 else None

    def _label_sets(self, uses: list[_Use], meta: dict[Any, PodMeta]) -> tuple[LabelSet, ...]:
        if self.config.shared_mode == "first-pod":
            return (self._pod_labels(uses[0], None, meta),)
        shared = any(u.replica is not None for u in uses)
        seen: set[tuple[str, str, str]] = set()
        out: list[LabelSet] = []
        for u in uses:  # sorted by replica: the first seen is the container's lowest replica
            who = (u.namespace, u.pod, u.container)
            if who in seen:
                continue
            seen.add(who)
            out.append(self._pod_labels(u, str(u.replica if u.replica is not None else 0) if shared else None, meta))
        return tuple(out)

    def _pod_labels(self, use: _Use, vgpu: str | None, meta: dict[Any, PodMeta]) -> LabelSet:
        pairs: list[tuple[str, str]] = [("container", use.container), ("namespace", use.namespace), ("pod", use.pod)]
        if vgpu is not None:
            pairs.append(("vgpu", vgpu))
        pm = meta.get((use.namespace, use.pod))
        if self.config.enable_pod_uid and pm is not None:
            pairs.append(("pod_uid", pm.uid))
        if self.config.enable_pod_labels and pm is not None:
            taken = set(RESERVED_LABELS)
            for k, v in pm.labels:
                if self._allowlist is not None and not self._allowlist.fullmatch(k):
                    continue
                name = sanitize_label_name(k)
                if name.startswith("__") or name in taken:
                    continue  # reserved, or two keys that sanitise to the same name: keep the first
                taken.add(name)
                pairs.append((name, v))
        return tuple(pairs)

    @staticmethod
    def _allocation(
        index: DeviceIndex, uses: dict[DeviceKey, list[_Use]], allocatable: dict[DeviceKey, set[str]]
    ) -> tuple[tuple[str, str, str, str, str], ...]:
        rows: set[tuple[str, str, str, str, str]] = set()
        for key, key_uses in uses.items():
            uuid = index.label_uuid(key)
            if uuid is not None:
                rows.update((uuid, u.resource, u.namespace, u.pod, u.container) for u in key_uses)
        for key, resources in allocatable.items():
            uuid = index.label_uuid(key)
            if uuid is None:
                continue
            used = {u.resource for u in uses.get(key, ())}
            rows.update((uuid, r, "", "", "") for r in resources - used)
        return tuple(sorted(rows))

    def _kubelet_health(
        self, index: DeviceIndex, uses: dict[DeviceKey, list[_Use]], allocatable: dict[DeviceKey, set[str]]
    ) -> tuple[tuple[str, str, int], ...]:
        # Remember under which resource each device was ever seen: a device that turns unhealthy
        # vanishes from allocatable, and this is how we still know which resource it belongs to.
        for key, resources in allocatable.items():
            self._device_resources.setdefault(key, set()).update(resources)
        for key, key_uses in uses.items():
            for u in key_uses:
                if u.resource != DRA_DRIVER:
                    self._device_resources.setdefault(key, set()).add(u.resource)
        devices = index.devices()
        kind_of = dict(devices)
        by_kind: dict[str, set[str]] = {}
        for key, resources in self._device_resources.items():
            kind = kind_of.get(key)
            if kind is not None:
                by_kind.setdefault(kind, set()).update(resources)
        any_mig_resource = any(r.startswith(MIG_RESOURCE_PREFIX) for rs in by_kind.values() for r in rs)
        rows: list[tuple[str, str, int]] = []
        for key, kind in devices:
            uuid = index.label_uuid(key)
            if uuid is None:
                continue
            resources = self._device_resources.get(key) or by_kind.get(kind) or set()
            if not resources and kind.startswith("mig:") and any_mig_resource:
                # Mixed strategy: a profile none of whose devices the kubelet ever listed.
                resources = {MIG_RESOURCE_PREFIX + kind[len("mig:") :]}
            for r in sorted(resources):
                rows.append((uuid, r, 0 if r in allocatable.get(key, ()) else 1))
        return tuple(rows)
