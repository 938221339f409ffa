"""The scheduling consumers the flags turn on, built and checked together for exporter/app.py.

Start-up problems the user fixes raise ConfigError (exit 2): a consumer on without NODE_NAME,
pod Events asked for without the pod mapping (-k), no Kubernetes API access. Once running, each
consumer degrades on its own (exporter/scheduling/faults.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from exporter.config import Config, ConfigError
from exporter.health.engine import HealthEngine
from exporter.model import Inventory
from exporter.scheduling.faults import DRA_TAINT, NODE_TAINT, POD_EVENT, ApiFaults, WriteErrorMetrics

if TYPE_CHECKING:
    from exporter.pods.mapper import PodMapper

log = structlog.get_logger("exporter.scheduling")


def wanted(cfg: Config) -> bool:
    """Whether any scheduling consumer is on (pod Events ride on --kubernetes-node-status too)."""
    return bool(cfg.dra_device_taints or cfg.health_node_taint or cfg.kubernetes_events or cfg.kubernetes_node_status)


def _flags(cfg: Config) -> str:
    on = [
        name
        for name, value in (
            ("--dra-device-taints", cfg.dra_device_taints),
            ("--health-node-taint", cfg.health_node_taint),
            ("--kubernetes-events", cfg.kubernetes_events),
        )
        if value
    ]
    return "/".join(on) or "--kubernetes-node-status"


class SchedulingParts:
    """The consumers that are on, in start order, plus the metric contributors they bring."""

    def __init__(
        self,
        cfg: Config,
        engine: HealthEngine,
        inventory: Callable[[], Inventory | None],
        pods: PodMapper | None,
        api_client_factory: Callable[[str | None], Any] | None = None,
    ) -> None:
        self.parts: list[Any] = []
        self.contributors: list[Any] = []
        events_on = cfg.kubernetes_events or (cfg.kubernetes_node_status and pods is not None)
        if cfg.kubernetes_node_status and pods is None and not cfg.kubernetes_events:
            log.info("pod_events_off", reason="pod Events need the pod mapping (-k/--kubernetes)")
        if not (cfg.dra_device_taints or cfg.health_node_taint or events_on):
            return
        if cfg.kubernetes_events and pods is None:
            raise ConfigError("--kubernetes-events needs the pod mapping: add -k/--kubernetes")
        node = os.environ.get("NODE_NAME")
        if not node:
            raise ConfigError(f"{_flags(cfg)} needs NODE_NAME (set it from the downward API: spec.nodeName)")
        if api_client_factory is None:
            from exporter.pods.kube import make_api_client

            api_client_factory = make_api_client
        try:
            api = api_client_factory(cfg.kubeconfig)
        except Exception as err:  # no in-cluster service account, an unreadable or invalid kubeconfig
            where = f"--kubeconfig {cfg.kubeconfig}" if cfg.kubeconfig else "in-cluster config"
            raise ConfigError(f"{_flags(cfg)}: no Kubernetes API access ({where}): {err}") from None
        faults = ApiFaults(node)
        actions: list[str] = []
        if cfg.dra_device_taints:
            from exporter.scheduling.drataints import DraTaintRules

            self.parts.append(DraTaintRules(engine, node, api, cfg.dra_device_taints, faults))
            actions.append(DRA_TAINT)
        if cfg.health_node_taint:
            from exporter.scheduling.nodetaint import NodeTaintReconciler

            self.parts.append(NodeTaintReconciler(engine, node, api, cfg.health_node_taint, inventory, faults))
            actions.append(NODE_TAINT)
        if events_on and pods is not None:
            from exporter.scheduling.podevents import PodEvents

            self.parts.append(PodEvents(engine, pods, node, api, faults))
            actions.append(POD_EVENT)
        self.contributors = [*self.parts, WriteErrorMetrics(faults, tuple(actions))]

    def wake(self) -> None:
        """Reconcile now (an inventory change: 'every GPU fenced' may hold or stop holding)."""
        for part in self.parts:
            wake = getattr(part, "wake", None)
            if wake is not None:
                wake()
