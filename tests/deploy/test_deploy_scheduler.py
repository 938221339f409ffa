"""Chart: reaching the scheduler through the API server (DeviceTaintRules, the node taint, pod Events):
flags, least-privilege RBAC per feature, and the admission policy that keeps each node's exporter to
its own DeviceTaintRules."""

from __future__ import annotations

import re
from typing import Any

import pytest
from helm_python.errors import HelmRenderError

from tests.deploy.deploy_common import ROOT, by_kind, render_chart
from tests.deploy.k8s_objects import container, daemonset, pod_spec, rbac_rules, validate

TAINTS: dict[str, Any] = {"scheduler": {"draDeviceTaints": {"effect": "NoSchedule"}}}
NODE_TAINT = "gpu-health-exporter/unhealthy:NoSchedule"
# What the code calls, no more (docs/scheduling.md, RBAC): list by label, create, PUT, delete.
RULE_WRITES = ["list", "create", "update", "delete"]
# What exporter/scheduling/drataints.py puts on each rule it writes.
NODE_LABEL = NODE_ANNOTATION = "gpu-health-exporter/node"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"


def args(values: dict[str, Any]) -> list[str]:
    result: list[str] = container(daemonset(render_chart(values)))["args"]
    return result


def grants(values: dict[str, Any]) -> set[tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    return {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in rbac_rules(render_chart(values))}


def policy(values: dict[str, Any], suffix: str = "-device-taint-rules") -> tuple[dict[str, Any], dict[str, Any]]:
    """The admission policy named <fullname><suffix> and its binding."""
    rendered = render_chart(values)
    (vap,) = [d for d in by_kind(rendered, "ValidatingAdmissionPolicy") if d["metadata"]["name"].endswith(suffix)]
    (binding,) = [
        d for d in by_kind(rendered, "ValidatingAdmissionPolicyBinding") if d["metadata"]["name"].endswith(suffix)
    ]
    return vap, binding


def policy_names(values: dict[str, Any]) -> list[str]:
    return sorted(d["metadata"]["name"] for d in by_kind(render_chart(values), "ValidatingAdmissionPolicy"))


def test_off_by_default_no_flags_no_grants_no_policy() -> None:
    rendered = render_chart({})
    flags = container(daemonset(rendered))["args"]
    assert not [a for a in flags if a.startswith(("--dra-device-taints", "--health-node-taint", "--kubernetes-events"))]
    assert not rbac_rules(rendered)
    assert not by_kind(rendered, "ValidatingAdmissionPolicy")


@pytest.mark.parametrize("effect", ["NoSchedule", "NoExecute"])
def test_dra_device_taints(effect: str) -> None:
    values = {"scheduler": {"draDeviceTaints": {"effect": effect}}}
    assert f"--dra-device-taints={effect}" in args(values)
    assert grants(values) == {
        (("resource.k8s.io",), ("devicetaintrules",), tuple(RULE_WRITES)),
        (("resource.k8s.io",), ("resourceslices",), ("list", "watch")),
    }
    assert pod_spec(daemonset(render_chart(values)))["automountServiceAccountToken"] is True


def test_node_taint() -> None:
    values = {"scheduler": {"nodeTaint": NODE_TAINT}}
    assert f"--health-node-taint={NODE_TAINT}" in args(values)
    assert grants(values) == {(("",), ("nodes",), ("get", "patch"))}
    assert policy_names(values) == ["gpu-health-exporter-own-node"]


def test_pod_events() -> None:
    values = {"scheduler": {"podEvents": True}}
    assert "--kubernetes-events" in args(values)
    # The pods holding a GPU come from the kubelet (PodResources): no pods grant.
    assert grants(values) == {(("",), ("events",), ("create",))}
    # Node status posts the same Events: the same grants, once, plus its own.
    both = grants({"scheduler": {"podEvents": True}, "health": {"nodeStatus": True}})
    assert both == grants(values) | {(("",), ("nodes/status",), ("patch",))}


def test_all_three_together_and_nothing_else() -> None:
    values = {"scheduler": {"draDeviceTaints": {"effect": "NoExecute"}, "nodeTaint": NODE_TAINT, "podEvents": True}}
    flags = args(values)
    assert {"--dra-device-taints=NoExecute", f"--health-node-taint={NODE_TAINT}", "--kubernetes-events"} <= set(flags)
    resources = {res for _, rs, _ in grants(values) for res in rs}
    assert resources == {"devicetaintrules", "resourceslices", "nodes", "events"}
    for doc in [d for docs in render_chart(values).values() for d in docs]:
        validate(doc)


@pytest.mark.parametrize("effect", ["None", "noschedule", "Evict"])
def test_bad_effect_fails_the_render(effect: str) -> None:
    with pytest.raises(HelmRenderError, match=f'scheduler.draDeviceTaints.effect "{effect}" is not one of'):
        render_chart({"scheduler": {"draDeviceTaints": {"effect": effect}}})


# --- the admission policy ---


def test_policy_is_on_with_dra_taints_and_validates() -> None:
    vap, binding = policy(TAINTS)
    validate(vap)
    validate(binding)
    spec = vap["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule == {
        "apiGroups": ["resource.k8s.io"],
        "apiVersions": ["*"],  # v1alpha3, v1beta2, v1: whichever the exporter found served
        "operations": ["CREATE", "UPDATE", "DELETE"],
        "resources": ["devicetaintrules"],
    }
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}
    assert "namespace" not in vap["metadata"] and "namespace" not in binding["metadata"]


def test_policy_applies_to_our_service_account_only() -> None:
    (cond,) = policy(TAINTS)[0]["spec"]["matchConditions"]
    assert (
        cond["expression"]
        == "request.userInfo.username == 'system:serviceaccount:gpu-health-exporter:gpu-health-exporter'"
    )
    renamed = {**TAINTS, "serviceAccount": {"name": "ghe"}, "namespaceOverride": "gpu-system"}
    (cond,) = policy(renamed)[0]["spec"]["matchConditions"]
    assert cond["expression"] == "request.userInfo.username == 'system:serviceaccount:gpu-system:ghe'"
    ds = daemonset(render_chart(renamed))
    assert pod_spec(ds)["serviceAccountName"] == "ghe" and ds["metadata"]["namespace"] == "gpu-system"


def _expressions(vap: dict[str, Any]) -> dict[str, str]:
    spec = vap["spec"]
    out = {v["name"]: v["expression"] for v in spec["variables"]}
    out.update({f"validation{i}": v["expression"] for i, v in enumerate(spec["validations"])})
    return out


def test_policy_reads_the_node_from_the_token_and_the_rule_from_the_right_side() -> None:
    """The node comes from the token's user info (pod-bound tokens), never from the request body; a
    CREATE is judged on object, a DELETE on oldObject (object is null there), an UPDATE on both."""
    vap, _ = policy(TAINTS)
    exprs = _expressions(vap)
    assert NODE_NAME_EXTRA in exprs["node"] and "request.userInfo.extra" in exprs["node"]
    assert "object" not in exprs["node"]
    new, old = exprs["newOwned"], exprs["oldOwned"]
    assert new.startswith("request.operation != 'DELETE' && ") and "oldObject" not in new
    assert old.startswith("request.operation != 'CREATE' && ") and re.search(r"(?<!old)object\.", old) is None
    for expr, obj in ((new, "object"), (old, "oldObject")):
        assert f"{obj}.metadata.annotations['{NODE_ANNOTATION}'] == variables.node" in expr
        assert f"{obj}.metadata.labels['{NODE_LABEL}'] == variables.node" in expr
        # Node names over 63 characters: the exporter labels with sha256-<hash> (drataints.node_label_value).
        assert f"{obj}.metadata.labels['{NODE_LABEL}'].startsWith('sha256-')" in expr
    validations = [v["expression"] for v in vap["spec"]["validations"]]
    assert validations[:3] == [
        "variables.node != ''",
        "request.operation == 'DELETE' || variables.newOwned",
        "request.operation == 'CREATE' || variables.oldOwned",
    ]
    for v in vap["spec"]["validations"]:
        assert v["reason"] == "Forbidden"
        assert "\n" not in v.get("message", "") and "\n" not in v.get("messageExpression", "")


def test_policy_labels_match_what_the_exporter_writes() -> None:
    from exporter.scheduling import drataints

    assert drataints.NODE_LABEL == NODE_LABEL and drataints.NODE_ANNOTATION == NODE_ANNOTATION
    assert drataints.node_label_value("node-a") == "node-a"
    assert drataints.node_label_value("n" * 64).startswith("sha256-")


def test_policy_pool_check_follows_require_node_pool() -> None:
    pool = "object.spec.deviceSelector.pool == variables.node"
    on = [v["expression"] for v in policy(TAINTS)[0]["spec"]["validations"]]
    assert any(pool in e and e.startswith("request.operation == 'DELETE' || ") for e in on)
    off_values = {
        "scheduler": {"draDeviceTaints": {"effect": "NoSchedule", "admissionPolicy": {"requireNodePool": False}}}
    }
    off = [v["expression"] for v in policy(off_values)[0]["spec"]["validations"]]
    assert not any(pool in e for e in off) and len(off) == len(on) - 1


def test_policy_can_be_turned_off_and_is_absent_without_dra_taints() -> None:
    values = {"scheduler": {"draDeviceTaints": {"effect": "NoSchedule", "admissionPolicy": {"enabled": False}}}}
    rendered = render_chart(values)
    assert not by_kind(rendered, "ValidatingAdmissionPolicy")
    assert not by_kind(rendered, "ValidatingAdmissionPolicyBinding")
    for other in ({"scheduler": {"nodeTaint": NODE_TAINT, "podEvents": True}}, {"health": {"nodeStatus": True}}):
        assert policy_names(other) == ["gpu-health-exporter-own-node"]
    assert policy_names({"scheduler": {"podEvents": True}}) == []


# --- the own-Node admission policy (node taint, node status) ---


@pytest.mark.parametrize("values", [{"scheduler": {"nodeTaint": NODE_TAINT}}, {"health": {"nodeStatus": True}}])
def test_own_node_policy_keeps_node_writes_to_the_tokens_node(values: dict[str, Any]) -> None:
    vap, binding = policy(values, "-own-node")
    validate(vap)
    validate(binding)
    spec = vap["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    # patch_node and patch_node_status are admitted as UPDATE of nodes and nodes/status.
    assert rule["operations"] == ["UPDATE"] and rule["resources"] == ["nodes", "nodes/status"]
    assert rule["apiGroups"] == [""]
    (cond,) = spec["matchConditions"]
    assert cond["expression"].endswith("'system:serviceaccount:gpu-health-exporter:gpu-health-exporter'")
    (node,) = spec["variables"]
    assert node["name"] == "node" and NODE_NAME_EXTRA in node["expression"]
    (check,) = spec["validations"]
    assert check["expression"] == "variables.node != '' && request.name == variables.node"
    assert "\n" not in check["messageExpression"]
    assert binding["spec"] == {"policyName": vap["metadata"]["name"], "validationActions": ["Deny"]}


def test_own_node_policy_can_be_turned_off() -> None:
    values = {"scheduler": {"nodeTaint": NODE_TAINT, "nodeAdmissionPolicy": {"enabled": False}}}
    assert policy_names(values) == []
    assert policy_names({**values, "health": {"nodeStatus": True}}) == []


@pytest.mark.parametrize(
    "values",
    [
        {"scheduler": {"draDeviceTaints": {"effect": "NoExecute"}, "nodeTaint": NODE_TAINT, "podEvents": True}},
        {"scheduler": {"nodeTaint": "example.com/gpu=broken:NoExecute"}},
    ],
)
def test_rendered_exporter_flags_parse_into_the_features(values: dict[str, Any]) -> None:
    """The exporter's rendered args through the daemon's own parser: each value reaches its feature."""
    from exporter.config import parse_config

    cfg = parse_config(args(values), environ={})
    scheduler = values["scheduler"]
    assert cfg.dra_device_taints == (scheduler.get("draDeviceTaints", {}).get("effect") or None)
    assert str(cfg.health_node_taint) == scheduler["nodeTaint"]
    assert cfg.kubernetes_events is bool(scheduler.get("podEvents"))


@pytest.mark.parametrize(
    "taint", ["gpu-health-exporter/unhealthy", "k:Evict", "k:noschedule", ":NoSchedule", "a b:NoExecute"]
)
def test_bad_node_taint_fails_the_render(taint: str) -> None:
    """Caught at render time rather than as a crash-looping exporter (which would exit 2 on it)."""
    with pytest.raises(HelmRenderError, match=r"scheduler\.nodeTaint .* is not KEY\[=VALUE\]:EFFECT"):
        render_chart({"scheduler": {"nodeTaint": taint}})
    from exporter.config import ConfigError, parse_config

    with pytest.raises(ConfigError):
        parse_config([f"--health-node-taint={taint}"], environ={})


def _documented_calls() -> dict[str, set[str]]:
    """resource -> verbs, from the RBAC table of docs/scheduling.md ("what the code calls, exactly")."""
    text = (ROOT / "docs/scheduling.md").read_text()
    section = text.split("\n## RBAC\n", 1)[1].split("\n#", 1)[0]
    out: dict[str, set[str]] = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[1].startswith("`"):
            continue
        resource = re.findall(r"`([^`]+)`", cells[1])[0]
        out[resource] = set(re.findall(r"`([^`]+)`", cells[2]))
    return out


def test_chart_grants_exactly_the_calls_the_code_documents() -> None:
    documented = _documented_calls()
    assert {"devicetaintrules", "resourceslices", "nodes", "events"} <= set(documented), documented
    values = {"scheduler": {"draDeviceTaints": {"effect": "NoSchedule"}, "nodeTaint": NODE_TAINT, "podEvents": True}}
    granted: dict[str, set[str]] = {}
    for _, resources, verbs in grants(values):
        for resource in resources:
            granted.setdefault(resource, set()).update(verbs)
    assert granted == {r: documented[r] for r in granted}, (granted, documented)
    assert set(granted) == {"devicetaintrules", "resourceslices", "nodes", "events"}
