"""Optional (--kubernetes-node-status): mirror GPU health onto the Node object.

Sets a Node condition `GPUHealthy` (status "False" while any GPU or MIG device is fenced; reason
AllGPUsHealthy | GPUsDegraded | GPUsUnhealthy) on our own node's status, and posts one Kubernetes
Event on the Node per health transition. Everything runs on one background thread fed by a
bounded queue: the engine only enqueues, so an unreachable API server can never delay a fence.
`kubernetes` is imported here and only here, and only when the feature is on.
"""

from __future__ import annotations

import contextlib
import datetime
import queue
import threading
from collections.abc import Mapping
from typing import Any

import structlog

from exporter.health.engine import HealthEngine, Transition
from exporter.health.expose import top_action
from exporter.health.verdict import HealthState, Verdict, is_worse

log = structlog.get_logger()

CONDITION_TYPE = "GPUHealthy"
COMPONENT = "gpu-health-exporter"
_QUEUE_MAX = 1000  # transitions waiting for the API server; beyond that new ones are dropped (logged)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_object(
    *, namespace: str, generate_name: str, involved: dict[str, Any], reason: str, warning: bool, message: str, node: str
) -> dict[str, Any]:
    """A core/v1 Event reported by this node's exporter (the Node's health Events, the pods' GpuUnhealthy)."""
    now = _now()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": generate_name, "namespace": namespace},
        "involvedObject": involved,
        "reason": reason,
        "type": "Warning" if warning else "Normal",
        "message": message[:1024],
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": COMPONENT,
        "reportingInstance": node,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def condition_for(verdicts: Mapping[str, Verdict]) -> tuple[str, str, str]:
    """(status, reason, message) of the GPUHealthy condition for these verdicts."""
    bad = sorted(u for u, v in verdicts.items() if v.state is HealthState.UNHEALTHY)
    degraded = sorted(u for u, v in verdicts.items() if v.state is HealthState.DEGRADED)
    unknown = sorted(u for u, v in verdicts.items() if v.state is HealthState.UNKNOWN)
    if bad:
        return "False", "GPUsUnhealthy", f"{len(bad)} device(s) fenced: {', '.join(bad)}"
    if unknown:  # not a GPU fault: the condition stays True, and says the monitor cannot see
        message = f"{len(unknown)} device(s) cannot be judged (monitor fault): {', '.join(unknown)}"
        return "True", "GPUHealthUnknown", message
    if degraded:
        return "True", "GPUsDegraded", f"{len(degraded)} device(s) degraded: {', '.join(degraded)}"
    return "True", "AllGPUsHealthy", "all GPUs healthy"


class NodeStatusReporter:
    def __init__(
        self,
        engine: HealthEngine,
        node_name: str,
        kubeconfig: str | None = None,
        namespace: str = "default",
        resync_s: float = 60.0,
    ) -> None:
        self._engine = engine
        self._node = node_name
        self._kubeconfig = kubeconfig
        self._namespace = namespace
        self._resync_s = resync_s
        self._queue: queue.Queue[list[Transition] | None] = queue.Queue(_QUEUE_MAX)
        self._thread: threading.Thread | None = None
        self._api: Any = None
        self._last_status: str | None = None
        self._transition_time = _now()
        self._dropped = 0

    def start(self) -> None:
        self._engine.add_transition_listener(self._enqueue)
        self._thread = threading.Thread(target=self._run, name="health-node-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _enqueue(self, transitions: list[Transition]) -> None:
        try:
            self._queue.put_nowait(transitions)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 100 == 0:
                log.warning("health_node_events_dropped", dropped=self._dropped, node=self._node)

    def _client(self) -> Any:
        if self._api is None:
            import kubernetes  # lazy: only with --kubernetes-node-status

            config: Any = kubernetes.config  # the client's own annotations are partial
            if self._kubeconfig:
                config.load_kube_config(config_file=self._kubeconfig)
            else:
                config.load_incluster_config()
            self._api = kubernetes.client.CoreV1Api()
        return self._api

    def _run(self) -> None:
        self._sync_condition()
        while True:
            try:
                item = self._queue.get(timeout=self._resync_s)
            except queue.Empty:
                self._sync_condition()  # heartbeat, and a retry after earlier failures
                continue
            if item is None:
                return
            for t in item:
                self._post_event(t)
            self._sync_condition()

    def _sync_condition(self) -> None:
        status, reason, message = condition_for(self._engine.verdicts())
        if status != self._last_status:
            self._transition_time = _now()
        cond = {
            "type": CONDITION_TYPE,
            "status": status,
            "reason": reason,
            "message": message[:1024],
            "lastHeartbeatTime": _now(),
            "lastTransitionTime": self._transition_time,
        }
        try:
            # Strategic merge keys conditions by type, leaving the kubelet's own conditions alone.
            self._client().patch_node_status(
                self._node,
                {"status": {"conditions": [cond]}},
                _content_type="application/strategic-merge-patch+json",
                _request_timeout=10,
            )
            self._last_status = status
        except Exception as e:
            log.warning("health_node_condition_failed", node=self._node, error=str(e))

    def _post_event(self, t: Transition) -> None:
        worse = is_worse(t.state, t.previous)
        reason = {
            HealthState.UNHEALTHY: "GPUUnhealthy",
            HealthState.DEGRADED: "GPUDegraded",
            HealthState.UNKNOWN: "GPUHealthUnknown",
        }.get(t.state, "GPUHealthy")
        causes = ", ".join(f"{r.signal}:{r.code}" if r.code else r.signal for r in t.reasons) or "cleared"
        message = (
            f"{t.uuid}: {t.previous.name.lower()} -> {t.state.name.lower()} ({causes}; action "
            f"{top_action([r.action for r in t.reasons])})" + (f"; {t.cleared}" if t.cleared else "")
        )
        body = event_object(
            namespace=self._namespace,
            generate_name=f"{self._node}.gpuhealth-",
            involved={"apiVersion": "v1", "kind": "Node", "name": self._node},
            reason=reason,
            warning=worse,
            message=message,
            node=self._node,
        )
        try:
            self._client().create_namespaced_event(self._namespace, body, _request_timeout=10)
        except Exception as e:
            log.warning("health_node_event_failed", node=self._node, uuid=t.uuid, error=str(e))
