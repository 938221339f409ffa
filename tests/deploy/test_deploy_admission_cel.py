"""The chart's ValidatingAdmissionPolicies evaluated with a CEL interpreter (cel-python) on the
requests an exporter, an attacker holding its token, or another writer would send.

The API server's admission is modelled as Kubernetes documents it: matchConditions first (all true,
or the policy does not apply), then the variables in order (each visible to the later ones as
variables.<name>), then every validation must be true; an evaluation error denies
(failurePolicy: Fail). The rules' bodies come from the exporter's own naming (drataints)."""

from __future__ import annotations

from typing import Any

import celpy
import pytest
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

from exporter.scheduling.drataints import NODE_ANNOTATION, NODE_LABEL, node_label_value, rule_name
from tests.deploy.deploy_common import NAMESPACE, by_kind, render_chart

OURS = f"system:serviceaccount:{NAMESPACE}:gpu-health-exporter"
NODE_EXTRA = "authentication.kubernetes.io/node-name"
DRIVER = "gpu.nvidia.com"
TAINTS: dict[str, Any] = {"scheduler": {"draDeviceTaints": {"effect": "NoSchedule"}}}
NODE_WRITES: dict[str, Any] = {"scheduler": {"nodeTaint": "gpu-health-exporter/unhealthy=true:NoSchedule"}}


def policy(values: dict[str, Any], suffix: str) -> dict[str, Any]:
    (doc,) = [
        d for d in by_kind(render_chart(values), "ValidatingAdmissionPolicy") if d["metadata"]["name"].endswith(suffix)
    ]
    return doc


def _evaluate(env: celpy.Environment, expression: str, activation: dict[str, Any]) -> Any:
    result = env.program(env.compile(expression)).evaluate(activation)
    if isinstance(result, CELEvalError):
        raise result
    return result


def admit(doc: dict[str, Any], request: dict[str, Any], obj: Any, old: Any) -> tuple[bool, str]:
    """(allowed, why) for one request under one policy."""
    env = celpy.Environment()
    spec = doc["spec"]
    activation: dict[str, Any] = {
        "request": json_to_cel(request),
        "object": json_to_cel(obj),
        "oldObject": json_to_cel(old),
    }
    for condition in spec.get("matchConditions", []):
        if not _evaluate(env, condition["expression"], activation):
            return True, f"not matched ({condition['name']})"
    variables: dict[str, Any] = {}
    for var in spec.get("variables", []):
        activation["variables"] = celtypes.MapType({celtypes.StringType(k): v for k, v in variables.items()})
        try:
            variables[var["name"]] = _evaluate(env, var["expression"], activation)
        except CELEvalError as err:  # a variable that errors fails every validation reading it
            variables[var["name"]] = err
    activation["variables"] = celtypes.MapType({celtypes.StringType(k): v for k, v in variables.items()})
    assert spec["failurePolicy"] == "Fail"
    for validation in spec["validations"]:
        try:
            ok = _evaluate(env, validation["expression"], activation)
        except CELEvalError as err:
            return False, f"error: {err}"
        if not ok:
            message = validation.get("message", "")
            if "messageExpression" in validation:
                message = str(_evaluate(env, validation["messageExpression"], activation))
            return False, message
    return True, "admitted"


def user(name: str = OURS, node: str | None = "node-a") -> dict[str, Any]:
    extra = {NODE_EXTRA: [node]} if node is not None else {}
    return {"username": name, "extra": extra}


def taint_rule(node: str, pool: str | None = None, labelled: bool = True) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": rule_name(node, DRIVER, pool or node, "gpu-0")}
    if labelled:
        metadata["labels"] = {NODE_LABEL: node_label_value(node)}
        metadata["annotations"] = {NODE_ANNOTATION: node}
    selector = {"driver": DRIVER, "pool": pool or node, "device": "gpu-0"}
    return {"metadata": metadata, "spec": {"deviceSelector": selector, "taint": {"key": "k", "effect": "NoSchedule"}}}


def rule_request(operation: str, who: dict[str, Any], rule: dict[str, Any]) -> dict[str, Any]:
    return {"operation": operation, "userInfo": who, "name": rule["metadata"]["name"]}


def check_rule(
    operation: str,
    who: dict[str, Any],
    new: dict[str, Any] | None,
    old: dict[str, Any] | None,
    values: dict[str, Any] = TAINTS,
) -> tuple[bool, str]:
    rule = new or old
    assert rule is not None
    return admit(policy(values, "-device-taint-rules"), rule_request(operation, who, rule), new, old)


def test_own_nodes_rules_are_written() -> None:
    mine = taint_rule("node-a")
    assert check_rule("CREATE", user(), mine, None)[0]
    assert check_rule("UPDATE", user(), mine, mine)[0]
    assert check_rule("DELETE", user(), None, mine)[0]
    # A node name too long for a label value: the exporter labels sha256-<hash>, annotates the name.
    long_name = "n" * 70
    long_rule = taint_rule(long_name)
    assert long_rule["metadata"]["labels"][NODE_LABEL].startswith("sha256-")
    assert check_rule("CREATE", user(node=long_name), long_rule, None)[0]


@pytest.mark.parametrize(
    ("operation", "new", "old", "message"),
    [
        ("CREATE", taint_rule("node-b"), None,
         "may only write DeviceTaintRules labelled and annotated gpu-health-exporter/node=node-a"),
        ("DELETE", None, taint_rule("node-b"), "may only change or delete its own"),
        # Take another node's rule over, or give one's own away.
        ("UPDATE", taint_rule("node-a"), taint_rule("node-b"), "may only change or delete its own"),
        ("UPDATE", taint_rule("node-b"), taint_rule("node-a"), "may only write DeviceTaintRules labelled"),
        ("CREATE", taint_rule("node-a", labelled=False), None, "may only write DeviceTaintRules labelled"),
        ("CREATE", taint_rule("node-a", pool="node-b"), None, "may only taint devices of pool node-a"),
    ],
)  # fmt: skip
def test_other_nodes_rules_are_refused(operation: str, new: Any, old: Any, message: str) -> None:
    allowed, why = check_rule(operation, user(), new, old)
    assert not allowed and message in why, why


def test_pool_check_follows_its_value() -> None:
    values = {"scheduler": {"draDeviceTaints": {"effect": "NoSchedule", "admissionPolicy": {"requireNodePool": False}}}}
    assert check_rule("CREATE", user(), taint_rule("node-a", pool="shared-pool"), None, values)[0]


def test_a_token_without_a_node_is_refused() -> None:
    for who in (user(node=None), user(node="")):
        allowed, why = check_rule("CREATE", who, taint_rule("node-a"), None)
        assert not allowed and "names no node" in why, why


def test_other_service_accounts_are_not_evaluated() -> None:
    admin = user("system:serviceaccount:kube-system:dra-admin", node=None)
    allowed, why = check_rule("CREATE", admin, taint_rule("node-b", labelled=False), None)
    assert allowed and why.startswith("not matched"), why


def node_update(who: dict[str, Any], node: str, resource: str = "nodes") -> tuple[bool, str]:
    doc = policy(NODE_WRITES, "-own-node")
    obj = {"metadata": {"name": node}, "spec": {}}
    request = {"operation": "UPDATE", "userInfo": who, "name": node, "resource": {"resource": resource}}
    return admit(doc, request, obj, obj)


def test_own_node_policy() -> None:
    assert node_update(user(), "node-a")[0]
    assert node_update(user(), "node-a", "nodes/status")[0]
    allowed, why = node_update(user(), "node-b")
    assert not allowed and why == "gpu-health-exporter on node node-a may only change its own Node, not node-b"
    allowed, why = node_update(user(node=None), "node-a")
    assert not allowed and "names no node" in why
    kubelet = {"username": "system:node:node-b", "extra": {}}
    assert node_update(kubelet, "node-b") == (True, "not matched (gpu-health-exporter-service-account)")
    # The policy exists for each feature that writes the Node, and binds with Deny.
    for values in (NODE_WRITES, {"health": {"nodeStatus": True}}):
        resources = policy(values, "-own-node")["spec"]["matchConstraints"]["resourceRules"][0]["resources"]
        assert resources == ["nodes", "nodes/status"]
    (binding,) = [b for b in by_kind(render_chart(NODE_WRITES), "ValidatingAdmissionPolicyBinding")]
    assert binding["spec"]["validationActions"] == ["Deny"]
