"""Who uses how much of a shared GPU (--process-metrics, docs/gpu-share.md): the families and /gpus's
`processes` key, from the processes the collector lists per device (`Snapshot.processes`).

`on_snapshot` runs in the collection loop after each cycle: it resolves the PIDs of a new process
read to pods (exporter.pods.processes: cached, one stat read per PID) and publishes an immutable
view that `render_metrics` (the same thread) and /gpus (the server's thread) read without locks.
Series are per pod and container on each device, never per PID unless --process-metrics per-pid
asks for it: PIDs come and go every job, and a label per PID would grow the series without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.family import DEVICE_LABELS, Family
from exporter.labels import RenderContext, format_labels
from exporter.model import GpuProcess
from exporter.pods.kube import PodMeta
from exporter.pods.processes import UNKNOWN, PodDirectory, ProcessOwner, ProcessResolver, Workload
from exporter.render import format_value
from exporter.snapshot import Snapshot

PART = "gpu_share"
_WORKLOAD_LABELS = f"{DEVICE_LABELS}, scope, namespace, pod, container"
_PER_PID_NOTE = (
    "Served with --process-metrics. `scope`: pod, host (a process in no pod) or unknown (its /proc entry "
    "could not be read); host and unknown have empty namespace, pod and container. per-pid adds `pid`."
)
POD_MEMORY = Family(
    "gpuhealth_pod_gpu_memory_used_bytes",
    "gauge",
    "GPU memory used by a pod's container on the device, in bytes: the sum over its processes NVML lists.",
    _WORKLOAD_LABELS,
    PART,
    _PER_PID_NOTE,
)


def _util_family(name: str, what: str) -> Family:
    return Family(
        f"gpuhealth_pod_{name}_utilization_ratio",
        "gauge",
        f"{what} utilisation by a pod's container on the device, as a ratio 0-1: the sum of its "
        "processes' NVML samples since the last read, capped at 1.",
        _WORKLOAD_LABELS,
        PART,
        _PER_PID_NOTE,
    )


POD_SM = _util_family("sm", "SM")
POD_MEMORY_UTIL = _util_family("memory", "Memory (frame buffer bandwidth)")
POD_ENCODER = _util_family("encoder", "Encoder")
POD_DECODER = _util_family("decoder", "Decoder")
GPU_PROCESSES = Family(
    "gpuhealth_gpu_processes",
    "gauge",
    "Processes NVML lists on the device (a count), in_pod true for those whose cgroup names a pod.",
    f"{DEVICE_LABELS}, in_pod",
    PART,
    "Served with --process-metrics, for each device whose process query worked.",
)
FAMILIES = (POD_MEMORY, POD_SM, POD_MEMORY_UTIL, POD_ENCODER, POD_DECODER, GPU_PROCESSES)
# GpuProcess field -> family, in the order of the exposition
_UTIL_FIELDS = (
    ("sm_util", POD_SM),
    ("mem_util", POD_MEMORY_UTIL),
    ("enc_util", POD_ENCODER),
    ("dec_util", POD_DECODER),
)

PodItems = Callable[[], "tuple[int, Mapping[Any, PodMeta]] | None"]


@dataclass(frozen=True)
class _Row:
    """One series key's totals: memory in bytes, utilisation in percent (None: nothing known)."""

    memory: int | None
    utils: tuple[float | None, ...]  # in _UTIL_FIELDS order


@dataclass(frozen=True)
class _View:
    rows: Mapping[str, tuple[tuple[tuple[tuple[str, str], ...], _Row], ...]]  # uuid -> (labels, row), sorted
    counts: Mapping[str, tuple[int, int]]  # uuid -> (in a pod, not)
    # uuid -> each process with its owner and names: /gpus builds its JSON from these only when asked
    processes: Mapping[str, tuple[tuple[GpuProcess, ProcessOwner, Workload], ...]]


def _add(a: float | int | None, b: float | int | None) -> Any:
    return b if a is None else a if b is None else a + b


class GpuShare:
    """The contributor (render_metrics) and /gpus's processes key, for --process-metrics."""

    metrics_part = PART

    def __init__(self, host_proc: Path, *, per_pid: bool = False, pod_items: PodItems | None = None) -> None:
        self.resolver = ProcessResolver(host_proc)
        self.per_pid = per_pid
        self._pod_items = pod_items
        self._directory = PodDirectory()
        self._directory_version: int | None = None
        self._read_at: float | None = None
        self._owners: dict[int, ProcessOwner] = {}
        self._processes: Mapping[str, tuple[GpuProcess, ...]] = {}
        self._view = _View({}, {}, {})

    # ------------------------------------------------------------------ collection-loop side

    def on_snapshot(self, snapshot: Snapshot) -> None:
        fresh = snapshot.processes_read_at != self._read_at
        if fresh:
            self._read_at = snapshot.processes_read_at
            self._processes = snapshot.processes
            self._owners = self.resolver.resolve(p.pid for procs in snapshot.processes.values() for p in procs)
        renamed = self._refresh_directory()
        if fresh or renamed:
            self._view = self._build()

    def _refresh_directory(self) -> bool:
        items = self._pod_items() if self._pod_items is not None else None
        version = items[0] if items is not None else None
        if version == self._directory_version:
            return False
        self._directory_version = version
        self._directory = PodDirectory(items[1] if items is not None else None)
        return True

    def _build(self) -> _View:
        rows: dict[str, tuple[tuple[tuple[tuple[str, str], ...], _Row], ...]] = {}
        counts: dict[str, tuple[int, int]] = {}
        entries: dict[str, tuple[tuple[GpuProcess, ProcessOwner, Workload], ...]] = {}
        named: dict[ProcessOwner, Workload] = {}  # a pod's processes share one owner: name it once
        for uuid, procs in self._processes.items():
            groups: dict[tuple[tuple[str, str], ...], _Row] = {}
            in_pod = 0
            listed = []
            for p in procs:
                owner = self._owners.get(p.pid, UNKNOWN)
                work = named.get(owner)
                if work is None:
                    work = named[owner] = self._directory.workload(owner)
                in_pod += owner.scope == "pod"
                key = self._labels(work, p.pid)
                row = groups.get(key)
                utils = (p.sm_util, p.mem_util, p.enc_util, p.dec_util)  # in _UTIL_FIELDS order
                if row is None:
                    groups[key] = _Row(p.used_memory_bytes, utils)
                else:
                    merged = tuple(_add(a, b) for a, b in zip(row.utils, utils, strict=True))
                    groups[key] = _Row(_add(row.memory, p.used_memory_bytes), merged)
                listed.append((p, owner, work))
            rows[uuid] = tuple(sorted(groups.items()))
            counts[uuid] = (in_pod, len(procs) - in_pod)
            entries[uuid] = tuple(listed)
        return _View(rows, counts, entries)

    def _labels(self, work: Workload, pid: int) -> tuple[tuple[str, str], ...]:
        labels = (
            ("scope", work.scope),
            ("namespace", work.namespace),
            ("pod", work.pod),
            ("container", work.container),
        )
        return (*labels, ("pid", str(pid))) if self.per_pid else labels

    def render_metrics(self, ctx: RenderContext) -> str:
        view = self._view
        out = [POD_MEMORY.header]
        series: list[tuple[str, _Row]] = []  # (device labels + workload labels, row) for the devices the context knows
        for uuid in sorted(view.rows):
            dev = ctx.device_labels(uuid)
            if dev:
                series.extend((f"{dev},{format_labels(labels)}", row) for labels, row in view.rows[uuid])
        out.extend(POD_MEMORY.sample(labels, row.memory) for labels, row in series if row.memory is not None)
        for i, (_field, family) in enumerate(_UTIL_FIELDS):
            out.append(family.header)
            for labels, row in series:
                value = row.utils[i]
                if value is not None:
                    # Percent to ratio; rounded so 34.9 % reads 0.349, not 0.34900000000000003.
                    out.append(family.sample(labels, format_value(round(min(1.0, value / 100.0), 6))))
        out.append(GPU_PROCESSES.header)
        for uuid in sorted(view.counts):
            dev = ctx.device_labels(uuid)
            if dev:
                in_pod, other = view.counts[uuid]
                out.append(GPU_PROCESSES.sample(f'{dev},in_pod="true"', in_pod))
                out.append(GPU_PROCESSES.sample(f'{dev},in_pod="false"', other))
        return "".join(out)

    # ------------------------------------------------------------------ /gpus

    def add_processes(self, devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """/gpus's devices with a `processes` key each: the list NVML gave at the last read, or null
        for a device whose query failed or that was not read yet."""
        entries = self._view.processes
        out = []
        for device in devices:
            listed = entries.get(str(device.get("uuid", "")))
            processes = [_process_json(*entry) for entry in listed] if listed is not None else None
            out.append({**device, "processes": processes})
        return out


def _process_json(p: GpuProcess, owner: ProcessOwner, work: Workload) -> dict[str, Any]:
    return {
        "pid": p.pid,
        "kind": p.kind,
        "used_memory_bytes": p.used_memory_bytes,
        "sm_util": p.sm_util,
        "mem_util": p.mem_util,
        "enc_util": p.enc_util,
        "dec_util": p.dec_util,
        "scope": work.scope,
        "namespace": work.namespace,
        "pod": work.pod,
        "container": work.container,
        "pod_uid": owner.pod_uid,
        "container_id": owner.container_id,
    }
