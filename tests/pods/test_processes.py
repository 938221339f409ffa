"""exporter.pods.processes: PID -> pod through a fake /proc tree, the (PID, start time) cache, names
from the pod watch's items."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exporter.pods.kube import PodMeta, container_ids, pod_meta
from exporter.pods.processes import HOST, UNKNOWN, PodDirectory, ProcessOwner, ProcessResolver, read_start_time
from tests.pods.fakeproc import FakeProc, cgroupfs_path, systemd_path, v1_file, v2_file

UID_A = "aaaaaaaa-1111-4111-8111-000000000001"
UID_B = "bbbbbbbb-2222-4222-8222-000000000002"
CID_A = "a1" * 32
CID_B = "b2" * 32


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def test_start_time_is_field_22_even_with_a_command_holding_spaces_and_parentheses(proc: FakeProc) -> None:
    proc.place(42, v2_file("/"), start_time=123456, comm="my (odd) name")
    assert read_start_time(proc.root, 42) == 123456


def test_the_real_proc_stat_parses() -> None:
    assert read_start_time(Path("/proc"), os.getpid()) > 0


def test_both_cgroup_versions_resolve_and_a_host_process_is_host(proc: FakeProc) -> None:
    proc.place(10, v2_file(systemd_path(UID_A, CID_A)))
    proc.place(11, v1_file(cgroupfs_path(UID_B, CID_B)))
    proc.place(12, v2_file("/system.slice/sshd.service"))
    r = ProcessResolver(proc.root)
    assert r.resolve([10, 11, 12, 13]) == {
        10: ProcessOwner("pod", UID_A, CID_A),
        11: ProcessOwner("pod", UID_B, CID_B),
        12: HOST,
        13: UNKNOWN,  # no /proc entry: never blamed on a pod, never dropped
    }


def test_cached_by_pid_and_start_time_so_a_reused_pid_is_read_again(proc: FakeProc) -> None:
    proc.place(10, v2_file(systemd_path(UID_A, CID_A)), start_time=1000)
    r = ProcessResolver(proc.root)
    assert r.resolve([10])[10].pod_uid == UID_A
    assert r.resolve([10])[10].pod_uid == UID_A
    assert r.cgroup_reads == 1  # the second cycle read only stat
    # Pod A's process ends; the kernel hands PID 10 to a process of pod B.
    proc.place(10, v2_file(systemd_path(UID_B, CID_B)), start_time=2000)
    assert r.resolve([10])[10] == ProcessOwner("pod", UID_B, CID_B)
    assert r.cgroup_reads == 2


def test_a_pid_not_listed_or_gone_is_forgotten(proc: FakeProc) -> None:
    proc.place(10, v2_file(systemd_path(UID_A, CID_A)))
    proc.place(11, v2_file(systemd_path(UID_B, CID_B)))
    r = ProcessResolver(proc.root)
    r.resolve([10, 11])
    r.resolve([10])
    assert set(r._cache) == {10}
    proc.remove(10)
    assert r.resolve([10]) == {10: UNKNOWN}
    assert r._cache == {}


def test_the_cache_is_bounded(proc: FakeProc) -> None:
    for pid in range(100, 110):
        proc.place(pid, v2_file(systemd_path(UID_A, CID_A)))
    r = ProcessResolver(proc.root, max_entries=4)
    assert len(r.resolve(range(100, 110))) == 10
    assert len(r._cache) == 4


def test_a_fifo_in_place_of_a_cgroup_file_is_unknown_not_a_hang(proc: FakeProc) -> None:
    proc.place(10, v2_file("/"))
    cgroup = proc.root / "10" / "cgroup"
    cgroup.unlink()
    os.mkfifo(cgroup)
    assert ProcessResolver(proc.root).resolve([10]) == {10: UNKNOWN}


POD = {
    "metadata": {"name": "trainer", "namespace": "ml", "uid": UID_A},
    "status": {
        "initContainerStatuses": [{"name": "fetch", "containerID": f"containerd://{'c3' * 32}"}],
        "containerStatuses": [
            {"name": "main", "containerID": f"containerd://{CID_A}"},
            {"name": "pending"},  # not started: no containerID yet
        ],
        "ephemeralContainerStatuses": [{"name": "debug", "containerID": f"cri-o://{'d4' * 32}"}],
    },
}


def test_the_pod_watch_keeps_every_container_id_without_its_runtime_prefix() -> None:
    key, meta = pod_meta(POD)
    assert key == ("ml", "trainer")
    assert dict(meta.containers) == {CID_A: "main", "c3" * 32: "fetch", "d4" * 32: "debug"}
    assert container_ids({"containerStatuses": [{"name": "x", "containerID": "docker://ABC"}]}) == (("abc", "x"),)


def test_directory_names_pod_and_container() -> None:
    d = PodDirectory(dict([pod_meta(POD)]))
    assert d.workload(ProcessOwner("pod", UID_A, CID_A)).__dict__ == {
        "scope": "pod", "namespace": "ml", "pod": "trainer", "container": "main"}  # fmt: skip
    # A container the status does not list yet: the pod is known, the container not.
    assert d.workload(ProcessOwner("pod", UID_A, "e5" * 32)).container == ""
    # A pod the watch has not seen (or no watch at all): scope pod, names empty.
    unseen = PodDirectory().workload(ProcessOwner("pod", UID_B, CID_B))
    assert (unseen.scope, unseen.namespace, unseen.pod) == ("pod", "", "")
    assert PodDirectory({("a", "b"): PodMeta("", ())}).workload(HOST).scope == "host"
