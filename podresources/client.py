"""A small, defensive client for the kubelet PodResources socket.

Why each behaviour exists (see /work/shared/reference/kubelet-apis.md §1 and §4):
- target `unix:///abs/path` plus `grpc.default_authority=localhost`: recent grpcio otherwise
  sends the percent-encoded socket path as `:authority`.
- 16 MiB receive limit: a node with many pods exceeds gRPC's 4 MiB default and every List fails.
- a timeout on every call: a wedged kubelet must never wedge the exporter.
- a new channel when the socket's inode changes or after UNAVAILABLE: a kubelet restart deletes
  and recreates the socket; an old channel may keep retrying a dead file.
- back off on RESOURCE_EXHAUSTED/UNAVAILABLE, with no call at all while backing off: the kubelet
  rate-limits this socket for every client on the node (100/s, burst 10).
- v1 UNIMPLEMENTED -> v1alpha1 List: very old kubelets serve only v1alpha1.

Results are plain frozen dataclasses so nothing above this module depends on protobuf types.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from podresources import DEFAULT_SOCKET
from podresources.api.v1 import podresources_pb2 as v1_pb2
from podresources.api.v1 import podresources_pb2_grpc as v1_grpc
from podresources.api.v1alpha1 import podresources_pb2 as v1alpha1_pb2
from podresources.api.v1alpha1 import podresources_pb2_grpc as v1alpha1_grpc

MAX_RECEIVE_BYTES = 16 * 1024 * 1024

# Method labels for request counters (gpuhealth_kubelet_requests_total{method,code}).
METHOD_LIST = "List"
METHOD_LIST_V1ALPHA1 = "v1alpha1.List"
METHOD_ALLOCATABLE = "GetAllocatableResources"
METHOD_GET = "Get"

_BACKOFF_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class ContainerDevices:
    resource_name: str
    device_ids: tuple[str, ...]
    numa_nodes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ClaimResource:
    driver_name: str
    pool_name: str
    device_name: str
    cdi_devices: tuple[str, ...] = ()
    share_id: str | None = None


@dataclass(frozen=True)
class DynamicResource:
    claim_name: str
    claim_namespace: str
    claim_resources: tuple[ClaimResource, ...] = ()


@dataclass(frozen=True)
class ContainerResources:
    name: str
    devices: tuple[ContainerDevices, ...] = ()
    cpu_ids: tuple[int, ...] = ()
    dynamic_resources: tuple[DynamicResource, ...] = ()


@dataclass(frozen=True)
class PodResources:
    name: str
    namespace: str
    containers: tuple[ContainerResources, ...] = ()


@dataclass(frozen=True)
class AllocatableResources:
    devices: tuple[ContainerDevices, ...] = ()
    cpu_ids: tuple[int, ...] = ()


class PodResourcesError(Exception):
    """A call failed (or was not made). `code` is the gRPC status name, e.g. "UNAVAILABLE"."""

    def __init__(self, method: str, code: str, detail: str) -> None:
        super().__init__(f"{method}: {code}: {detail}")
        self.method = method
        self.code = code
        self.detail = detail


class BackingOffError(PodResourcesError):
    """Raised without contacting the kubelet because an earlier call asked us to back off."""


def _devices(items: Iterable[Any]) -> tuple[ContainerDevices, ...]:
    out = []
    for d in items:
        topology = getattr(d, "topology", None)  # v1alpha1 has no topology field
        nodes = tuple(int(n.ID) for n in topology.nodes) if topology is not None else ()
        out.append(ContainerDevices(str(d.resource_name), tuple(str(i) for i in d.device_ids), nodes))
    return tuple(out)


def _claims(items: Iterable[Any]) -> tuple[DynamicResource, ...]:
    out = []
    for dr in items:
        resources = tuple(
            ClaimResource(
                driver_name=str(cr.driver_name),
                pool_name=str(cr.pool_name),
                device_name=str(cr.device_name),
                cdi_devices=tuple(str(c.name) for c in cr.cdi_devices),
                share_id=str(cr.share_id) if cr.HasField("share_id") else None,
            )
            for cr in dr.claim_resources
        )
        out.append(DynamicResource(str(dr.claim_name), str(dr.claim_namespace), resources))
    return tuple(out)


def _pod(p: Any) -> PodResources:
    containers = []
    for c in p.containers:
        containers.append(
            ContainerResources(
                name=str(c.name),
                devices=_devices(c.devices),
                cpu_ids=tuple(int(i) for i in getattr(c, "cpu_ids", ())),
                dynamic_resources=_claims(getattr(c, "dynamic_resources", ())),
            )
        )
    return PodResources(str(p.name), str(p.namespace), tuple(containers))


class PodResourcesClient:
    """Synchronous client; safe to share between threads (calls are serialised)."""

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        timeout_s: float = 10.0,
        *,
        max_receive_bytes: int = MAX_RECEIVE_BYTES,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.timeout_s = timeout_s
        self._max_receive_bytes = max_receive_bytes
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._clock = clock
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._inode: tuple[int, int] | None = None
        self._v1: Any = None
        self._v1alpha1: Any = None
        self._v1_unimplemented = False
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        self._counts: dict[tuple[str, str], int] = {}

    # ----------------------------------------------------------------- public API

    def list(self) -> list[PodResources]:
        """Active pods and their devices (v1, or v1alpha1 on kubelets without v1)."""
        with self._lock:
            self._prepare(METHOD_LIST)
            if not self._v1_unimplemented:
                try:
                    resp = self._call(METHOD_LIST, self._v1.List, v1_pb2.ListPodResourcesRequest())
                    return [_pod(p) for p in resp.pod_resources]
                except PodResourcesError as err:
                    if err.code != grpc.StatusCode.UNIMPLEMENTED.name:
                        raise
                    # Remembered until the socket is recreated (a kubelet upgrade may add v1).
                    self._v1_unimplemented = True
            resp = self._call(METHOD_LIST_V1ALPHA1, self._v1alpha1.List, v1alpha1_pb2.ListPodResourcesRequest())
            return [_pod(p) for p in resp.pod_resources]

    def get_allocatable_resources(self) -> AllocatableResources:
        """Devices the kubelet considers allocatable, i.e. healthy (v1 only)."""
        with self._lock:
            self._prepare(METHOD_ALLOCATABLE)
            resp = self._call(
                METHOD_ALLOCATABLE, self._v1.GetAllocatableResources, v1_pb2.AllocatableResourcesRequest()
            )
            return AllocatableResources(_devices(resp.devices), tuple(int(i) for i in resp.cpu_ids))

    def get(self, pod: str, namespace: str) -> PodResources:
        """One pod (needs the kubelet gate KubeletPodResourcesGet, on by default from 1.34)."""
        with self._lock:
            self._prepare(METHOD_GET)
            req = v1_pb2.GetPodResourcesRequest(pod_name=pod, pod_namespace=namespace)
            resp = self._call(METHOD_GET, self._v1.Get, req)
            return _pod(resp.pod_resources)

    def request_counts(self) -> dict[tuple[str, str], int]:
        """Calls made so far by (method, gRPC code name); calls skipped while backing off are not counted."""
        return dict(self._counts)  # not under _lock: that is held for a whole call, up to timeout_s (render path)

    def backing_off(self) -> bool:
        with self._lock:
            return self._clock() < self._backoff_until

    def close(self) -> None:
        # Not under _lock: a call to a hung kubelet holds it for up to timeout_s, and
        # closing the channel is what cancels that call (grpc channels are thread-safe).
        channel = self._channel
        if channel is not None:
            channel.close()
        with self._lock:
            self._drop_channel()

    # ----------------------------------------------------------------- internals

    def _prepare(self, method: str) -> None:
        """Refuse while backing off; (re)open the channel if the socket is new."""
        now = self._clock()
        if now < self._backoff_until:
            raise BackingOffError(method, "BACKOFF", f"backing off for {self._backoff_until - now:.1f}s more")
        try:
            st = os.stat(self.socket_path)
        except OSError as err:
            # No socket (kubelet down or directory not mounted): fail fast, no gRPC connect attempt.
            self._drop_channel()
            raise PodResourcesError(method, grpc.StatusCode.UNAVAILABLE.name, f"{self.socket_path}: {err}") from err
        inode = (st.st_dev, st.st_ino)
        if self._channel is None or inode != self._inode:
            self._drop_channel()
            self._channel = grpc.insecure_channel(
                f"unix://{self.socket_path}",
                options=[
                    ("grpc.default_authority", "localhost"),
                    ("grpc.max_receive_message_length", self._max_receive_bytes),
                ],
            )
            self._inode = inode
            self._v1 = v1_grpc.PodResourcesListerStub(self._channel)
            self._v1alpha1 = v1alpha1_grpc.PodResourcesListerStub(self._channel)
            self._v1_unimplemented = False

    def _drop_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._inode = None
        self._v1 = None
        self._v1alpha1 = None

    def _call(self, method: str, rpc: Any, request: Any) -> Any:
        try:
            resp = rpc(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            detail = err.details() if hasattr(err, "details") else str(err)
            self._count(method, code.name)
            if code == grpc.StatusCode.UNAVAILABLE:
                # The kubelet may have restarted behind an unchanged path; start clean next time.
                self._drop_channel()
            if code in _BACKOFF_CODES:
                self._backoff_s = min(self._backoff_max_s, max(self._backoff_initial_s, self._backoff_s * 2))
                self._backoff_until = self._clock() + self._backoff_s
            raise PodResourcesError(method, code.name, str(detail)) from err
        self._count(method, grpc.StatusCode.OK.name)
        self._backoff_s = 0.0
        self._backoff_until = 0.0
        return resp

    def _count(self, method: str, code: str) -> None:
        key = (method, code)
        self._counts[key] = self._counts.get(key, 0) + 1
