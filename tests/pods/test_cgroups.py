"""exporter.pods.cgroups on real-shaped /proc/<pid>/cgroup files of each runtime and cgroup driver."""

from __future__ import annotations

import pytest

from exporter.pods.cgroups import CgroupOwner, parse_cgroup_file, parse_cgroup_path

UID = "6f1d2a7c-3b4e-4c5d-8e9f-0a1b2c3d4e5f"
SYS = UID.replace("-", "_")  # the kubelet's systemd escaping
CID = "4b2d9c1e" * 8  # 64 hex digits, as every runtime's container ID
OWNER = CgroupOwner(UID, CID)

# (what, the cgroup v2 path) for each runtime x driver x QoS class, and the nestings seen in the field
V2_PATHS = [
    ("containerd systemd burstable",
     f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYS}.slice/cri-containerd-{CID}.scope"),
    ("containerd systemd besteffort",
     f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYS}.slice/cri-containerd-{CID}.scope"),
    ("containerd systemd guaranteed (no QoS level)",
     f"/kubepods.slice/kubepods-pod{SYS}.slice/cri-containerd-{CID}.scope"),
    ("cri-o systemd", f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYS}.slice/crio-{CID}.scope"),
    ("docker systemd",
     f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYS}.slice/docker-{CID}.scope"),
    ("containerd cgroupfs burstable", f"/kubepods/burstable/pod{UID}/{CID}"),
    ("containerd cgroupfs guaranteed", f"/kubepods/pod{UID}/{CID}"),
    ("cri-o cgroupfs", f"/kubepods/besteffort/pod{UID}/crio-{CID}"),
    ("kind: kubelet under its own slice",
     f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
     f"kubelet-kubepods-burstable-pod{SYS}.slice/cri-containerd-{CID}.scope"),
    ("node in a docker container", f"/docker/{'9' * 64}/kubepods/burstable/pod{UID}/{CID}"),
    ("read from another cgroup namespace",
     f"/../../kubepods-burstable.slice/kubepods-burstable-pod{SYS}.slice/cri-containerd-{CID}.scope"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "path"), V2_PATHS, ids=[w for w, _ in V2_PATHS])
def test_every_runtime_and_driver_names_pod_and_container(what: str, path: str) -> None:
    assert parse_cgroup_path(path) == OWNER, what
    assert parse_cgroup_file(f"0::{path}\n") == OWNER, what


def test_cgroup_v1_lines_name_the_pod_and_a_bare_v2_root_does_not_hide_them() -> None:
    pod = f"/kubepods/burstable/pod{UID}/{CID}"
    text = (
        f"12:pids:{pod}\n11:hugetlb:{pod}\n5:cpu,cpuacct:{pod}\n"
        "4:rdma:/\n1:name=systemd:/system.slice/containerd.service\n0::/\n"
    )
    assert parse_cgroup_file(text) == OWNER


def test_systemd_v1_hierarchy() -> None:
    path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYS}.slice/docker-{CID}.scope"
    assert parse_cgroup_file(f"9:memory:{path}\n8:devices:{path}\n") == OWNER


def test_a_process_in_the_pod_cgroup_itself_has_a_pod_but_no_container() -> None:
    assert parse_cgroup_path(f"/kubepods.slice/kubepods-pod{SYS}.slice") == CgroupOwner(UID, "")


def test_cri_o_conmon_is_not_a_container() -> None:
    path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYS}.slice/crio-conmon-{CID}.scope"
    assert parse_cgroup_path(path) == CgroupOwner(UID, "")


def test_a_static_pod_uid_is_the_manifest_hash() -> None:
    uid = "0123456789abcdef0123456789abcdef"
    assert parse_cgroup_path(f"/kubepods/pod{uid}/{CID}") == CgroupOwner(uid, CID)


@pytest.mark.parametrize(
    "text",
    [
        "0::/system.slice/sshd.service\n",  # a host service
        "0::/user.slice/user-1000.slice/session-3.scope\n",
        "0::/\n",  # a process seen from inside its own cgroup namespace: nothing to learn
        f"0::/system.slice/docker-{CID}.scope\n",  # a container outside Kubernetes
        "0::/kubepods.slice/kubepods-burstable.slice\n",  # a QoS level, no pod
        "",
        "garbage without colons\n",
        "0::/kubepods/burstable/podnot-a-uid/x\n",
    ],
)
def test_paths_in_no_pod(text: str) -> None:
    assert parse_cgroup_file(text) is None
