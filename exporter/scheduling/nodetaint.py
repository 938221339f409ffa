"""--health-node-taint KEY[=VALUE]:EFFECT: taint this Node while the node as a whole should not get pods.

The taint is wanted while any verdict recommends a node reboot (a reason with action
`reboot_node`) or every GPU of the node is fenced; never on an empty inventory (no GPUs found is
not "every GPU fenced"). Only our taint is touched: the one with our exact key and effect; every
other taint of the Node is written back as it was read. The write is a merge patch carrying the
resourceVersion it was computed from, so a concurrent change to the Node's taints (the kubelet,
an admin, another controller) makes it fail with 409 instead of being lost: the Node is read again
and the patch recomputed. A leftover taint of ours from an earlier run is removed by the first
reconcile once the condition does not hold.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from exporter.config import NodeTaint
from exporter.family import Family
from exporter.health.verdict import HealthState, HealthView, Verdict
from exporter.labels import RenderContext
from exporter.model import Inventory
from exporter.scheduling.faults import NODE_TAINT, ApiFaults, status_of
from exporter.scheduling.worker import ReconcileFailed, Reconciler

log = structlog.get_logger("exporter.scheduling")

REBOOT_NODE = "reboot_node"
_JUDGED = (HealthState.UNHEALTHY, HealthState.DEGRADED)
_REQUEST_TIMEOUT_S = 10.0
_CONFLICT_RETRIES = 5  # re-reads after a 409 within one reconcile, before backing off

APPLIED = Family(
    "gpuhealth_node_taint_applied",
    "gauge",
    "1 while our --health-node-taint taint is on this Node (as last read or written), 0 while it is not.",
    "",
    "node_taint",
    note="Served only with --health-node-taint.",
)
FAMILIES = (APPLIED,)


def taint_wanted(
    verdicts: Mapping[str, Verdict], inventory: Inventory | None, verdict_of: Callable[[str], Verdict]
) -> str | None:
    """Why the node should be tainted ("reboot_node", "all_gpus_fenced"), or None."""
    for v in verdicts.values():
        # Judged reasons only: UNKNOWN is the monitor's own trouble, never a reason to drain the node.
        if any(r.action == REBOOT_NODE and r.state in _JUDGED for r in v.reasons):
            return REBOOT_NODE
    gpus = inventory.gpus if inventory is not None else ()
    if gpus and all(verdict_of(g.uuid).state is HealthState.UNHEALTHY for g in gpus):
        return "all_gpus_fenced"
    return None


def is_ours(taint: Mapping[str, Any], ours: NodeTaint) -> bool:
    return taint.get("key") == ours.key and taint.get("effect") == ours.effect


def new_taints(taints: list[dict[str, Any]], ours: NodeTaint, wanted: bool, now: str) -> list[dict[str, Any]] | None:
    """The Node's taints with ours added or removed, others kept as they are; None when nothing changes."""
    mine = [t for t in taints if is_ours(t, ours)]
    others = [t for t in taints if not is_ours(t, ours)]
    if not wanted:
        return others if mine else None
    if len(mine) == 1 and (mine[0].get("value") or "") == ours.value:
        return None
    taint: dict[str, Any] = {"key": ours.key, "effect": ours.effect, "timeAdded": now}
    if ours.value:
        taint["value"] = ours.value
    return [*others, taint]


class NodeTaintReconciler(Reconciler):
    name = "node-taint"
    metrics_part = "node_taint"

    def __init__(
        self,
        view: HealthView,
        node: str,
        api_client: Any,
        taint: NodeTaint,
        inventory: Callable[[], Inventory | None],
        faults: ApiFaults,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self._view = view
        self._node = node
        self._api = api_client
        self._taint = taint
        self._inventory = inventory
        self._faults = faults
        self.applied: bool | None = None  # None until the Node was first read

    def start(self) -> None:
        self._view.subscribe(self.wake)
        super().start()

    def render_metrics(self, ctx: RenderContext) -> str:
        return APPLIED.header + APPLIED.scalar(int(bool(self.applied)))

    def reconcile(self) -> None:
        from kubernetes import client

        core: Any = client.CoreV1Api(self._api)  # raw replies (_preload_content=False): no models
        for _ in range(_CONFLICT_RETRIES):
            why = taint_wanted(self._view.verdicts(), self._inventory(), self._view.verdict)
            try:
                node = json.loads(
                    core.read_node(self._node, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT_S).data
                )
            except Exception as err:
                self._faults.failed(NODE_TAINT, "get node", err)
                raise ReconcileFailed() from None
            taints = list((node.get("spec") or {}).get("taints") or [])
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            new = new_taints(taints, self._taint, why is not None, now)
            if new is None:
                self.applied = any(is_ours(t, self._taint) for t in taints)
                self._faults.succeeded(NODE_TAINT)
                return
            rv = (node.get("metadata") or {}).get("resourceVersion")
            patch = {"metadata": {"resourceVersion": rv}, "spec": {"taints": new}}
            try:
                core.patch_node(
                    self._node,
                    patch,
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                    _request_timeout=_REQUEST_TIMEOUT_S,
                )
            except Exception as err:
                self._faults.failed(NODE_TAINT, "patch node", err)
                if status_of(err) == 409:
                    continue  # someone else wrote the Node first: read it again, recompute
                raise ReconcileFailed() from None
            self.applied = why is not None
            self._faults.succeeded(NODE_TAINT)
            log.info(
                "node_taint_applied" if self.applied else "node_taint_removed",
                node=self._node,
                taint=str(self._taint),
                reason=why or "condition cleared",
            )
            return
        raise ReconcileFailed()
