"""Render a Snapshot into text-format 0.0.4 bytes, once per collection cycle.

prometheus_client cannot serve DCGM's families (it appends `_total` to
counters and sorts labels), and rendering per scrape is what makes
dcgm-exporter slow. So the exposition is built here once per cycle, from
label prefixes escaped once per device, and every scrape gets the same bytes.
"""

from __future__ import annotations

import gzip
import platform
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import prometheus_client

from exporter import __version__
from exporter.fields import FieldSpec
from exporter.labels import PREFIX, RenderContext, escape_help, escape_label_value, format_labels
from exporter.snapshot import DeviceSample, Snapshot
from exporter.xid import XidTracker

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelSets = tuple[tuple[tuple[str, str], ...], ...]


class Contributor(Protocol):
    def render_metrics(self, ctx: RenderContext) -> str: ...


class PodAttribution(Protocol):
    def labels_for(self, gpu_uuid: str, gpu_instance_id: int | None) -> LabelSets: ...


@dataclass(frozen=True)
class Exposition:
    """One cycle's rendering; swapped atomically, shared by every scrape."""

    plain: bytes
    gzipped: bytes
    rendered_at: float


def format_value(value: float) -> str:
    if isinstance(value, int):  # backends may hand over ints; int has no is_integer() before 3.12
        return str(value)
    if value != value:  # NaN
        return "NaN"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@dataclass(frozen=True)
class _FamilyPlan:
    name: str
    from_events: bool
    header: str  # HELP and TYPE lines
    devices: list[tuple[str, tuple[str, ...]]]  # uuid -> "name{labels" per series


class Renderer:
    def __init__(
        self,
        ctx: RenderContext,
        xids: XidTracker,
        backend_name: str,
        pods: PodAttribution | None = None,
        process_registry: prometheus_client.CollectorRegistry | None = prometheus_client.REGISTRY,
    ) -> None:
        self.ctx = ctx
        self.xids = xids
        self.backend_name = backend_name
        self.pods = pods
        self.contributors: list[Contributor] = []
        self._process_registry = process_registry
        self._layout: tuple[object, ...] | None = None
        self._plan_key: object = None
        self._plan_cache: list[_FamilyPlan] = []
        self._value_text: dict[float, str] = {}
        self._lock = threading.Lock()
        self._current = Exposition(b"", gzip.compress(b""), 0.0)
        self.renders = 0

    @property
    def current(self) -> Exposition:
        return self._current

    # --- the DCGM block ---
    def _series_heads(self, sample: DeviceSample, label_fields: str) -> list[str]:
        """Label strings (inside braces) for each series of one device."""
        base = self.ctx.dcgm_labels(sample.uuid)
        if label_fields:
            base = f"{base},{label_fields}" if base else label_fields
        if self.pods is None:
            return [base]
        gi = sample.mig.gpu_instance_id if sample.mig is not None else None
        # A MIG-enabled GPU's own series are GPU-wide: pods sit on its instances.
        if sample.mig is None and sample.gpu.mig_enabled:
            return [base]
        sets = self.pods.labels_for(sample.gpu.uuid, gi)
        if not sets:
            return [base]
        return [f"{base},{format_labels(pairs)}" if pairs else base for pairs in sets]

    def _plan(self, snapshot: Snapshot, fields: Sequence[FieldSpec], label_fields: str) -> list[_FamilyPlan]:
        """Per field, the series heads of every live device: rebuilt only when the
        layout, the field set or the pod labels change, not every cycle."""
        live = [s for s in snapshot.samples if s.up]
        heads = {s.uuid: tuple(self._series_heads(s, label_fields)) for s in live}
        key = (tuple(heads.items()), tuple(fields))
        if key == self._plan_key:
            return self._plan_cache
        plan: list[_FamilyPlan] = []
        for spec in fields:
            if spec.type == "label":
                continue
            header = f"# HELP {spec.name} {escape_help(spec.help)}\n# TYPE {spec.name} {spec.type}\n"
            devices = [
                (s.uuid, tuple(f"{spec.name}{{{head}" for head in heads[s.uuid]))
                for s in live
                # MIG devices only carry per-instance fields (and the last-XID gauge is per GPU)
                if s.mig is None or (spec.scope == "instance" and spec.reader != "event")
            ]
            plan.append(_FamilyPlan(spec.name, spec.reader == "event", header, devices))
        self._plan_key, self._plan_cache = key, plan
        return plan

    def render_dcgm(self, snapshot: Snapshot, fields: Sequence[FieldSpec]) -> str:
        label_fields = ""
        if any(f.type == "label" and f.name == "DCGM_FI_DRIVER_VERSION" for f in fields):
            label_fields = f'DCGM_FI_DRIVER_VERSION="{escape_label_value(snapshot.inventory.driver_version)}"'
        values = {s.uuid: s.values for s in snapshot.samples if s.up}
        gpu_of = {s.uuid: s.gpu.uuid for s in snapshot.samples}
        # Formatted values of the previous cycle: constants (clocks, limits, zero error
        # counts) repeat every cycle and skip float formatting. Only this cycle's values
        # are kept, so counters that never repeat cannot grow it.
        previous = self._value_text
        memo: dict[float, str] = {}
        out: list[str] = []
        for fam in self._plan(snapshot, fields, label_fields):
            lines: list[str] = []
            if fam.from_events:
                for uuid, prefixes in fam.devices:
                    code, extra = self.xids.xid_labels(gpu_of[uuid])
                    lines += [f"{p},{extra}}} {code}\n" for p in prefixes]
            else:
                name = fam.name
                for uuid, prefixes in fam.devices:
                    value = values[uuid].get(name)
                    if value is None:
                        continue
                    text = memo.get(value) or previous.get(value)
                    if text is None:
                        text = "} " + format_value(value) + "\n"
                    memo[value] = text
                    if len(prefixes) == 1:  # the common case: no pod sharing the device
                        lines.append(prefixes[0] + text)
                    else:
                        lines += [p + text for p in prefixes]
            if lines:
                out.append(fam.header)
                out += lines
        self._value_text = memo
        return "".join(out)

    # --- own families ---
    def render_own(self, snapshot: Snapshot, nvml_errors: dict[tuple[str, str], int], collections: int) -> list[str]:
        ctx = self.ctx
        p = PREFIX
        build = format_labels(
            [
                ("version", __version__),
                ("backend", self.backend_name),
                ("driver_version", snapshot.inventory.driver_version),
                ("python_version", platform.python_version()),
            ]
        )
        out = [
            f"# HELP {p}build_info Build and runtime information; always 1.",
            f"# TYPE {p}build_info gauge",
            f"{p}build_info{{{build}}} 1",
            f"# HELP {p}gpus GPUs found by the last discovery.",
            f"# TYPE {p}gpus gauge",
            f"{p}gpus {len(snapshot.inventory.gpus)}",
            f"# HELP {p}device_up Whether the device was collected this cycle (0: lost or failing).",
            f"# TYPE {p}device_up gauge",
        ]
        out += [f"{p}device_up{{{ctx.device_labels(s.uuid)}}} {int(s.up)}" for s in snapshot.samples]
        out += [
            f"# HELP {p}device_data_age_seconds Age of the values served for the device; grows while its reads hang.",
            f"# TYPE {p}device_data_age_seconds gauge",
        ]
        out += [
            f"{p}device_data_age_seconds{{{ctx.device_labels(s.uuid)}}} {format_value(round(s.age_s, 3))}"
            for s in snapshot.samples
        ]
        out += [
            f"# HELP {p}collection_duration_seconds Duration of the last collection cycle.",
            f"# TYPE {p}collection_duration_seconds gauge",
            f"{p}collection_duration_seconds {format_value(round(snapshot.duration_s, 6))}",
            f"# HELP {p}last_collection_timestamp_seconds Unix time the last collection cycle ended.",
            f"# TYPE {p}last_collection_timestamp_seconds gauge",
            f"{p}last_collection_timestamp_seconds {format_value(round(snapshot.taken_at, 3))}",
            f"# HELP {p}collections_total Collection cycles run.",
            f"# TYPE {p}collections_total counter",
            f"{p}collections_total {collections}",
            f"# HELP {p}nvml_errors_total NVML errors by field (* for whole-device failures) and error.",
            f"# TYPE {p}nvml_errors_total counter",
        ]
        out += [
            f"{p}nvml_errors_total{{{format_labels([('field', f), ('error', e)])}}} {n}"
            for (f, e), n in sorted(nvml_errors.items())
        ]
        return out

    def render(
        self,
        snapshot: Snapshot,
        fields: Sequence[FieldSpec],
        nvml_errors: dict[tuple[str, str], int],
        collections: int,
    ) -> Exposition:
        layout = snapshot.inventory.layout_key()
        if layout != self._layout:
            self.ctx.rebuild(snapshot.inventory)
            self._layout = layout
        text = self.render_dcgm(snapshot, fields)
        text += self.xids.render_count_family(self.ctx, [g.uuid for g in snapshot.inventory.gpus])
        text += "\n".join(self.render_own(snapshot, nvml_errors, collections)) + "\n"
        text += "".join(c.render_metrics(self.ctx) for c in self.contributors)
        body = text.encode("utf-8")
        if self._process_registry is not None:
            body += prometheus_client.generate_latest(self._process_registry)
        expo = Exposition(body, gzip.compress(body, compresslevel=6), snapshot.taken_at)
        with self._lock:
            self._current = expo
            self.renders += 1
        return expo

