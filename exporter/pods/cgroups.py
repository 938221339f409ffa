"""`/proc/<pid>/cgroup` -> (pod UID, container ID): which pod and container a GPU process runs in.

The kubelet names a pod's cgroup `pod<uid>` under `kubepods[/<qos>]` (guaranteed pods have no QoS
level); with the systemd driver each level becomes a slice whose name repeats its parents'
(`kubepods-burstable-pod<uid>.slice`) and the UID's dashes are escaped to underscores, since a dash
separates systemd slice levels (kubernetes pkg/kubelet/cm/cgroup_manager_linux.go,
`escapeSystemdCgroupName`, `GetPodCgroupNameSuffix`). Below it the runtime places the container:
a bare ID (cgroupfs driver), `crio-<id>` (CRI-O, cgroupfs) or a scope `cri-containerd-<id>.scope`,
`crio-<id>.scope`, `docker-<id>.scope` (systemd driver). CRI-O's `crio-conmon-<id>.scope` is its
monitor process, not a container.

A path is read from the end, so whatever sits above the kubepods level does not matter: a kubelet
under its own slice (kind, `kubelet.slice/kubelet-kubepods.slice`), a node in a container
(`/docker/<id>/kubepods/...`), or a path relative to the reader's cgroup namespace, which the
kernel writes with `..` components (`0::/../../kubepods-...`). A namespaced reader seeing only `/`
for another process learns nothing: that process is reported as in no pod, and docs/gpu-share.md
says why --host-proc must be the host's /proc read from outside the pod's namespaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# cgroupfs driver: `pod<uid>` (dashes kept). systemd driver: `kubepods[-<qos>]-pod<uid_escaped>.slice`.
# Static pods' UIDs are the manifest hash (32 hex digits, no dashes), so the form is not fixed to 36.
_UID = r"[0-9a-fA-F][0-9a-fA-F_-]{15,63}"
_POD_CGROUPFS = re.compile(rf"pod({_UID})")
_POD_SYSTEMD = re.compile(rf"(?:[a-z]+-)*kubepods(?:-[a-z]+)*-pod({_UID})\.slice")
_ID = r"[0-9a-fA-F]{12,128}"
# The runtimes' container cgroups; the conmon scope (CRI-O's monitor) is deliberately absent.
_CONTAINER = re.compile(rf"(?:(?:cri-containerd|crio|docker)-)?({_ID})(?:\.scope)?")


@dataclass(frozen=True)
class CgroupOwner:
    """The pod a process's cgroup names; `container_id` is "" when the process sits in the pod's
    own cgroup (no container level), and is the runtime's ID without its `containerd://` prefix."""

    pod_uid: str  # with dashes, as the API server spells metadata.uid
    container_id: str


def parse_cgroup_path(path: str) -> CgroupOwner | None:
    """The pod and container of one cgroup path, None for a path in no pod."""
    parts = [p for p in path.split("/") if p and p != ".."]
    for i in range(len(parts) - 1, -1, -1):
        uid = _pod_uid(parts[i])
        if uid is None:
            continue
        container = ""
        if i + 1 < len(parts):
            m = _CONTAINER.fullmatch(parts[i + 1])
            if m is not None:
                container = m.group(1).lower()
        return CgroupOwner(uid, container)
    return None


def _pod_uid(part: str) -> str | None:
    m = _POD_SYSTEMD.fullmatch(part)
    if m is not None:
        return m.group(1).replace("_", "-").lower()
    m = _POD_CGROUPFS.fullmatch(part)
    if m is not None:
        return m.group(1).lower()
    return None


def parse_cgroup_file(text: str) -> CgroupOwner | None:
    """The pod of a whole `/proc/<pid>/cgroup`: cgroup v2's `0::<path>` line first, then each v1
    `<id>:<controllers>:<path>` line (a hybrid host has both; v1 controllers may be mounted in
    different places, so the first line naming a pod wins). None: no line names a pod."""
    v1: list[str] = []
    for line in text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        if not sep:
            continue
        _controllers, sep, path = rest.partition(":")
        if not sep:
            continue
        if hierarchy == "0" and not _controllers:
            owner = parse_cgroup_path(path)
            if owner is not None:
                return owner
        else:
            v1.append(path)
    for path in v1:
        owner = parse_cgroup_path(path)
        if owner is not None:
            return owner
    return None
