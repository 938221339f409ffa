"""Which resource.k8s.io version serves DeviceTaintRule on this API server, if any.

KEP-5055's rule API is alpha in v1alpha3 (gates DRADeviceTaints 1.33, DRADeviceTaintRules 1.35),
beta in v1beta2 (1.36, off by default) and planned for v1: a cluster may serve resource.k8s.io
(ResourceSlices) in several versions and DeviceTaintRule in none of them. Discovery answers that
without writing anything: the group's versions (GET /apis/resource.k8s.io), then each candidate
version's resource list (GET /apis/resource.k8s.io/<v>).
"""

from __future__ import annotations

import functools
import json
from typing import Any

GROUP = "resource.k8s.io"
RULES = "devicetaintrules"
# The versions we speak, newest first; all three have spec.deviceSelector{driver, pool, device}
# and spec.taint{key, value, effect, timeAdded}.
TAINT_RULE_VERSIONS = ("v1", "v1beta2", "v1alpha3")


def _get(call: Any, timeout_s: float) -> dict[str, Any] | None:
    """Run a discovery call of the generated client, raw; None on 404 (not served). Other failures raise."""
    from kubernetes.client.exceptions import ApiException

    try:
        resp = call(_preload_content=False, _request_timeout=timeout_s)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    body = json.loads(resp.data)
    return body if isinstance(body, dict) else None


def served_taint_rule_version(api_client: Any, timeout_s: float = 10.0) -> str | None:
    """The newest version of ours that lists `devicetaintrules`, or None when none does."""
    from kubernetes import client

    group = _get(client.ResourceApi(api_client).get_api_group, timeout_s)
    if group is None:
        return None
    offered = {str(v.get("version")) for v in group.get("versions") or [] if isinstance(v, dict)}
    for version in TAINT_RULE_VERSIONS:
        if version not in offered:
            continue
        call = functools.partial(client.CustomObjectsApi(api_client).get_api_resources, GROUP, version)
        resources = _get(call, timeout_s) or {}
        if any(isinstance(r, dict) and r.get("name") == RULES for r in resources.get("resources") or []):
            return version
    return None
