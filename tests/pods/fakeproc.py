"""A fake host /proc for --host-proc: `<pid>/stat` and `<pid>/cgroup` as the kernel writes them, for
PIDs of real processes the test started (or any number), placed in the pod cgroup of one's choice."""

from __future__ import annotations

from pathlib import Path

SYSTEMD_QOS = {"guaranteed": "", "burstable": "-burstable", "besteffort": "-besteffort"}


def systemd_path(pod_uid: str, container_id: str, qos: str = "burstable") -> str:
    """containerd with the systemd driver (cgroup v2's usual layout)."""
    q = SYSTEMD_QOS[qos]
    esc = pod_uid.replace("-", "_")
    parent = f"/kubepods.slice/kubepods{q}.slice" if q else "/kubepods.slice"
    return f"{parent}/kubepods{q}-pod{esc}.slice/cri-containerd-{container_id}.scope"


def cgroupfs_path(pod_uid: str, container_id: str, qos: str = "besteffort") -> str:
    """The cgroupfs driver (cgroup v1's usual layout)."""
    return (
        f"/kubepods/{qos}/pod{pod_uid}/{container_id}"
        if qos != "guaranteed"
        else f"/kubepods/pod{pod_uid}/{container_id}"
    )


def v2_file(path: str) -> str:
    return f"0::{path}\n"


def v1_file(path: str) -> str:
    controllers = ("pids", "memory", "devices", "cpu,cpuacct", "cpuset")
    lines = [f"{i}:{c}:{path}" for i, c in enumerate(controllers, start=2)]
    return "\n".join([*lines, "1:name=systemd:/system.slice/containerd.service", "0::/"]) + "\n"


def stat_line(pid: int, start_time: int, comm: str = "python3") -> str:
    # proc(5): pid (comm) state ppid ... field 22 is starttime; comm may hold spaces and ')'.
    after = ["S", "1"] + ["0"] * 17 + [str(start_time)] + ["0"] * 30
    return f"{pid} ({comm}) {' '.join(after)}\n"


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def place(self, pid: int, cgroup: str, *, start_time: int = 1000, comm: str = "python3") -> None:
        d = self.root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "cgroup").write_text(cgroup)
        (d / "stat").write_text(stat_line(pid, start_time, comm))

    def remove(self, pid: int) -> None:
        d = self.root / str(pid)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
