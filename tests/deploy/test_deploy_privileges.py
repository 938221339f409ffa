"""The containers' privileges in every profile of the chart: no capabilities, read-only root
filesystems, no privilege escalation, the runtime's default seccomp profile; root (still without
capabilities) only where a kubelet socket or directory that only root may use is mounted; no host
namespaces, no privileged container (docs/security.md)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.deploy_common import full_values, render_chart
from tests.deploy.k8s_objects import daemonset, pod_spec

NON_ROOT_UID = 65532
PROFILES: dict[str, tuple[dict[str, Any], set[str]]] = {
    # values -> the containers that must run as root, and why (docs/security.md "Containers").
    "metrics-only": ({"podMapping": {"enabled": False}}, set()),
    "default (pod mapping)": ({}, {"exporter"}),  # the kubelet's PodResources socket is root-only
    "device plugin": ({"devicePlugin": {"enabled": True}}, {"exporter", "device-plugin"}),
    "device plugin, no pod mapping": (
        {"devicePlugin": {"enabled": True}, "podMapping": {"enabled": False}},
        # The plugin reads the exporter's 0600 control socket: both run as the same user.
        {"exporter", "device-plugin"},
    ),
    "in-process plugin": ({"devicePlugin": {"enabled": True, "inProcess": True}}, {"exporter"}),
    "proxy": ({"devicePluginProxy": {"enabled": True}}, {"exporter", "device-plugin-proxy"}),
    "full": (full_values(), {"exporter", "device-plugin"}),
}


def containers(values: dict[str, Any]) -> list[dict[str, Any]]:
    pod = pod_spec(daemonset(render_chart(values)))
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_container_is_locked_down(profile: str) -> None:
    values, root = PROFILES[profile]
    pod = pod_spec(daemonset(render_chart(values)))
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key
    for c in containers(values):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert not sc.get("privileged"), c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        if c["name"] == "state-dir-owner":
            # The one added capability in any profile: chown of the state dir, once, before the exporter starts.
            assert sc["capabilities"]["add"] == ["CHOWN"] and sc["runAsUser"] == 0
            assert c["command"][0] == "chown" and "-R" not in c["command"]
            continue
        assert "add" not in sc["capabilities"], c["name"]
        if c["name"] in root:
            assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False, c["name"]
        else:
            assert sc["runAsUser"] == NON_ROOT_UID and sc["runAsNonRoot"] is True, c["name"]
    names = {c["name"] for c in pod["containers"]}
    assert root <= names
    if not root:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == NON_ROOT_UID


def test_the_non_root_exporter_gets_its_state_dir_from_a_minimal_init_container() -> None:
    """A hostPath DirectoryOrCreate is created root:root 0755 and fsGroup does not apply to hostPath:
    the non-root exporter could not write its state. The init container chowns that one directory
    (not recursively) with CAP_CHOWN alone; without a state dir there is nothing to chown."""
    (init,) = pod_spec(daemonset(render_chart({"podMapping": {"enabled": False}})))["initContainers"]
    assert init["command"] == ["chown", f"{NON_ROOT_UID}:{NON_ROOT_UID}", "/var/lib/gpu-health-exporter"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {"state": "/var/lib/gpu-health-exporter"}
    stateless = pod_spec(daemonset(render_chart({"podMapping": {"enabled": False}, "health": {"stateDir": ""}})))
    assert "initContainers" not in stateless
    # Root profiles need no chown: the exporter creates the directory's contents itself.
    assert "initContainers" not in pod_spec(daemonset(render_chart({})))


def test_only_the_mounts_a_container_uses_are_writable() -> None:
    writable = {
        c["name"]: {m["name"] for m in c["volumeMounts"] if not m.get("readOnly")}
        for c in containers({"devicePlugin": {"enabled": True, "deviceListStrategy": "cdi"}})
    }
    # The exporter writes its state; the plugin registers its socket and writes its CDI spec; /tmp is
    # a 16 MiB memory emptyDir for the Python runtime.
    assert writable == {"exporter": {"tmp", "state"}, "device-plugin": {"tmp", "device-plugins", "cdi-dynamic"}}
    proxy = {
        c["name"]: {m["name"] for m in c["volumeMounts"] if not m.get("readOnly")}
        for c in containers({"devicePluginProxy": {"enabled": True}})
    }
    assert proxy["device-plugin-proxy"] == {"tmp", "device-plugins", "upstream-device-plugins"}
