"""dcgm-exporter's own `DCGM_EXP_*` families, served only while the counters file lists them.

dcgm-exporter computes these itself rather than reading a DCGM field. As there, each is emitted only
when its line is in the counters file (`-f`), with that line's TYPE and HELP (the file's words, not
ours: so these are not `exporter.family.Family` declarations and not in docs/metrics.md's own
families), and with the labels dcgm-exporter writes: the DCGM device labels
(`RenderContext.dcgm_labels`), then, sorted by name as its text template writes a Go map, the
counters file's label fields (`DCGM_FI_DRIVER_VERSION`) and the family's own labels.

- DCGM_EXP_XID_ERRORS_COUNT{window_size_in_ms, xid}: XIDs per code within
  `--xid-count-window-size` (exporter/xid.py's window).
- DCGM_EXP_CLOCK_EVENTS_COUNT{clock_event, window_size_in_ms}: per clock event reason, the
  collection cycles within `--clock-events-count-window-size` whose
  DCGM_FI_DEV_CLOCKS_EVENT_REASONS sample had that reason's bit set (dcgm-exporter counts every
  sample DCGM kept in the window, one per watch interval; ours are one per cycle). The collector
  reads the field while this family is listed, exported or not (`Collector.set_counters`).
- DCGM_EXP_GPU_HEALTH_STATUS{health_error_code, health_watch}: one series per GPU and DCGM health
  watch system, 0 pass / 10 warn / 20 fail, derived from the health engine's verdicts
  (HEALTH_MAPPING below says how).
- DCGM_EXP_P2P_STATUS{link_status, peer_gpu}: for every GPU and every other GPU (`peer_gpu`, its
  NVML index), the NVLink P2P status NVML reports between them (`Inventory.p2p_status`, read at
  discovery: nvmlDeviceGetP2PStatus with NVML_P2P_CAPS_INDEX_NVLINK, as DCGM's
  CreateNvlinkP2PStatus asks), as the value (nvmlGpuP2PStatus_t) and as dcgm-exporter's
  `link_status` text (OK, ChipsetNotSupported, ...). A driver that cannot say gives no series.

The two window counts follow dcgm-exporter's expcollector.go: a device with nothing in the window
gets one series of value 0 without the `xid`/`clock_event` label; a device whose clock samples in
the window had no known reason bit set gets no series at all (upstream records the device, then
finds nothing to count). Devices are taken as dcgm-exporter's flexible mode (`-d f`) takes them: a
GPU's MIG instances when the snapshot has any (each with its parent GPU's counts, as upstream
counts per GPU), else the GPU; under `--mig-layout parent`, the GPUs. The health status is per GPU,
every GPU found (upstream's health group holds every supported GPU, whatever `-d` selects). Pod
labels are added as dcgm-exporter's pod mapper adds them, sorted with the family's own labels.

Upstream facts (NVIDIA/dcgm-exporter d5e5f510, DCGM as mirrored): dcgm-exporter
internal/pkg/collector/expcollector.go, clock_events_collector.go, xid_collector.go,
gpu_health_collector.go, collector_factory.go, base_collector.go, const.go, pkg/cmd/app.go (flags,
label fields copied to the exporter counters, field dependencies),
internal/pkg/rendermetrics/render_metrics.go (label order); DCGM modules/health/DcgmHealthWatch.cpp
(BuildXidMappings and the per-system checks), dcgmlib/dcgm_structs.h (health results),
dcgmlib/dcgm_errors.h (DCGM_FR_* numbers).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import structlog

from exporter.counters import CounterSet, ExporterCounter
from exporter.entities import dcgm_targets
from exporter.fields import FieldSpec
from exporter.health.verdict import HealthState, HealthView, Reason
from exporter.labels import MigLayout, RenderContext, escape_help, format_labels, label_field_values
from exporter.model import Gpu, Inventory, MigDevice
from exporter.render import PodAttribution
from exporter.snapshot import DeviceSample, Snapshot
from exporter.xid import XidTracker

log = structlog.get_logger("exporter.dcgmexp")

XID_ERRORS_COUNT = "DCGM_EXP_XID_ERRORS_COUNT"
CLOCK_EVENTS_COUNT = "DCGM_EXP_CLOCK_EVENTS_COUNT"
GPU_HEALTH_STATUS = "DCGM_EXP_GPU_HEALTH_STATUS"
P2P_STATUS = "DCGM_EXP_P2P_STATUS"

# Lines accepted by the counters file that this exporter cannot serve: skipped with this reason.
NOT_SUPPORTED: dict[str, str] = {}

# nvmlGpuP2PStatus_t -> dcgm-exporter's link_status text (its collector/const.go); others read Unknown.
P2P_STATUS_TEXT: dict[int, str] = {
    0: "OK",
    1: "ChipsetNotSupported",
    2: "GPUNotSupported",
    3: "TopologyNotSupported",
    4: "DisabledByRegKey",
    5: "NotSupported",
    6: "Unknown",
}

CLOCK_REASONS_FIELD = "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"
DRIVER_VERSION_FIELD = "DCGM_FI_DRIVER_VERSION"

# DCGM_CLOCKS_EVENT_REASON_* bits and dcgm-exporter's `clock_event` label values
# (clock_events_collector.go clockEventToString); other bits are not counted, as upstream.
CLOCK_EVENTS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "clocks_setting"),
    (0x004, "power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal"),
    (0x040, "hw_thermal"),
    (0x080, "hw_power_brake"),
    (0x100, "display_clocks"),
)

# Per GPU, so that a very long window at a short interval cannot grow memory without bound; past it
# the count saturates.
MAX_CLOCK_SAMPLES = 100_000

# --- health -----------------------------------------------------------------------------------

# dcgm_structs.h dcgmHealthWatchResults_t.
PASS, WARN, FAIL = 0, 10, 20

# dcgm-exporter's series per GPU, in its order (gpu_health_collector.go gpuHealthChecks), with its
# `health_watch` names.
HEALTH_WATCHES = ("PCIE", "NVLINK", "PMU", "MCU", "MEM", "SM", "INFOROM", "THERMAL", "POWER", "DRIVER", "ALL")

# `health_error_code` as dcgm-exporter spells DCGM's codes (healthCheckErrorToStringMap): DCGM's
# DCGM_FR_CLOCKS_EVENT_THERMAL/POWER (10, 12) under their older names, and DCGM_FR_CONTAINED_ERROR
# (131), missing from that map, as its fallback DCGM_FR_UNKNOWN(<n>).
FR_OK = "DCGM_FR_OK"
FR_XID = "DCGM_FR_XID_ERROR"
FR_THERMAL = "DCGM_FR_CLOCK_THROTTLE_THERMAL"
FR_POWER = "DCGM_FR_CLOCK_THROTTLE_POWER"
FR_CONTAINED = "DCGM_FR_UNKNOWN(131)"

# DCGM's XID -> (health watch, code) (DcgmHealthWatch.cpp BuildXidMappings: the "devastating" XIDs
# under ALL, the others under their subsystem). XID 93 is InfoROM on Volta only there; we cannot
# tell the architecture and map it anyway.
DCGM_XID_WATCH: dict[int, tuple[str, str]] = {
    48: ("ALL", FR_XID),
    74: ("ALL", FR_XID),
    79: ("ALL", "DCGM_FR_FALLEN_OFF_BUS"),
    94: ("ALL", FR_CONTAINED),
    95: ("ALL", "DCGM_FR_UNCONTAINED_ERROR"),
    119: ("ALL", FR_XID),
    120: ("ALL", FR_XID),
    140: ("ALL", FR_XID),
    31: ("MEM", FR_XID),
    32: ("MEM", FR_XID),
    43: ("MEM", FR_XID),
    63: ("MEM", "DCGM_FR_PENDING_PAGE_RETIREMENTS"),
    64: ("MEM", "DCGM_FR_ROW_REMAP_FAILURE"),
    38: ("PCIE", FR_XID),
    39: ("PCIE", FR_XID),
    42: ("PCIE", FR_XID),
    60: ("THERMAL", FR_THERMAL),
    61: ("THERMAL", FR_XID),
    62: ("THERMAL", FR_XID),
    54: ("POWER", FR_XID),
    56: ("POWER", FR_XID),
    57: ("POWER", FR_POWER),
    58: ("POWER", FR_XID),
    78: ("POWER", FR_XID),
    67: ("NVLINK", FR_XID),
    73: ("NVLINK", FR_XID),
    121: ("NVLINK", FR_XID),
    137: ("NVLINK", FR_XID),
    93: ("INFOROM", "DCGM_FR_CORRUPT_INFOROM"),
}

# Our other reasons (exporter/health/signals.py, engine.py) -> DCGM's check of the same condition.
# Where DCGM has none, the GPU-wide bucket ALL (where DCGM puts the XIDs no subsystem owns).
SIGNAL_WATCH: dict[str, tuple[str, str]] = {
    "dbe": ("MEM", "DCGM_FR_VOLATILE_DBE_DETECTED"),  # MEM check of volatile DBEs
    "row_remap_failure": ("MEM", "DCGM_FR_ROW_REMAP_FAILURE"),
    "row_remap_pending": ("MEM", "DCGM_FR_PENDING_ROW_REMAP"),
    "retired_pages_pending": ("MEM", "DCGM_FR_PENDING_PAGE_RETIREMENTS"),
    # DCGM's THERMAL check reads the thermal violation time; ours, the hardware slowdown bits.
    "hw_slowdown": ("THERMAL", FR_THERMAL),
    "gpu_lost": ("ALL", "DCGM_FR_FALLEN_OFF_BUS"),  # what XID 79 reads
    "gpu_vanished": ("ALL", "DCGM_FR_FALLEN_OFF_BUS"),
    "nvml_error": ("ALL", "DCGM_FR_NVML_API"),
    "nvml_timeout": ("ALL", "DCGM_FR_NVML_API"),
}

# DRIVER check of the GPU recovery action (NVML_GPU_RECOVERY_ACTION_*); DCGM checks 1..4 only.
RECOVERY_ACTION_CODES: dict[str, str] = {
    "1": "DCGM_FR_GPU_RECOVERY_RESET",
    "2": "DCGM_FR_GPU_RECOVERY_REBOOT",
    "3": "DCGM_FR_GPU_RECOVERY_DRAIN_P2P",
    "4": "DCGM_FR_GPU_RECOVERY_DRAIN_RESET",
}

HEALTH_MAPPING_DOC = """\
How our health reasons become DCGM health-watch incidents (value: the reason's own state, 20 for
unhealthy, 10 for degraded; a reason that leaves the device healthy is no incident):
- xid: DCGM's own XID table (DCGM_XID_WATCH); an XID DCGM does not watch: ALL, DCGM_FR_XID_ERROR.
- dbe, row_remap_failure, row_remap_pending, retired_pages_pending: MEM.
- recovery_action: DRIVER (DCGM_FR_GPU_RECOVERY_*; actions past 4: DCGM_FR_UNKNOWN).
- hw_slowdown: THERMAL.  gpu_lost, gpu_vanished, nvml_error, nvml_timeout: ALL.
- blind spots (unmonitored, monitor_fault, missing health fields) are no incident: DCGM would not
  report them. A GPU whose verdict is unknown (the monitor cannot see it) gets no series: upstream
  serves none when its health check fails.
Several reasons on one watch: the worst one's value and code (upstream keeps one incident per
watch). MIG instances' reasons count for their GPU."""


def reason_watch(reason: Reason) -> tuple[str, str] | None:
    """(health_watch, health_error_code) for one of our reasons, None for no incident."""
    if reason.state not in (HealthState.DEGRADED, HealthState.UNHEALTHY):
        return None  # healthy (an application XID) or unknown (a blind spot)
    if reason.signal == "xid":
        code = int(reason.code) if reason.code.isdigit() else None
        return DCGM_XID_WATCH.get(code, ("ALL", FR_XID)) if code is not None else ("ALL", FR_XID)
    if reason.signal == "recovery_action":
        return "DRIVER", RECOVERY_ACTION_CODES.get(reason.code, "DCGM_FR_UNKNOWN")
    return SIGNAL_WATCH.get(reason.signal)


def health_incidents(reasons: Iterable[Reason]) -> dict[str, tuple[int, str]]:
    """health_watch -> (value, health_error_code) of the worst reason on it; watches without any: absent."""
    out: dict[str, tuple[int, str]] = {}
    for reason in reasons:
        watch = reason_watch(reason)
        if watch is None:
            continue
        value = FAIL if reason.state is HealthState.UNHEALTHY else WARN
        system, code = watch
        if value > out.get(system, (PASS, FR_OK))[0]:
            out[system] = (value, code)
    return out


# --- clock event window -----------------------------------------------------------------------


class ClockEventWindow:
    """Per GPU, the clock event reason bitmask of every cycle, kept for the window."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def observe(self, snapshot: Snapshot) -> None:
        """Record this cycle's samples: fresh GPU reads only (a stale one repeats an old sample)."""
        now = self._clock()
        with self._lock:
            for s in snapshot.samples:
                if s.mig is not None or not s.up or s.stale:
                    continue
                value = s.values.get(CLOCK_REASONS_FIELD)
                if value is None:  # not supported, or failed this cycle: no sample, as DCGM's blank
                    continue
                q = self._samples.setdefault(s.gpu.uuid, deque(maxlen=MAX_CLOCK_SAMPLES))
                q.append((now, int(value)))

    def counts(self, gpu_uuid: str) -> dict[int, int] | None:
        """Bit -> samples in the window with it set; None when the window holds no sample at all."""
        cutoff = self._clock() - self.window_s
        with self._lock:
            q = self._samples.get(gpu_uuid)
            while q and q[0][0] < cutoff:
                q.popleft()
            if not q:
                return None
            counts: dict[int, int] = {}
            for _, bits in q:
                for bit, _name in CLOCK_EVENTS:
                    if bits & bit:
                        counts[bit] = counts.get(bit, 0) + 1
            return counts


# --- the contributor --------------------------------------------------------------------------


Labels = Sequence[FieldSpec]  # the counters file's label fields


def window_ms(window_s: float) -> str:
    return str(round(window_s * 1000))


def header(counter: ExporterCounter) -> str:
    """The file's HELP and TYPE; a histogram or summary (or label) line is served as a gauge, as
    exporter/counters.py serves such DCGM fields: one bare sample cannot be a histogram."""
    type_ = counter.type if counter.type in ("gauge", "counter") else "gauge"
    return f"# HELP {counter.name} {escape_help(counter.help)}\n# TYPE {counter.name} {type_}\n"


class DcgmExpFamilies:
    """The renderer's contributor for the listed DCGM_EXP_* families.

    `on_snapshot` runs in the collector thread before each render; `set_counters` at load and on
    SIGHUP (it swaps one tuple, read once per render)."""

    metrics_part = "dcgm_exp"  # the part label of gpuhealth_render_success

    def __init__(
        self,
        counters: CounterSet,
        xids: XidTracker,
        health: HealthView,
        clock_window_s: float,
        clock: Callable[[], float] = time.monotonic,
        mig_layout: MigLayout = "dcgm",
        pods: PodAttribution | None = None,
    ) -> None:
        self.mig_layout = mig_layout
        self.pods = pods
        self.xids = xids
        self.health = health
        self.clock_events = ClockEventWindow(clock_window_s, clock)
        self._snapshot: Snapshot | None = None
        self.listed: tuple[ExporterCounter, ...] = ()
        self.set_counters(counters)

    def set_counters(self, counters: CounterSet) -> None:
        listed = []
        for counter in counters.exporter_counters:
            why = NOT_SUPPORTED.get(counter.name)
            if why is not None:
                log.warning("counter_skipped", field=counter.name, source=counters.source, reason=why)
            elif counter.name in _RENDER:
                listed.append(counter)
            else:
                log.warning(
                    "counter_skipped", field=counter.name, source=counters.source, reason="unknown DCGM_EXP family"
                )
        self.listed = tuple(listed)

    def on_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self.clock_events.observe(snapshot)

    def render_metrics(self, ctx: RenderContext) -> str:
        snapshot, listed = self._snapshot, self.listed
        if snapshot is None or not listed:
            return ""
        labels = [f for f in snapshot.fields if f.type == "label"]
        return "".join(_RENDER[c.name](self, ctx, snapshot, c, labels) for c in listed)

    def _with_pods(self, fields: dict[str, str], gpu: Gpu, mig: MigDevice | None) -> list[dict[str, str]]:
        """The device's label fields once per pod set on it (dcgm-exporter's pod mapper labels these
        families too; its attributes sort with the family's labels). A MIG-enabled GPU's own series
        carry no pod: pods sit on its instances."""
        if self.pods is None or (mig is None and gpu.mig_enabled):
            return [fields]
        sets = self.pods.labels_for(gpu.uuid, mig.gpu_instance_id if mig is not None else None)
        return [{**fields, **dict(pairs)} for pairs in sets] if sets else [fields]

    # --- one family each ---
    def _xid_count(self, ctx: RenderContext, snap: Snapshot, c: ExporterCounter, labels: Labels) -> str:
        window = window_ms(self.xids.window_s)
        lines: list[str] = []
        for s in window_entities(snap, self.mig_layout):
            rows = [(str(k), n) for k, n in sorted(self.xids.window_counts(s.gpu.uuid).items())]
            for fields in self._with_pods(label_fields(labels, s.gpu, snap.inventory), s.gpu, s.mig):
                lines += _counted(ctx, c.name, s.uuid, fields, window, "xid", rows)
        return header(c) + "".join(lines) if lines else ""  # no device, no family

    def _clock_count(self, ctx: RenderContext, snap: Snapshot, c: ExporterCounter, labels: Labels) -> str:
        window = window_ms(self.clock_events.window_s)
        lines: list[str] = []
        for s in window_entities(snap, self.mig_layout):
            counts = self.clock_events.counts(s.gpu.uuid)
            # nothing sampled in the window: the zero series; sampled, but no reason set: no series
            # (upstream's empty map)
            rows = [] if counts is None else [(name, counts[bit]) for bit, name in CLOCK_EVENTS if bit in counts]
            if counts is not None and not rows:
                continue
            for fields in self._with_pods(label_fields(labels, s.gpu, snap.inventory), s.gpu, s.mig):
                lines += _counted(ctx, c.name, s.uuid, fields, window, "clock_event", rows)
        return header(c) + "".join(lines) if lines else ""  # no device, no family

    def _health_status(self, ctx: RenderContext, snap: Snapshot, c: ExporterCounter, labels: Labels) -> str:
        lines: list[str] = []
        for gpu in snap.inventory.gpus:
            verdict = self.health.verdict(gpu.uuid)
            if verdict.state is HealthState.UNKNOWN:
                continue
            reasons = list(verdict.reasons)
            for mig in gpu.migs:
                reasons += self.health.verdict(mig.uuid).reasons
            incidents = health_incidents(reasons)
            base = ctx.dcgm_labels(gpu.uuid)
            fields = label_fields(labels, gpu, snap.inventory)
            for with_pods in self._with_pods(fields, gpu, None):
                for watch in HEALTH_WATCHES:
                    value, code = incidents.get(watch, (PASS, FR_OK))
                    extra = {**with_pods, "health_error_code": code, "health_watch": watch}
                    lines.append(f"{c.name}{{{_join(base, extra)}}} {value}\n")
        return header(c) + "".join(lines) if lines else ""  # no device, no family

    def _p2p_status(self, ctx: RenderContext, snap: Snapshot, c: ExporterCounter, labels: Labels) -> str:
        inventory = snap.inventory
        index = {g.uuid: g.index for g in inventory.gpus}
        by_gpu: dict[str, list[tuple[int, int]]] = {}
        for uuid, peer, status in inventory.p2p_status:
            if uuid in index and peer in index:
                by_gpu.setdefault(uuid, []).append((index[peer], status))
        lines: list[str] = []
        for gpu in inventory.gpus:
            base = ctx.dcgm_labels(gpu.uuid)
            fields = label_fields(labels, gpu, inventory)
            for with_pods in self._with_pods(fields, gpu, None):
                for peer_index, status in sorted(by_gpu.get(gpu.uuid, ())):
                    text = P2P_STATUS_TEXT.get(status, "Unknown")
                    extra = {**with_pods, "link_status": text, "peer_gpu": str(peer_index)}
                    lines.append(f"{c.name}{{{_join(base, extra)}}} {status}\n")
        return header(c) + "".join(lines) if lines else ""  # no pair known, no family


_Render = Callable[[DcgmExpFamilies, RenderContext, Snapshot, ExporterCounter, Labels], str]
_RENDER: dict[str, _Render] = {
    XID_ERRORS_COUNT: DcgmExpFamilies._xid_count,
    CLOCK_EVENTS_COUNT: DcgmExpFamilies._clock_count,
    GPU_HEALTH_STATUS: DcgmExpFamilies._health_status,
    P2P_STATUS: DcgmExpFamilies._p2p_status,
}


def label_fields(fields: Sequence[FieldSpec], gpu: Gpu, inventory: Inventory) -> dict[str, str]:
    """The counters file's label fields and this device's values for them, as the DCGM block writes
    them (dcgm-exporter copies its label counters onto these families: pkg/cmd/app.go getCounters)."""
    return dict(label_field_values(fields, gpu, inventory))


def window_entities(snapshot: Snapshot, mig_layout: MigLayout) -> list[DeviceSample]:
    """The samples with a window-count series, counted per GPU: the devices that carry every field
    in the DCGM block (a GPU's instances under the dcgm layout, the GPUs under the parent layout)."""
    return [t.sample for t in dcgm_targets(snapshot.samples, mig_layout) if t.all_fields]


def _join(base: str, extra: dict[str, str]) -> str:
    # Go templates range over a map in key order: the CSV's label fields and the family's labels, sorted.
    labels = format_labels(sorted(extra.items()))
    return f"{base},{labels}" if base else labels


def _counted(
    ctx: RenderContext,
    name: str,
    uuid: str,
    fields: dict[str, str],
    window: str,
    label: str,
    rows: Sequence[tuple[str, int]],
) -> list[str]:
    """One device's window count series; the zero series (without `label`) when `rows` is empty."""
    base = ctx.dcgm_labels(uuid)
    common = {**fields, "window_size_in_ms": window}
    if not rows:
        return [f"{name}{{{_join(base, common)}}} 0\n"]
    return [f"{name}{{{_join(base, {**common, label: value})}}} {n}\n" for value, n in rows]
