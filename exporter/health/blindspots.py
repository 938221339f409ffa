"""What the engine cannot see, kept apart from what it saw.

Three blind spots, none of them a fault of the GPU, so nothing here is persisted as a reason or
ever fences:

- monitor faults: NVML failing for a reason of ours (library not initialised, driver missing or
  of another version, no permission: the adapter raises MonitorError), or the same failure on
  every GPU in one cycle (a driver container restart, revoked device access). A GPU cannot be
  judged then: its verdict is `unknown` until the monitor recovers, and it returns to the
  verdict it had. One GPU failing while its neighbours read fine is that GPU's own fault.
- GPUs whose XID events are not registered (`unmonitored`, DEGRADED: the NVIDIA DRA driver
  taints such a device the same way): XIDs on them would be missed.
- health fields (ECC, row remapping, retired pages, recovery action) that GPUs of this model
  reported before and this one now does not: that check is blind on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from exporter.family import DEVICE_LABELS, Family
from exporter.health import policy as p
from exporter.health.signals import HEALTH_FIELDS
from exporter.health.verdict import HealthState, Reason
from exporter.labels import RenderContext, escape_label_value
from exporter.model import Gpu
from exporter.snapshot import DeviceSample, Snapshot

MONITOR_FAULT = "monitor_fault"
UNMONITORED = "unmonitored"

# A GPU whose events are down for less than this is being re-registered (the event thread
# rebuilds its set after an error), not unmonitored.
UNMONITORED_GRACE_S = 5.0

# Rendered by the health part (HealthEngine.render_metrics) after expose's families; only while 1.
SIGNAL_MISSING = Family(
    "gpuhealth_health_signal_missing",
    "gauge",
    "1 while a health field that GPUs of this model reported before is not supported on this GPU: that health "
    "check is blind on it.",
    f"{DEVICE_LABELS}, field",
    "health",
    note="Only served while 1.",
)
FAMILIES = (SIGNAL_MISSING,)


def monitor_faults(snap: Snapshot) -> dict[str, str]:
    """UUID -> error for every device whose failure this cycle is the monitor's, not its own."""
    gpus = [s for s in snap.samples if s.mig is None]
    failing = [s for s in gpus if not s.up or s.stale]
    errors = {s.error or "unknown" for s in failing}
    if len(gpus) >= 2 and len(failing) == len(gpus) and len(errors) == 1:
        # The same failure on every GPU at once says more about us than about any of them.
        error = errors.pop()
        faulty = {s.uuid: error for s in gpus}
    else:
        faulty = {s.uuid: s.error for s in gpus if s.monitor_fault}
    out = dict(faulty)
    for s in snap.samples:
        if s.mig is not None and (s.gpu.uuid in faulty or s.monitor_fault):
            out[s.uuid] = faulty.get(s.gpu.uuid) or s.error
    return out


def monitor_fault_reason(error: str, now: float) -> Reason:
    return Reason(
        MONITOR_FAULT,
        error,
        f"NVML cannot read this device ({error}) for a reason that is not the device's; verdict unknown",
        now,
        now,
        1,
        p.NONE,
        HealthState.UNKNOWN,
    )


class XidCoverage:
    """Which GPUs the event thread watches; GPUs left out for longer than the grace are unmonitored."""

    def __init__(self, grace_s: float = UNMONITORED_GRACE_S) -> None:
        self.grace_s = grace_s
        self.monitored: frozenset[str] | None = None  # None: no registration attempt finished yet
        self._since: dict[str, float] = {}

    def update(self, monitored: frozenset[str]) -> None:
        self.monitored = monitored

    def unmonitored(self, gpus: Iterable[Gpu], now: float) -> dict[str, float]:
        """GPU UUID -> since when, for GPUs unmonitored past the grace period."""
        monitored = self.monitored
        if monitored is None:
            return {}
        current = {g.uuid for g in gpus if g.uuid not in monitored}
        self._since = {u: self._since.get(u, now) for u in current}
        return {u: t for u, t in self._since.items() if now - t >= self.grace_s}


def unmonitored_reason(since: float, now: float) -> Reason:
    return Reason(
        UNMONITORED,
        "",
        "XID events of this GPU are not registered: XIDs on it would be missed",
        since,
        now,
        1,
        p.NONE,
        HealthState.DEGRADED,
    )


def model_key(gpu: Gpu) -> str:
    """What a GPU supports depends on its model and on its MIG mode (row remapping, for one)."""
    return f"{gpu.name} (MIG)" if gpu.mig_enabled else gpu.name


def signal_coverage(sample: DeviceSample, seen: Mapping[str, set[str]]) -> tuple[list[str], frozenset[str]]:
    """(health fields this GPU reported that its model had not yet, health fields it lost)."""
    known = seen.get(model_key(sample.gpu), set())
    values = sample.values
    new = [f for f in HEALTH_FIELDS if f in values and f not in known]
    missing = frozenset(f for f in HEALTH_FIELDS if f in sample.unsupported and f in known)
    return new, missing


def render_signal_missing(ctx: RenderContext, missing: Mapping[str, frozenset[str]]) -> str:
    if not any(missing.values()):
        return ""
    fam = SIGNAL_MISSING
    lines = [fam.header]
    for uuid, fields in sorted(missing.items()):
        head = ctx.device_labels(uuid)
        lines += [fam.sample(f'{head},field="{escape_label_value(f)}"', 1) for f in sorted(fields)]
    return "".join(lines)
