"""--dra-device-taints: a DeviceTaintRule for each fenced device a DRA driver publishes for this node.

KEP-5055: a DeviceTaintRule (cluster-scoped) taints every device its `spec.deviceSelector` matches
(`driver`, `pool`, `device`: the ResourceSlice's driver, pool name and device name), as if the
driver had put the taint in its slice. The scheduler then keeps new claims off the device
(NoSchedule) or the eviction controller also evicts pods whose claims use it (NoExecute).

Desired state: for each device in this node's ResourceSlices (the same list+watch cache pod
attribution uses, `exporter.pods.kube.resource_slice_reflector`) whose `uuid` attribute names a
device the health engine judges UNHEALTHY, a rule with our taint key and the effect of the flag;
DEGRADED gets effect `None` (informational) where the server accepts it (1.35+; an older server's
422 turns that off, logged once). Actual state: the rules labelled with this node, listed at start
(so rules left by an earlier run for devices now healthy or gone are deleted: garbage collection)
and at every resync, else kept from our own writes. Names are deterministic, so a restart finds
its rules again and two exporters can never fight over one name.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from typing import Any

import structlog

from exporter.family import Family
from exporter.health.verdict import HealthState, HealthView, Reason, Verdict
from exporter.labels import RenderContext
from exporter.scheduling.discovery import GROUP, RULES, served_taint_rule_version
from exporter.scheduling.faults import DRA_TAINT, ApiFaults, status_of
from exporter.scheduling.worker import ReconcileFailed, Reconciler

log = structlog.get_logger("exporter.scheduling")

TAINT_KEY = "gpu-health-exporter/unhealthy"
NODE_LABEL = "gpu-health-exporter/node"
NODE_ANNOTATION = "gpu-health-exporter/node"  # the node name in full, also where the label is a hash
UUID_ANNOTATION = "gpu-health-exporter/uuid"
NONE_EFFECT = "None"
_REQUEST_TIMEOUT_S = 10.0

SUPPORTED = Family(
    "gpuhealth_dra_taints_supported",
    "gauge",
    "1 when the API server serves DeviceTaintRule in a version we speak (resource.k8s.io v1, v1beta2, v1alpha3), "
    "0 when it does not.",
    "",
    "dra_taints",
    note="Served only with --dra-device-taints; absent until the first discovery answered.",
)
RULES_PRESENT = Family(
    "gpuhealth_dra_device_taint_rules",
    "gauge",
    "DeviceTaintRules of this node present in the API server, as last listed or written.",
    "",
    "dra_taints",
    note="Served only with --dra-device-taints.",
)
FAMILIES = (SUPPORTED, RULES_PRESENT)

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def node_label_value(node: str) -> str:
    """The node name where it is a valid label value (63 characters at most), else `sha256-<40 hex>`:
    node names are DNS subdomains of up to 253 characters; the full name is in an annotation."""
    if len(node) <= 63 and _LABEL_VALUE.match(node):
        return node
    return "sha256-" + hashlib.sha256(node.encode()).hexdigest()[:40]


def _dns_part(text: str, limit: int) -> str:
    part = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return part[:limit].strip("-") or "x"


def rule_name(node: str, driver: str, pool: str, device: str) -> str:
    """`gpuhealth-<node>-<device>-<hash>`: readable, a DNS subdomain under 253 characters, and unique per
    (node, driver, pool, device) through the hash even when the readable parts are cut or alike."""
    digest = hashlib.sha256("\0".join((node, driver, pool, device)).encode()).hexdigest()[:12]
    return f"gpuhealth-{_dns_part(node, 100)}-{_dns_part(device, 100)}-{digest}"


def taint_value(reasons: tuple[Reason, ...], state: HealthState) -> str:
    """The first reason's code (the first reason that makes the state, an XID number say), as a label value."""
    first = next((r for r in reasons if r.state is state), reasons[0] if reasons else None)
    if first is None:
        return ""
    raw = first.code or first.signal
    value = re.sub(r"[^-A-Za-z0-9_.]+", "_", raw)[:63]
    return value.strip("-_.")


@dataclass(frozen=True)
class WantedRule:
    name: str
    driver: str
    pool: str
    device: str
    uuid: str
    value: str
    effect: str


def wanted_rules(node: str, slices: Any, verdict_of: Any, effect: str, none_effect: bool) -> dict[str, WantedRule]:
    """name -> rule, for every published device (with a `uuid` attribute) that is fenced (or degraded,
    with `none_effect`). `slices` are SliceDevices; `verdict_of(uuid) -> Verdict`."""
    out: dict[str, WantedRule] = {}
    for s in slices:
        for device, attrs in s.devices.items():
            uuid = attrs.get("uuid", "")
            if not uuid:
                continue
            v: Verdict = verdict_of(uuid)
            if v.state is HealthState.UNHEALTHY:
                rule_effect = effect
            elif v.state is HealthState.DEGRADED and none_effect:
                rule_effect = NONE_EFFECT
            else:
                continue
            name = rule_name(node, s.driver, s.pool, device)
            out[name] = WantedRule(name, s.driver, s.pool, device, uuid, taint_value(v.reasons, v.state), rule_effect)
    return out


class DraTaintRules(Reconciler):
    name = "dra-taints"
    metrics_part = "dra_taints"

    def __init__(
        self,
        view: HealthView,
        node: str,
        api_client: Any,
        effect: str,
        faults: ApiFaults,
        *,
        resync_s: float = 60.0,
        watch_timeout_s: int = 300,
        **kw: Any,
    ) -> None:
        super().__init__(resync_s=resync_s, **kw)
        self._view = view
        self._node = node
        self._api = api_client
        self._effect = effect
        self._faults = faults
        self._watch_timeout_s = watch_timeout_s
        self._label = node_label_value(node)
        self._slices: Any = None
        self._version: str | None = None  # the resource.k8s.io version serving rules, once discovered
        self.supported: bool | None = None  # None until discovery answered
        self._none_effect = True  # until a server refuses effect None (before 1.35)
        self._actual: dict[str, dict[str, Any]] | None = None  # name -> rule as the server has it
        self._list_due = True
        self._last_full = float("-inf")  # when rules were last listed (or discovery last asked)
        self._lock = threading.Lock()
        self.present = 0

    # ---- lifecycle
    def start(self) -> None:
        from exporter.pods.kube import resource_slice_reflector

        self._view.subscribe(self.wake)
        self._slices = resource_slice_reflector(
            self._api, self._node, on_change=self.wake, watch_timeout_s=self._watch_timeout_s
        )
        self._slices.start()
        super().start()

    def stop(self) -> None:
        if self._slices is not None:
            self._slices.stop()
        super().stop()
        if self._slices is not None:
            self._slices.join(5)

    def render_metrics(self, ctx: RenderContext) -> str:
        if self.supported is None:
            return RULES_PRESENT.header + RULES_PRESENT.scalar(self.present)
        return (
            SUPPORTED.header
            + SUPPORTED.scalar(int(self.supported))
            + RULES_PRESENT.header
            + RULES_PRESENT.scalar(self.present)
        )

    # ---- the reconcile
    def reconcile(self) -> None:
        now = self._clock()
        resync = now - self._last_full >= self.resync_s
        if self._version is None:
            if self.supported is False and not resync:
                return  # not served: asked again at the next resync, not on every verdict change
            self._last_full = now
            if not self._discover():
                return
        if resync:
            self._list_due = True
        if self._slices is None or not self._slices.synced.is_set():
            return  # without the slices every rule would look stale: wait (the first list wakes us)
        if self._list_due or self._actual is None:
            self._list()
            self._last_full = now
        wanted = wanted_rules(
            self._node, self._slices.snapshot()[1].values(), self._view.verdict, self._effect, self._none_effect
        )
        actual = self._actual or {}
        failed = False
        for name, rule in wanted.items():
            current = actual.get(name)
            if current is None or not self._same(current, rule):
                failed |= not self._write(rule, current)
            if self._version is None:  # a 404: the API went away mid-pass; discover again first
                raise ReconcileFailed()
        for name in sorted(set(actual) - set(wanted)):
            failed |= not self._delete(name)
            if self._version is None:
                raise ReconcileFailed()
        self.present = len(self._actual or {})
        if failed:
            raise ReconcileFailed()

    def _discover(self) -> bool:
        try:
            version = served_taint_rule_version(self._api, _REQUEST_TIMEOUT_S)
        except Exception as err:
            self._faults.failed(DRA_TAINT, "discovery", err)
            raise ReconcileFailed() from None
        was = self.supported
        self.supported = version is not None
        if version is None:
            if was is not False:
                log.warning(
                    "dra_device_taints_unsupported",
                    node=self._node,
                    detail="no resource.k8s.io version (v1, v1beta2, v1alpha3) serves DeviceTaintRule; "
                    "checked again at every resync",
                )
            return False
        log.info("dra_device_taints_api", version=f"{GROUP}/{version}", node=self._node)
        self._version = version
        self._list_due = True
        return True

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self._api)

    def _lost_api(self, err: BaseException) -> None:
        """A 404 on the rules endpoint: the version went away (an upgrade, a gate turned off): rediscover."""
        if status_of(err) == 404:
            self._version = None
            self._actual = None

    def _list(self) -> None:
        import json

        try:
            resp = self._custom().list_cluster_custom_object(
                GROUP,
                self._version,
                RULES,
                label_selector=f"{NODE_LABEL}={self._label}",
                _preload_content=False,
                _request_timeout=_REQUEST_TIMEOUT_S,
            )
        except Exception as err:
            self._faults.failed(DRA_TAINT, "list", err)
            self._lost_api(err)
            raise ReconcileFailed() from None
        items = json.loads(resp.data).get("items") or []
        self._actual = {str(o["metadata"]["name"]): o for o in items if (o.get("metadata") or {}).get("name")}
        self._list_due = False
        self._faults.succeeded(DRA_TAINT)

    def _same(self, current: dict[str, Any], rule: WantedRule) -> bool:
        spec = current.get("spec") or {}
        sel = spec.get("deviceSelector") or {}
        taint = spec.get("taint") or {}
        labels = (current.get("metadata") or {}).get("labels") or {}
        return (
            sel == {"driver": rule.driver, "pool": rule.pool, "device": rule.device}
            and taint.get("key") == TAINT_KEY
            and (taint.get("value") or "") == rule.value
            and taint.get("effect") == rule.effect
            and labels.get(NODE_LABEL) == self._label
        )

    def _body(self, rule: WantedRule, current: dict[str, Any] | None) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": rule.name,
            "labels": {NODE_LABEL: self._label},
            "annotations": {NODE_ANNOTATION: self._node, UUID_ANNOTATION: rule.uuid},
        }
        if current is not None:
            metadata["resourceVersion"] = (current.get("metadata") or {}).get("resourceVersion")
        taint: dict[str, Any] = {"key": TAINT_KEY, "effect": rule.effect}
        if rule.value:
            taint["value"] = rule.value
        return {
            "apiVersion": f"{GROUP}/{self._version}",
            "kind": "DeviceTaintRule",
            "metadata": metadata,
            "spec": {
                "deviceSelector": {"driver": rule.driver, "pool": rule.pool, "device": rule.device},
                "taint": taint,
            },
        }

    def _write(self, rule: WantedRule, current: dict[str, Any] | None) -> bool:
        """Create or update one rule; False when it failed (logged, counted)."""
        import json

        custom = self._custom()
        try:
            if current is None:
                resp = custom.create_cluster_custom_object(
                    GROUP, self._version, RULES, self._body(rule, None), _preload_content=False,
                    _request_timeout=_REQUEST_TIMEOUT_S,
                )  # fmt: skip
            else:
                resp = custom.replace_cluster_custom_object(
                    GROUP, self._version, RULES, rule.name, self._body(rule, current), _preload_content=False,
                    _request_timeout=_REQUEST_TIMEOUT_S,
                )  # fmt: skip
        except Exception as err:
            status = status_of(err)
            if status == 422 and rule.effect == NONE_EFFECT:
                # An API server before 1.35 knows only NoSchedule and NoExecute: degraded devices go untainted.
                self._none_effect = False
                log.warning("dra_device_taints_no_none_effect", node=self._node, error=str(getattr(err, "body", err)))
                return True
            self._faults.failed(DRA_TAINT, "update" if current is not None else "create", err)
            self._lost_api(err)
            if status == 409:  # it exists (a create after our cache lost it) or changed: re-list, retry
                self._list_due = True
            return False
        obj = json.loads(resp.data)
        with self._lock:
            if self._actual is not None:
                self._actual[rule.name] = obj
        log.info(
            "dra_device_taint_applied",
            rule=rule.name,
            device=rule.device,
            pool=rule.pool,
            driver=rule.driver,
            uuid=rule.uuid,
            effect=rule.effect,
            value=rule.value,
        )
        self._faults.succeeded(DRA_TAINT)
        return True

    def _delete(self, name: str) -> bool:
        try:
            self._custom().delete_cluster_custom_object(
                GROUP, self._version, RULES, name, _preload_content=False, _request_timeout=_REQUEST_TIMEOUT_S
            )
        except Exception as err:
            if status_of(err) != 404:  # already gone is what we wanted
                self._faults.failed(DRA_TAINT, "delete", err)
                self._lost_api(err)
                return False
        with self._lock:
            if self._actual is not None:
                self._actual.pop(name, None)
        log.info("dra_device_taint_removed", rule=name)
        self._faults.succeeded(DRA_TAINT)
        return True
