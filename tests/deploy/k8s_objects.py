"""Accessors and checks for the Kubernetes objects the chart renders, shared by the deploy tests:
schema validation, the DaemonSet's containers and mounts, RBAC rules, and the scheduler's node
filter against the GPU Operator's node labels."""

from __future__ import annotations

from typing import Any

import kubernetes_validate

from tests.deploy.deploy_common import by_kind

K8S_VERSION = kubernetes_validate.latest_version()
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate"}
CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


def validate(doc: dict[str, Any]) -> None:
    """Built-in kinds against the offline OpenAPI schemas; Prometheus Operator kinds structurally."""
    if doc["kind"] in CRD_KINDS:
        validate_crd(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def validate_crd(doc: dict[str, Any]) -> None:
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
    spec = doc["spec"]
    if doc["kind"] == "Certificate":
        # cert-manager.io/v1 CertificateSpec: the fields the chart sets.
        assert doc["apiVersion"] == "cert-manager.io/v1"
        assert set(spec) <= {"secretName", "duration", "renewBefore", "dnsNames", "usages", "issuerRef"}
        assert spec["secretName"] and spec["dnsNames"] and spec["issuerRef"]["name"]
        assert set(spec["issuerRef"]) <= {"name", "kind", "group"}
        return
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", doc["kind"]
    if doc["kind"] == "ServiceMonitor":
        assert set(spec) <= {
            "jobLabel",
            "selector",
            "namespaceSelector",
            "endpoints",
            "targetLabels",
            "podTargetLabels",
            "sampleLimit",
            "attachMetadata",
        }
        assert spec["selector"]["matchLabels"] and spec["endpoints"]
        for ep in spec["endpoints"]:
            assert ep["port"] in ("metrics", "plugin-metrics", "proxy-metrics") and ep["path"] == "/metrics"
            assert set(ep) <= {
                "port",
                "path",
                "interval",
                "scrapeTimeout",
                "honorLabels",
                "scheme",
                "tlsConfig",
                "basicAuth",
                "relabelings",
                "metricRelabelings",
            }
            # Prometheus Operator SafeTLSConfig and BasicAuth (pkg/apis/monitoring/v1).
            assert set(ep.get("tlsConfig", {})) <= {"ca", "cert", "keySecret", "serverName", "insecureSkipVerify"}
            for ref in (ep.get("tlsConfig", {}).get(k) for k in ("ca", "cert")):
                assert ref is None or (len(ref) == 1 and set(ref) <= {"secret", "configMap"}), ref
            assert set(ep.get("basicAuth", {})) <= {"username", "password"}
            for relabel in ep.get("relabelings", []) + ep.get("metricRelabelings", []):
                assert set(relabel) <= {
                    "sourceLabels",
                    "separator",
                    "targetLabel",
                    "regex",
                    "modulus",
                    "replacement",
                    "action",
                }
    else:
        assert spec["groups"]
        for group in spec["groups"]:
            assert group["name"] and isinstance(group["rules"], list)
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
                assert isinstance(rule["expr"], str) and ("alert" in rule) != ("record" in rule)


def daemonset(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (ds,) = by_kind(rendered, "DaemonSet")
    return ds


def container(ds: dict[str, Any], name: str = "exporter") -> dict[str, Any]:
    (c,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    result: dict[str, Any] = c
    return result


def container_names(ds: dict[str, Any]) -> list[str]:
    return [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]]


def mounts(ds: dict[str, Any], name: str = "exporter") -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container(ds, name)["volumeMounts"]}


def pod_spec(ds: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = ds["spec"]["template"]["spec"]
    return spec


def rbac_rules(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    roles = by_kind(rendered, "ClusterRole") + by_kind(rendered, "Role")
    return [r for role in roles for r in role["rules"]]


# What the operator puts on a GPU node (gpu-operator controllers/state_manager.go gpuStateLabels, the
# "container" workload config), trimmed to the labels that matter here.
OPERATOR_NODE = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.deploy.device-plugin": "true",
    "nvidia.com/gpu.deploy.dcgm-exporter": "true",
    "nvidia.com/gpu.deploy.gpu-feature-discovery": "true",
    "nvidia.com/gpu.deploy.dcgm": "true",
    "nvidia.com/gpu.deploy.client": "true",
}
# The labels mig-manager (mig-parted pkg/mig/reconfigure shutdownKubernetesGPUClients) and the driver
# manager (k8s-driver-manager evictAllGPUOperatorComponents) flip to evict GPU clients.
EVICTION_LABELS = (
    "nvidia.com/gpu.deploy.device-plugin",
    "nvidia.com/gpu.deploy.dcgm-exporter",
    "nvidia.com/gpu.deploy.gpu-feature-discovery",
    "nvidia.com/gpu.deploy.dcgm",
    "nvidia.com/gpu.deploy.client",
)


def paused(node: dict[str, str], value: str) -> dict[str, str]:
    """The node's labels while a component pause is in progress (maybeSetPaused: "false" stays)."""
    return {k: (value if k in EVICTION_LABELS and v != "false" else v) for k, v in node.items()}


def _matches(expr: dict[str, Any], labels: dict[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values", [])
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    raise AssertionError(f"operator {op} not modelled")


def schedulable(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    """The scheduler's (and the DaemonSet controller's) node filter: nodeSelector and required node
    affinity. A DaemonSet pod on a node that stops matching is deleted."""
    if any(labels.get(k) != v for k, v in pod.get("nodeSelector", {}).items()):
        return False
    required = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if required:
        return any(
            all(_matches(e, labels) for e in term.get("matchExpressions", [])) for term in required["nodeSelectorTerms"]
        )
    return True
