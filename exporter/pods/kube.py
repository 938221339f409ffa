"""Kubernetes API side of pod attribution: pod metadata and DRA ResourceSlices.

Both are list+watch caches restricted to this node (fieldSelector spec.nodeName=<node>), so the
API server sees one long-lived watch per resource per node, never a GET per scrape or per cycle.
`kubernetes` is imported lazily inside the functions that need it: nodes that never enable
pod labels, pod UIDs or DRA do not pay for importing it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

log = structlog.get_logger("exporter.pods.kube")

T = TypeVar("T")

DRA_DRIVER = "gpu.nvidia.com"
# Newest first: resource.k8s.io/v1 is GA in 1.34; older clusters serve only a beta.
RESOURCE_API_VERSIONS = ("v1", "v1beta2", "v1beta1")


def make_api_client(kubeconfig: str | None) -> Any:
    """An ApiClient of its own (no global kubernetes config is touched)."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except ConfigException:
        return config.new_client_from_config()  # type: ignore[no-untyped-call]
    return client.ApiClient(cfg)


@dataclass(frozen=True)
class PodMeta:
    uid: str
    labels: tuple[tuple[str, str], ...]
    # (container ID without its runtime prefix, container name), for --process-metrics
    containers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SliceDevices:
    driver: str
    pool: str
    # device name -> attributes with the domain prefix stripped ("gpu.nvidia.com/uuid" -> "uuid")
    devices: dict[str, dict[str, str]]


_STATUS_LISTS = ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")


def container_ids(status: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(ID, name) of every container the pod's status names, init and ephemeral ones included.

    The kubelet writes `<runtime>://<id>` (`containerd://`, `cri-o://`, `docker://`); a cgroup path
    carries the bare ID. A container not started yet has no containerID and is left out."""
    out: list[tuple[str, str]] = []
    for key in _STATUS_LISTS:
        for cs in status.get(key) or []:
            if not isinstance(cs, dict):
                continue
            cid = str(cs.get("containerID") or "").rpartition("://")[2].lower()
            if cid:
                out.append((cid, str(cs.get("name", ""))))
    return tuple(out)


def pod_meta(obj: dict[str, Any]) -> tuple[tuple[str, str], PodMeta]:
    md = obj.get("metadata") or {}
    labels = md.get("labels") or {}
    key = (str(md.get("namespace", "")), str(md.get("name", "")))
    return key, PodMeta(
        str(md.get("uid", "")),
        tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        container_ids(obj.get("status") or {}),
    )


def _attr_value(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    for kind in ("string", "version", "int", "bool"):
        if kind in value:
            v = value[kind]
            return str(v).lower() if isinstance(v, bool) else str(v)
    return None


def slice_devices(obj: dict[str, Any]) -> tuple[str, SliceDevices]:
    spec = obj.get("spec") or {}
    name = str((obj.get("metadata") or {}).get("name", ""))
    devices: dict[str, dict[str, str]] = {}
    for dev in spec.get("devices") or []:
        # v1 puts attributes on the device; v1beta1 under "basic".
        attrs = dev.get("attributes") or (dev.get("basic") or {}).get("attributes") or {}
        parsed: dict[str, str] = {}
        for k, v in attrs.items():
            value = _attr_value(v)
            if value is not None:
                parsed[str(k).rpartition("/")[2]] = value
        devices[str(dev.get("name", ""))] = parsed
    pool = str((spec.get("pool") or {}).get("name", ""))
    return name, SliceDevices(str(spec.get("driver", "")), pool, devices)


class GoneError(Exception):
    """The watch's resourceVersion is too old (HTTP 410): re-list."""


class Reflector(Generic[T]):
    """List, then watch from the list's resourceVersion; re-list after 410 or any error.

    Keeps the last good items while the API server is unreachable. Errors back off
    exponentially (1 s .. 60 s) so a broken API server is not hammered by every node.
    """

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        transform: Callable[[dict[str, Any]], tuple[Any, T]],
        field_selector: str,
        *,
        watch_timeout_s: int = 300,
        request_timeout_s: float = 30.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._list_fn = list_fn
        self._transform = transform
        self._field_selector = field_selector
        self._watch_timeout_s = watch_timeout_s
        self._request_timeout_s = request_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        # Called (on the reflector's thread, so it must return at once) after a list or a change.
        self._on_change = on_change
        self._lock = threading.Lock()
        self._items: dict[Any, T] = {}
        self._version = 0  # bumps on every change, so consumers can tell whether to rebuild
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"reflector-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()

    def join(self, timeout_s: float) -> None:
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Watch.stop() can only unblock a read once the response exists; a stop that raced
            # with the request being sent is repeated until it takes.
            w = self._watch
            if w is not None:
                w.stop()
            self._thread.join(0.05)

    def snapshot(self) -> tuple[int, dict[Any, T]]:
        with self._lock:
            return self._version, self._items

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                rv = self._list()
                backoff = 0.0
                while not self._stop.is_set():
                    rv = self._watch_once(rv)
            except GoneError:
                continue
            except Exception as err:  # the loop must survive anything the client throws
                if self._stop.is_set():
                    return
                if getattr(err, "status", None) == 410:  # ApiException from a watch ERROR event: re-list
                    continue
                backoff = min(self._backoff_max_s, max(self._backoff_initial_s, backoff * 2))
                log.warning("kube_watch_failed", resource=self.name, retry_in_s=round(backoff), error=str(err))
                self._stop.wait(backoff)

    def _list(self) -> str:
        resp = self._list_fn(
            field_selector=self._field_selector,
            _preload_content=False,
            _request_timeout=self._request_timeout_s,
        )
        body = json.loads(resp.data)
        items = dict(self._transform(obj) for obj in body.get("items") or [])
        with self._lock:
            self._items = items
            self._version += 1
        self.synced.set()
        self._changed()
        return str((body.get("metadata") or {}).get("resourceVersion", ""))

    def _watch_once(self, rv: str) -> str:
        from kubernetes import watch

        w = watch.Watch()  # type: ignore[no-untyped-call]
        self._watch = w
        # deserialize=False: raw dicts are all we need and far cheaper than models for big pod lists.
        stream = w.stream(  # type: ignore[no-untyped-call]
            self._list_fn,
            deserialize=False,
            field_selector=self._field_selector,
            resource_version=rv,
            timeout_seconds=self._watch_timeout_s,
            allow_watch_bookmarks=True,
            _request_timeout=self._watch_timeout_s + self._request_timeout_s,
        )
        for event in stream:
            if self._stop.is_set():
                break
            rv = self._apply(event, rv)
        return rv

    def _apply(self, event: dict[str, Any], rv: str) -> str:
        kind = event.get("type")
        obj = event.get("raw_object") or event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise GoneError()
            raise RuntimeError(f"watch error: {obj.get('message', obj)}")
        new_rv = str((obj.get("metadata") or {}).get("resourceVersion", rv))
        if kind == "BOOKMARK":
            return new_rv
        key, value = self._transform(obj)
        with self._lock:
            # Copy-on-write: snapshot() hands out the dict without a copy.
            items = dict(self._items)
            if kind == "DELETED":
                items.pop(key, None)
            else:
                items[key] = value
            self._items = items
            self._version += 1
        self._changed()
        return new_rv

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()


def pod_reflector(api_client: Any, node_name: str, **kw: Any) -> Reflector[PodMeta]:
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    return Reflector("pods", core.list_pod_for_all_namespaces, pod_meta, f"spec.nodeName={node_name}", **kw)


def _resource_slice_list_fn(api_client: Any) -> Callable[..., Any]:
    """A list function for the newest resource.k8s.io version the API server serves."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api_client)
    chosen: list[str] = []

    def list_fn(**kwargs: Any) -> Any:
        versions: Iterable[str] = chosen or RESOURCE_API_VERSIONS
        last: Exception | None = None
        for version in versions:
            try:
                resp = custom.list_cluster_custom_object("resource.k8s.io", version, "resourceslices", **kwargs)
            except ApiException as err:
                if err.status == 404 and not chosen:
                    last = err
                    continue
                raise
            if not chosen:
                chosen.append(version)
            return resp
        raise RuntimeError(f"resource.k8s.io ResourceSlices not served: {last}")

    return list_fn


def resource_slice_reflector(api_client: Any, node_name: str, **kw: Any) -> Reflector[SliceDevices]:
    return Reflector(
        "resourceslices", _resource_slice_list_fn(api_client), slice_devices, f"spec.nodeName={node_name}", **kw
    )


def dra_device_index(slices: Iterable[SliceDevices], driver: str = DRA_DRIVER) -> dict[tuple[str, str], dict[str, str]]:
    """(pool, device name) -> attributes, for the devices of one driver."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for s in slices:
        if s.driver != driver:
            continue
        for name, attrs in s.devices.items():
            out[(s.pool, name)] = attrs
    return out
