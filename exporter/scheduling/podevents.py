"""Pod Events (--kubernetes-events, or with --kubernetes-node-status): tell the pods on a GPU that it is fenced.

At the moment a device turns UNHEALTHY, each pod holding it (from the pod mapping,
`PodMapper.holders`: the kubelet's PodResources view, so a GPU's MIG devices count too) gets one
Warning Event, reason `GpuUnhealthy`, naming the GPU, the reason and the recommended action: one
per (pod, transition). A global token bucket bounds the rate (a node losing all its GPUs with many
pods each must not flood the API server); what it refuses is counted, not queued. The engine only
enqueues; a thread of its own posts, retrying a failed post a few times with a backoff.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from exporter.family import Family
from exporter.health.engine import HealthEngine, Transition
from exporter.health.expose import top_action
from exporter.health.nodestatus import event_object
from exporter.health.verdict import HealthState, Reason
from exporter.labels import RenderContext, format_labels
from exporter.scheduling.faults import POD_EVENT, ApiFaults, status_of
from exporter.tokenbucket import TokenBucket

log = structlog.get_logger("exporter.scheduling")

REASON = "GpuUnhealthy"
_QUEUE_MAX = 1000
_REQUEST_TIMEOUT_S = 10.0
_ATTEMPTS = 4  # a post that fails for want of a server (not a 4xx) is tried this often in all

POD_EVENTS = Family(
    "gpuhealth_kubernetes_pod_events_total",
    "counter",
    "Warning Events (reason GpuUnhealthy) for pods holding a GPU when it was fenced: posted, or refused by "
    "the rate limit.",
    "result",
    "pod_events",
    note="result: posted or rate_limited; failed posts are counted in gpuhealth_kubernetes_write_errors_total. "
    "Served with --kubernetes-events or --kubernetes-node-status.",
)
FAMILIES = (POD_EVENTS,)


class PodHolders(Protocol):
    """Who holds a device (exporter.pods.mapper.PodMapper.holders)."""

    def holders(self, uuid: str) -> tuple[Any, ...]: ...


@dataclass
class _Post:
    namespace: str
    pod: str
    uid: str
    uuid: str
    message: str
    attempts: int = 0
    not_before: float = 0.0


def event_message(uuid: str, reasons: tuple[Reason, ...]) -> str:
    causes = [r for r in reasons if r.state is HealthState.UNHEALTHY] or list(reasons)
    what = "; ".join(f"{r.signal} {r.code}: {r.message}".replace(" :", ":") for r in causes[:3]) or "fenced"
    action = top_action([r.action for r in reasons])
    return f"GPU {uuid} is unhealthy and fenced ({what}); recommended action: {action}"[:1024]


class PodEvents:
    metrics_part = "pod_events"

    def __init__(
        self,
        engine: HealthEngine,
        pods: PodHolders,
        node: str,
        api_client: Any,
        faults: ApiFaults,
        *,
        rate_per_s: float = 1.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._pods = pods
        self._node = node
        self._api = api_client
        self._faults = faults
        self._bucket = TokenBucket(rate_per_s, burst, clock)
        self._clock = clock
        self._queue: queue.Queue[list[Transition] | None] = queue.Queue(_QUEUE_MAX)
        self._retry: list[_Post] = []
        self._thread: threading.Thread | None = None
        self.posted = 0
        self.rate_limited = 0
        self._dropped = 0

    def start(self) -> None:
        self._engine.add_transition_listener(self._enqueue)
        self._thread = threading.Thread(target=self._run, name="scheduling-pod-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)
        if self._thread is not None:
            self._thread.join(timeout=15)

    def render_metrics(self, ctx: RenderContext) -> str:
        rows = [(format_labels((("result", "posted"),)), self.posted)]
        rows.append((format_labels((("result", "rate_limited"),)), self.rate_limited))
        return POD_EVENTS.header + POD_EVENTS.samples(rows)

    def _enqueue(self, transitions: list[Transition]) -> None:
        fenced = [
            t for t in transitions if t.state is HealthState.UNHEALTHY and t.previous is not HealthState.UNHEALTHY
        ]
        if not fenced:
            return
        try:
            self._queue.put_nowait(fenced)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 100 == 0:
                log.warning("pod_events_dropped", dropped=self._dropped, node=self._node)

    def _run(self) -> None:
        while True:
            timeout = None
            if self._retry:
                timeout = max(0.0, min(p.not_before for p in self._retry) - self._clock())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = []
            if item is None:
                return
            for t in item:
                self._fenced(t)
            due = [p for p in self._retry if p.not_before <= self._clock()]
            self._retry = [p for p in self._retry if p.not_before > self._clock()]
            for post in due:
                self._post(post)

    def _fenced(self, t: Transition) -> None:
        # Read now: the mapping is the last one before the fence, with the pods that held the GPU.
        message = event_message(t.uuid, tuple(t.reasons))
        for ref in self._pods.holders(t.uuid):
            if not self._bucket.take():
                self.rate_limited += 1
                if self.rate_limited == 1 or self.rate_limited % 100 == 0:
                    log.warning("pod_events_rate_limited", refused=self.rate_limited, node=self._node)
                continue
            self._post(_Post(ref.namespace, ref.name, ref.uid, t.uuid, message))

    def _post(self, post: _Post) -> None:
        from kubernetes import client

        post.attempts += 1
        involved: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod", "namespace": post.namespace, "name": post.pod}
        if post.uid:
            involved["uid"] = post.uid
        body = event_object(
            namespace=post.namespace,
            generate_name=f"{post.pod[:200]}.gpuhealth-",
            involved=involved,
            reason=REASON,
            warning=True,
            message=post.message,
            node=self._node,
        )
        core: Any = client.CoreV1Api(self._api)
        try:
            core.create_namespaced_event(
                post.namespace, body, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT_S
            )
        except Exception as err:
            self._faults.failed(POD_EVENT, f"event for pod {post.namespace}/{post.pod}", err)
            status = status_of(err)
            # 4xx but 429: retrying the same body cannot help (RBAC, invalid, namespace gone).
            if (status is None or status == 429 or status >= 500) and post.attempts < _ATTEMPTS:
                post.not_before = self._clock() + 2.0 ** (post.attempts - 1)
                self._retry.append(post)
            return
        self.posted += 1
        self._faults.succeeded(POD_EVENT)
        log.info("pod_event_posted", namespace=post.namespace, pod=post.pod, uuid=post.uuid, reason=REASON)
