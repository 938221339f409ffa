"""GPU process -> pod and container: `<host-proc>/<pid>/cgroup`, cached by PID and start time, then
named through the node's pod watch.

A PID is only an identity together with its start time (`<host-proc>/<pid>/stat` field 22, clock
ticks since boot): the kernel reuses PIDs, and a cache keyed by PID alone would hand a finished
pod's attribution to whatever process gets its number next. Each cycle reads the start time of
every listed PID (one small read) and the cgroup file only when the pair is new. Entries for PIDs
no longer listed are dropped, and the cache is bounded besides.

Three outcomes, none dropped: `pod` (the cgroup names a pod), `host` (it names none: a host
process, or a container outside Kubernetes) and `unknown` (no `/proc` entry could be read: the
process ended between NVML's list and the read, or --host-proc is not the host's /proc). Unknown
is ours to fix, never blamed on a workload.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from exporter.boundedread import RefusedFile
from exporter.pods.cgroups import parse_cgroup_file
from exporter.pods.kube import PodMeta

Scope = Literal["pod", "host", "unknown"]
_CGROUP_LIMIT = 64 << 10  # a deeply nested v1 host has a few hundred bytes per controller line
_STAT_LIMIT = 8 << 10
_START_TIME_FIELD = 22  # proc(5): starttime, 1-based


@dataclass(frozen=True)
class ProcessOwner:
    scope: Scope
    pod_uid: str = ""
    container_id: str = ""  # without the runtime's `containerd://` prefix


UNKNOWN = ProcessOwner("unknown")
HOST = ProcessOwner("host")


def read_small(path: str, limit: int) -> bytes:
    """A `/proc` file's bytes (at most `limit`). Opened non-blocking and checked to be a regular file
    on the open descriptor, so a FIFO or device planted in a --host-proc tree is refused, never waited
    on. Leaner than exporter.boundedread (no stat before the open): it runs per listed PID per read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RefusedFile("not a regular file")
        chunks: list[bytes] = []
        left = limit
        while left > 0:  # procfs may hand a file over in more than one read
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_start_time(host_proc: Path | str, pid: int) -> int:
    """Field 22 of `<host_proc>/<pid>/stat`. Raises OSError (gone, unreadable) or ValueError (malformed)."""
    text = read_small(f"{host_proc}/{pid}/stat", _STAT_LIMIT).decode("ascii", "replace")
    # comm (field 2) is in parentheses and may hold spaces and ')': the fields resume after the last ')'.
    _, sep, rest = text.rpartition(")")
    if not sep:
        raise ValueError("no ')' after the command name")
    fields = rest.split()
    return int(fields[_START_TIME_FIELD - 3])  # rest starts at field 3


class ProcessResolver:
    """PID -> ProcessOwner, cached by (PID, start time). Used from one thread (the collection loop)."""

    def __init__(self, host_proc: Path, *, max_entries: int = 4096) -> None:
        self.host_proc = host_proc
        self._root = str(host_proc)  # string paths: pathlib's joins cost more than the reads here
        self.max_entries = max_entries
        self._cache: dict[int, tuple[int, ProcessOwner]] = {}
        self.cgroup_reads = 0  # how often a cgroup file was read (cache misses), for tests and benchmarks

    def resolve(self, pids: Iterable[int]) -> dict[int, ProcessOwner]:
        """The owner of each PID listed this cycle; PIDs not listed are forgotten."""
        out: dict[int, ProcessOwner] = {}
        for pid in pids:
            if pid not in out:
                out[pid] = self._owner(pid)
        for pid in [p for p in self._cache if p not in out]:
            del self._cache[pid]
        return out

    def _owner(self, pid: int) -> ProcessOwner:
        try:
            start = read_start_time(self._root, pid)
        except (OSError, ValueError, IndexError):
            self._cache.pop(pid, None)
            return UNKNOWN
        cached = self._cache.get(pid)
        if cached is not None and cached[0] == start:
            return cached[1]
        try:
            text = read_small(f"{self._root}/{pid}/cgroup", _CGROUP_LIMIT).decode("utf-8", "replace")
        except OSError:
            self._cache.pop(pid, None)
            return UNKNOWN
        self.cgroup_reads += 1
        found = parse_cgroup_file(text)
        owner = HOST if found is None else ProcessOwner("pod", found.pod_uid, found.container_id)
        if len(self._cache) >= self.max_entries and pid not in self._cache:
            del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[pid] = (start, owner)
        return owner


@dataclass(frozen=True)
class Workload:
    """What a process's metrics are labelled with."""

    scope: Scope
    namespace: str = ""
    pod: str = ""
    container: str = ""


@dataclass(frozen=True)
class _PodEntry:
    namespace: str
    name: str
    containers: Mapping[str, str]  # container ID -> name


class PodDirectory:
    """Pod UID and container ID -> namespace, pod, container, from the pod watch's items."""

    def __init__(self, pods: Mapping[Any, PodMeta] | None = None) -> None:
        self._by_uid: dict[str, _PodEntry] = {}
        for (namespace, name), meta in (pods or {}).items():
            if meta.uid:
                self._by_uid[meta.uid.lower()] = _PodEntry(namespace, name, dict(meta.containers))

    def workload(self, owner: ProcessOwner) -> Workload:
        if owner.scope != "pod":
            return Workload(owner.scope)
        entry = self._by_uid.get(owner.pod_uid)
        if entry is None:  # no pod watch (no -k, no NODE_NAME), or a pod it has not seen yet
            return Workload("pod")
        return Workload("pod", entry.namespace, entry.name, entry.containers.get(owner.container_id, ""))
