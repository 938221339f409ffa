"""Render a Snapshot into text-format 0.0.4 bytes, once per collection cycle.

prometheus_client cannot serve DCGM's families (it appends `_total` to
counters and sorts labels), and rendering per scrape is what makes
dcgm-exporter slow. So the exposition is built here once per cycle, from
label prefixes escaped once per device, and every scrape gets the same bytes.
Values are written as dcgm-exporter writes them (int64 fields whole, doubles with
six decimals), on the devices `exporter.entities.dcgm_targets` picks for the MIG layout.

The exposition is made of parts (the DCGM block, the core families, each
contributor such as the DCGM_EXP_* families), each rendered in isolation as node_exporter
isolates its collectors: a part that raises is logged and its last good text
served, so one broken contributor cannot freeze every other family.
`gpuhealth_render_success{part=...}` says which parts are current.
"""

from __future__ import annotations

import gzip
import platform
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import prometheus_client
import structlog

from exporter import __version__
from exporter.entities import Target, dcgm_targets
from exporter.family import DEVICE_LABELS, Family
from exporter.fields import Event, FieldSpec
from exporter.labels import MigLayout, RenderContext, escape_help, format_labels, label_field_values
from exporter.logs import Reminder
from exporter.model import Inventory
from exporter.snapshot import Snapshot
from exporter.xid import XidTracker

log = structlog.get_logger("exporter.render")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The core part's families (render_own) and the renderer's own render_success.
BUILD_INFO = Family(
    "gpuhealth_build_info",
    "gauge",
    "Build and runtime information; always 1.",
    "version, backend, driver_version, python_version",
    "core",
)
GPUS = Family("gpuhealth_gpus", "gauge", "GPUs found by the last discovery.", "", "core")
DEVICE_UP = Family(
    "gpuhealth_device_up",
    "gauge",
    "1 if the device's values were read this cycle; 0 if it is lost, failing, or its read is hung past "
    "the deadline (its last good values are served then, see device_data_age_seconds).",
    DEVICE_LABELS,
    "core",
)
DEVICE_DATA_AGE = Family(
    "gpuhealth_device_data_age_seconds",
    "gauge",
    "Age of the values served for the device; grows while its reads hang.",
    DEVICE_LABELS,
    "core",
)
COLLECTION_DURATION = Family(
    "gpuhealth_collection_duration_seconds", "gauge", "Duration of the last collection cycle.", "", "core"
)
LAST_COLLECTION = Family(
    "gpuhealth_last_collection_timestamp_seconds", "gauge", "Unix time the last collection cycle ended.", "", "core"
)
COLLECTIONS = Family("gpuhealth_collections_total", "counter", "Collection cycles run.", "", "core")
NVML_ERRORS = Family(
    "gpuhealth_nvml_errors_total",
    "counter",
    "NVML errors by field (* for whole-device failures) and error.",
    "field, error",
    "core",
)
RENDER_SUCCESS = Family(
    "gpuhealth_render_success",
    "gauge",
    "1 if this part of the exposition rendered in the last cycle; 0 if it failed and its last good output is served.",
    "part",
    "renderer",  # written by the renderer itself, outside every part
)
# The core part's, in the order written; RENDER_SUCCESS comes last in every exposition.
FAMILIES = (
    BUILD_INFO,
    GPUS,
    DEVICE_UP,
    DEVICE_DATA_AGE,
    COLLECTION_DURATION,
    LAST_COLLECTION,
    COLLECTIONS,
    NVML_ERRORS,
)

PodLabels = tuple[tuple[str, str], ...]
LabelSets = tuple[PodLabels, ...]


class Contributor(Protocol):
    """A part of the exposition with its own families (docs/architecture.md, "Contributors").

    A contributor may name itself with a `metrics_part: str` class attribute (the `part`
    label of gpuhealth_render_success and of render_part_failed logs); without one the
    name is derived from its class name (see part_name). Not part of the protocol's
    signature, so that contributors without it still type-check."""

    def render_metrics(self, ctx: RenderContext) -> str: ...


def part_name(contributor: object) -> str:
    """The contributor's `metrics_part`, else its class name in snake_case (PodMapper -> pod_mapper):
    stable across restarts, so alerts and dashboards can name it."""
    name = getattr(contributor, "metrics_part", None)
    if isinstance(name, str) and name:
        return name
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type(contributor).__name__).lower()


class PodAttribution(Protocol):
    def labels_for(self, gpu_uuid: str, gpu_instance_id: int | None) -> LabelSets: ...


@dataclass(frozen=True)
class Exposition:
    """One cycle's rendering; swapped atomically, shared by every scrape.

    `rendered_at` is the snapshot time (Unix seconds) of the last render() that completed;
    0.0 before the first. It only advances when a whole render succeeds: a render() that
    raises leaves the previous Exposition in place, so the age of `rendered_at` tells how
    stale the served bytes are (readiness is based on it). A render in which some parts
    failed still completes: those parts serve their last good text and say so in
    gpuhealth_render_success."""

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
    name: str  # the canonical field name: the key of the values
    from_events: bool
    header: str  # HELP and TYPE lines
    # Per series target: whose values (a device's UUID: itself, or under the dcgm MIG layout the
    # parent GPU for GPU-wide fields) and its "name{labels" heads (one per pod sharing it).
    devices: list[tuple[str, tuple[str, ...]]]
    format: Callable[[float], str]
    # Event-filled families (the last-XID gauge): per device, (head without its closing brace, pod labels).
    event_devices: list[tuple[str, tuple[tuple[str, PodLabels], ...]]]


def format_int64(value: float) -> str:
    """An int64 DCGM field as dcgm-exporter prints it (Go's %d): whole, truncated toward zero."""
    return str(int(value))


def format_double(value: float) -> str:
    """A double DCGM field as dcgm-exporter prints it (Go's %f): six decimals, "52.636000"."""
    return f"{value:.6f}"


_FORMATS: dict[str, Callable[[float], str]] = {"int64": format_int64, "double": format_double}


class Renderer:
    def __init__(
        self,
        ctx: RenderContext,
        xids: XidTracker,
        backend_name: str,
        pods: PodAttribution | None = None,
        process_registry: prometheus_client.CollectorRegistry | None = prometheus_client.REGISTRY,
        mig_layout: MigLayout = "dcgm",
    ) -> None:
        self.ctx = ctx
        self.xids = xids
        self.backend_name = backend_name
        self.pods = pods
        self.mig_layout = mig_layout
        self.contributors: list[Contributor] = []
        self._process_registry = process_registry
        self._layout: tuple[object, ...] | None = None
        self._plan_key: object = None
        self._plan_cache: list[_FamilyPlan] = []
        self._value_text: dict[Callable[[float], str], dict[float, str]] = {}
        # Label-field text per device, kept while the inventory and the label fields stay the same.
        self._label_text_key: tuple[Inventory, Sequence[FieldSpec]] | None = None
        self._label_text: dict[str, str] = {}
        self._lock = threading.Lock()
        self._current = Exposition(b"", gzip.compress(b""), 0.0)
        self.renders = 0
        # Per part: the text of its last good rendering and how many cycles in a row it failed.
        # Touched only by render(), which runs in the collection thread.
        self._last_good: dict[str, bytes] = {}
        self._failing: dict[str, int] = {}
        # A part failing every cycle says so when it starts (with the traceback), then once a minute.
        self.reminder = Reminder()

    @property
    def current(self) -> Exposition:
        return self._current

    # --- the DCGM block ---
    def _series_heads(self, target: Target, label_fields: str) -> list[tuple[str, PodLabels]]:
        """Per series of one device: its label text (inside braces) without the pod labels, and
        the pod labels (none: one series without them)."""
        sample = target.sample
        base = self.ctx.dcgm_labels(sample.uuid)
        if label_fields:
            base = f"{base},{label_fields}" if base else label_fields
        if self.pods is None:
            return [(base, ())]
        gi = sample.mig.gpu_instance_id if sample.mig is not None else None
        # A MIG-enabled GPU's own series are GPU-wide: pods sit on its instances.
        if sample.mig is None and sample.gpu.mig_enabled:
            return [(base, ())]
        sets = self.pods.labels_for(sample.gpu.uuid, gi)
        if not sets:
            return [(base, ())]
        return [(base, pairs) for pairs in sets]

    def _label_texts(self, snapshot: Snapshot, fields: Sequence[FieldSpec]) -> dict[str, str]:
        """GPU UUID -> its label fields as label text; rebuilt only when the inventory or the fields change."""
        inventory = snapshot.inventory
        key = (inventory, fields)  # held, not its id: a new inventory can never look like the old one
        if self._label_text_key is None or key[0] is not self._label_text_key[0] or key[1] != self._label_text_key[1]:
            labels = [f for f in fields if f.type == "label"]
            self._label_text = {
                gpu.uuid: format_labels(label_field_values(labels, gpu, inventory)) for gpu in inventory.gpus
            }
            self._label_text_key = key
        return self._label_text

    def _plan(self, snapshot: Snapshot, fields: Sequence[FieldSpec]) -> list[_FamilyPlan]:
        """Per field, the series heads of every target device: rebuilt only when the
        layout, the field set or the pod labels change, not every cycle."""
        targets = dcgm_targets((s for s in snapshot.samples if s.up), self.mig_layout)
        label_text = self._label_texts(snapshot, fields)
        heads = {t.sample.uuid: tuple(self._series_heads(t, label_text[t.sample.gpu.uuid])) for t in targets}
        key = (tuple(heads.items()), tuple(fields), tuple((t.sample.uuid, t.parent_uuid) for t in targets))
        if key == self._plan_key:
            return self._plan_cache
        plan: list[_FamilyPlan] = []
        for spec in fields:
            if spec.type == "label":
                continue
            metric = spec.metric_name
            header = f"# HELP {metric} {escape_help(spec.help)}\n# TYPE {metric} {spec.type}\n"
            from_events = isinstance(spec.reader, Event)
            devices: list[tuple[str, tuple[str, ...]]] = []
            event_devices: list[tuple[str, tuple[tuple[str, PodLabels], ...]]] = []
            for t in targets:
                uuid = t.sample.uuid
                instance_scope = spec.scope == "instance" and not from_events
                if t.sample.mig is not None and not t.all_fields and not instance_scope:
                    continue  # parent layout: MIG devices only carry per-instance fields (the XID gauge is per GPU)
                source = uuid
                if t.parent_uuid is not None and not instance_scope:
                    source = t.parent_uuid
                if from_events:
                    event_devices.append((source, tuple((f"{metric}{{{base}", pods) for base, pods in heads[uuid])))
                    continue
                prefixes = tuple(
                    f"{metric}{{{base},{format_labels(pods)}" if pods else f"{metric}{{{base}"
                    for base, pods in heads[uuid]
                )
                devices.append((source, prefixes))
            fmt = _FORMATS.get(spec.value_type, format_value)
            plan.append(_FamilyPlan(spec.name, from_events, header, devices, fmt, event_devices))
        self._plan_key, self._plan_cache = key, plan
        return plan

    def render_dcgm(self, snapshot: Snapshot, fields: Sequence[FieldSpec]) -> str:
        values = {s.uuid: s.values for s in snapshot.samples if s.up}
        gpu_of = {s.uuid: s.gpu.uuid for s in snapshot.samples}
        no_values: dict[str, float] = {}
        # Formatted values of the previous cycle: constants (clocks, limits, zero error
        # counts) repeat every cycle and skip float formatting. Only this cycle's values
        # are kept, so counters that never repeat cannot grow it. One memo per value format:
        # 52.0 is "52" for an int64 field and "52.000000" for a double one.
        previous_by_format = self._value_text
        memo_by_format: dict[Callable[[float], str], dict[float, str]] = {}
        nothing: dict[float, str] = {}
        out: list[str] = []
        for fam in self._plan(snapshot, fields):
            lines: list[str] = []
            if fam.from_events:
                for uuid, heads in fam.event_devices:
                    code, attributes = self.xids.xid_attributes(gpu_of[uuid])
                    # dcgm-exporter writes err_code/err_msg and the pod labels as one map: sorted together.
                    lines += [
                        f"{prefix},{format_labels(sorted((*attributes, *pods)))}}} {code}\n" for prefix, pods in heads
                    ]
            else:
                name = fam.name
                memo = memo_by_format.get(fam.format)
                if memo is None:
                    memo = memo_by_format[fam.format] = {}
                previous = previous_by_format.get(fam.format, nothing)
                for uuid, prefixes in fam.devices:
                    value = values.get(uuid, no_values).get(name)
                    if value is None or value != value:  # absent, or NaN: blank in DCGM, never sent
                        continue
                    text = memo.get(value) or previous.get(value)
                    if text is None:
                        text = "} " + fam.format(value) + "\n"
                    memo[value] = text
                    if len(prefixes) == 1:  # the common case: no pod sharing the device
                        lines.append(prefixes[0] + text)
                    else:
                        lines += [p + text for p in prefixes]
            if lines:
                out.append(fam.header)
                out += lines
        self._value_text = memo_by_format
        return "".join(out)

    # --- own families ---
    def render_own(self, snapshot: Snapshot) -> str:
        """The core part: build info, discovery, per-device freshness, the collection loop, NVML errors."""
        ctx = self.ctx
        build = format_labels(
            [
                ("version", __version__),
                ("backend", self.backend_name),
                ("driver_version", snapshot.inventory.driver_version),
                ("python_version", platform.python_version()),
            ]
        )
        samples = snapshot.samples
        heads = [ctx.device_labels(s.uuid) for s in samples]
        # A read hung past its deadline is not "collected": the values served are the last good ones.
        up = [int(s.up and not s.stale) for s in samples]
        age = [format_value(round(s.age_s, 3)) for s in samples]
        out = [
            BUILD_INFO.header,
            BUILD_INFO.sample(build, 1),
            GPUS.header,
            GPUS.scalar(len(snapshot.inventory.gpus)),
            DEVICE_UP.header,
            DEVICE_UP.samples(zip(heads, up, strict=True)),
            DEVICE_DATA_AGE.header,
            DEVICE_DATA_AGE.samples(zip(heads, age, strict=True)),
            COLLECTION_DURATION.header,
            COLLECTION_DURATION.scalar(format_value(round(snapshot.duration_s, 6))),
            LAST_COLLECTION.header,
            LAST_COLLECTION.scalar(format_value(round(snapshot.taken_at, 3))),
            COLLECTIONS.header,
            COLLECTIONS.scalar(snapshot.collections),
            NVML_ERRORS.header,
        ]
        errors = sorted(snapshot.nvml_errors.items())
        out += [NVML_ERRORS.sample(format_labels([("field", f), ("error", e)]), n) for (f, e), n in errors]
        return "".join(out)

    # --- parts, each isolated ---
    def _render_part(self, part: str, render: Callable[[], str], success: dict[str, bool]) -> bytes:
        """`render()`'s text as UTF-8, or on failure the part's last good bytes (b"" if none yet)."""
        try:
            text = render()
            if text and not text.endswith("\n"):
                # It would glue its last line to the next part's first and break the whole exposition.
                raise ValueError(f"output does not end with a newline: ...{text[-40:]!r}")
            body = text.encode("utf-8")  # here, so that a lone surrogate fails this part only
        except Exception as exc:
            success[part] = False
            streak = self._failing[part] = self._failing.get(part, 0) + 1
            if self.reminder.due(part):
                error = f"{type(exc).__name__}: {exc}"
                if streak == 1:  # the traceback once per streak: the rest would repeat it
                    log.error("render_part_failed", part=part, error=error, exc_info=True)
                else:
                    log.error("render_part_failed", part=part, error=error, failed_cycles=streak)
            return self._last_good.get(part, b"")
        success[part] = True
        self._last_good[part] = body
        streak = self._failing.pop(part, 0)
        if streak:
            self.reminder.clear(part)
            log.info("render_part_recovered", part=part, failed_cycles=streak)
        return body

    def _contributor_parts(self) -> list[tuple[str, Contributor]]:
        # Distinct names, or the success gauge would carry duplicate series.
        seen: dict[str, int] = {}
        parts = []
        for c in self.contributors:
            name = part_name(c)
            seen[name] = seen.get(name, 0) + 1
            parts.append((name if seen[name] == 1 else f"{name}_{seen[name]}", c))
        return parts

    @staticmethod
    def render_success(success: dict[str, bool]) -> bytes:
        """gpuhealth_render_success for every part of this cycle: rendered by the renderer
        itself, outside the parts, so it is there even when every part failed."""
        lines = [RENDER_SUCCESS.header]
        lines += [RENDER_SUCCESS.sample(format_labels([("part", part)]), int(ok)) for part, ok in success.items()]
        return "".join(lines).encode("utf-8")

    def render(self, snapshot: Snapshot) -> Exposition:
        """Render the exposition and make it current. Raises (keeping the previous one
        current) only when something all parts share fails; a failing part does not."""
        layout = snapshot.inventory.layout_key()
        if layout != self._layout:
            self.ctx.rebuild(snapshot.inventory)
            self._layout = layout
        success: dict[str, bool] = {}
        texts = [
            self._render_part("dcgm", lambda: self.render_dcgm(snapshot, snapshot.fields), success),
            self._render_part("core", lambda: self.render_own(snapshot), success),
        ]
        for name, contributor in self._contributor_parts():
            texts.append(self._render_part(name, partial(contributor.render_metrics, self.ctx), success))
        texts.append(self.render_success(success))
        body = b"".join(texts)
        if self._process_registry is not None:
            body += prometheus_client.generate_latest(self._process_registry)
        expo = Exposition(body, gzip.compress(body, compresslevel=6), snapshot.taken_at)
        with self._lock:
            self._current = expo
            self.renders += 1
        return expo
