"""What an API failure was, logged once per episode and counted per action.

Every consumer here writes to the API server from its own thread and must survive whatever comes
back: the server down or slow, RBAC missing (403), the API not served (404), a conflict (409), an
invalid object (422). None of them is a GPU's fault, so none of them changes a verdict: they are
logged (once when an episode starts, then once a minute while it lasts, `exporter.logs.Reminder`),
counted in gpuhealth_kubernetes_write_errors_total{action} and retried by the reconcilers.
"""

from __future__ import annotations

import threading

import structlog

from exporter.family import Family
from exporter.labels import RenderContext, format_labels
from exporter.logs import Reminder

log = structlog.get_logger("exporter.scheduling")

DRA_TAINT, NODE_TAINT, POD_EVENT = "dra_taint", "node_taint", "pod_event"
ACTIONS = (DRA_TAINT, NODE_TAINT, POD_EVENT)

WRITE_ERRORS = Family(
    "gpuhealth_kubernetes_write_errors_total",
    "counter",
    "Kubernetes API requests of the scheduling consumers that failed (server down or slow, 403, 404, 409, 422), "
    "by consumer.",
    "action",
    "kubernetes_writes",
    note="action: dra_taint, node_taint or pod_event; served while any of --dra-device-taints, "
    "--health-node-taint or pod Events is on.",
)
FAMILIES = (WRITE_ERRORS,)

_HINTS = {
    "forbidden": "RBAC: the service account lacks a verb (docs/scheduling.md lists them)",
    "unauthorized": "the API server refused our credentials",
    "not_found": "the API or object is not served",
    "conflict": "someone else changed the object first; retried on the newest version",
    "invalid": "the API server refused the object as invalid",
    "slow": "the API server did not answer in time",
    "unreachable": "the API server cannot be reached",
    "server_error": "the API server failed the request",
}


def status_of(err: BaseException) -> int | None:
    """The HTTP status of a kubernetes ApiException, else None (no reply at all)."""
    status = getattr(err, "status", None)
    return status if isinstance(status, int) and status > 0 else None


def classify(err: BaseException) -> str:
    """One word for what went wrong (the log's `kind`)."""
    status = status_of(err)
    if status is not None:
        return {401: "unauthorized", 403: "forbidden", 404: "not_found", 409: "conflict", 422: "invalid"}.get(
            status, "server_error"
        )
    text = f"{type(err).__name__} {err}".lower()
    if "timeout" in text or "timed out" in text:
        return "slow"
    return "unreachable"


def short_error(err: BaseException) -> str:
    """The server's message (from an ApiException's body) or the exception's text, one line."""
    body = getattr(err, "body", None)
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body:
        import json

        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if isinstance(message, str) and message:
            return message[:300]
    return " ".join(str(err).split())[:300]


class ApiFaults:
    """Failed requests per action: counted, logged once per episode, the recovery logged once."""

    def __init__(self, node: str, every_s: float = 60.0) -> None:
        self.node = node
        self._reminder = Reminder(every_s)
        self._lock = threading.Lock()
        self._errors = dict.fromkeys(ACTIONS, 0)
        self._active: dict[str, set[str]] = {a: set() for a in ACTIONS}

    def failed(self, action: str, what: str, err: BaseException) -> str:
        """Count and (once per episode) log a failed request; returns its kind."""
        kind = classify(err)
        with self._lock:
            self._errors[action] += 1
            self._active[action].add(kind)
        if self._reminder.due((action, kind)):
            log.warning(
                "kubernetes_write_failed",
                action=action,
                request=what,
                kind=kind,
                hint=_HINTS.get(kind, ""),
                error=short_error(err),
                node=self.node,
            )
        return kind

    def succeeded(self, action: str) -> None:
        """A request of `action` worked: any episode of failures it had is over."""
        with self._lock:
            kinds, self._active[action] = self._active[action], set()
        if any([self._reminder.clear((action, k)) for k in kinds]):
            log.info("kubernetes_writes_recovered", action=action, node=self.node)

    def errors(self, action: str) -> int:
        with self._lock:
            return self._errors[action]


class WriteErrorMetrics:
    """Renders gpuhealth_kubernetes_write_errors_total for the actions that are on."""

    metrics_part = "kubernetes_writes"

    def __init__(self, faults: ApiFaults, actions: tuple[str, ...]) -> None:
        self._faults = faults
        self._actions = actions

    def render_metrics(self, ctx: RenderContext) -> str:
        rows = [(format_labels((("action", a),)), self._faults.errors(a)) for a in self._actions]
        return WRITE_ERRORS.header + WRITE_ERRORS.samples(rows)
