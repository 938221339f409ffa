"""Polled signals: one collection cycle's sample of a device -> findings.

Kept free of engine state except the small per-device trackers here, so every rule can be tested
with a hand-made DeviceSample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from exporter.fields import CLOCK_EVENT_HW_POWER_BRAKE, CLOCK_EVENT_HW_SLOWDOWN, CLOCK_EVENT_HW_THERMAL
from exporter.health import policy as p
from exporter.health.verdict import HealthState
from exporter.snapshot import DeviceSample

DBE_VOL = "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"
SBE_VOL = "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"
ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
ROW_REMAP_FAILURE = "DCGM_FI_DEV_ROW_REMAP_FAILURE"
ROW_REMAP_PENDING = "DCGM_FI_DEV_ROW_REMAP_PENDING"
RETIRED_PENDING = "DCGM_FI_DEV_RETIRED_PENDING"
RECOVERY_ACTION = "DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION"
CLOCK_REASONS = "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"

# The polled fields the verdicts rest on: one that a GPU stops reporting is a blind spot.
HEALTH_FIELDS = (DBE_VOL, ROW_REMAP_FAILURE, ROW_REMAP_PENDING, RETIRED_PENDING, RECOVERY_ACTION)

# Counters that only a GPU reset (or reboot) sets back: a decrease means the GPU was reset.
RESET_COUNTERS = (DBE_VOL, SBE_VOL, ENERGY)
HW_SLOWDOWN_BITS = CLOCK_EVENT_HW_SLOWDOWN | CLOCK_EVENT_HW_THERMAL | CLOCK_EVENT_HW_POWER_BRAKE


@dataclass(frozen=True)
class Finding:
    signal: str
    code: str
    state: HealthState
    action: str
    message: str
    count: int = 1
    # Level findings describe a condition that holds now: seen again next cycle, they do not add to
    # the count, and a degraded one goes away with the condition. Edge findings (an increase) add
    # `count`. Unhealthy reasons of either kind stay until cleared.
    level: bool = True


@dataclass
class Tracker:
    """Per-device memory between cycles (not persisted except `baseline`)."""

    baseline: dict[str, float] = field(default_factory=dict)
    slowdown_since: float | None = None
    failing_since: float | None = None


@dataclass
class Evaluation:
    findings: list[Finding]
    observed: bool  # values were fresh: absent level conditions may be retired
    reset_detected: bool


def evaluate(sample: DeviceSample, tracker: Tracker, now: float, pol: p.Policy) -> Evaluation:
    findings: list[Finding] = []
    if not sample.up:
        tracker.slowdown_since = None
        if sample.error == "lost":
            findings.append(
                Finding("gpu_lost", "GPU_IS_LOST", HealthState.UNHEALTHY, p.REBOOT_NODE, "NVML reports the GPU is lost")
            )
        else:
            # Failing as a whole (not one field): fence only once it outlasts the grace period,
            # the same patience we give a hung read.
            if tracker.failing_since is None:
                tracker.failing_since = now
            if now - tracker.failing_since >= pol.nvml_timeout_grace_s:
                findings.append(
                    Finding(
                        "nvml_error",
                        sample.error or "unknown",
                        HealthState.UNHEALTHY,
                        p.RESET_GPU,
                        f"device reads failing for {now - tracker.failing_since:.0f}s",
                    )
                )
        return Evaluation(findings, observed=False, reset_detected=False)
    tracker.failing_since = None
    if sample.stale:
        if sample.age_s >= pol.nvml_timeout_grace_s:
            findings.append(
                Finding(
                    "nvml_timeout",
                    sample.error or "timeout",
                    HealthState.UNHEALTHY,
                    p.RESET_GPU,
                    f"device reads hung for {sample.age_s:.0f}s",
                )
            )
        return Evaluation(findings, observed=False, reset_detected=False)
    if sample.mig is not None:
        # Health fields are GPU-wide; the parent's sample carries them.
        return Evaluation(findings, observed=True, reset_detected=False)

    v = sample.values
    reset = any(k in v and k in tracker.baseline and v[k] < tracker.baseline[k] for k in RESET_COUNTERS)
    if not reset and DBE_VOL in v and DBE_VOL in tracker.baseline and v[DBE_VOL] > tracker.baseline[DBE_VOL]:
        delta = int(v[DBE_VOL] - tracker.baseline[DBE_VOL])
        findings.append(
            Finding(
                "dbe",
                "",
                HealthState.UNHEALTHY,
                p.RESET_GPU,
                "volatile double-bit ECC error count increased",
                count=max(delta, 1),
                level=False,
            )
        )
    for k in RESET_COUNTERS:
        if k in v:
            tracker.baseline[k] = v[k]

    if v.get(ROW_REMAP_FAILURE, 0) >= 1:
        findings.append(Finding("row_remap_failure", "", HealthState.UNHEALTHY, p.RESET_GPU, "row remapping failed"))
    if v.get(ROW_REMAP_PENDING, 0) >= 1:
        findings.append(
            Finding(
                "row_remap_pending",
                "",
                HealthState.DEGRADED,
                p.RESET_GPU,
                "row remapping pending: reset the GPU to apply it",
            )
        )
    if v.get(RETIRED_PENDING, 0) > 0:
        findings.append(
            Finding(
                "retired_pages_pending",
                "",
                HealthState.DEGRADED,
                p.RESET_GPU,
                "page retirement pending: reset the GPU to apply it",
            )
        )
    ra = int(v.get(RECOVERY_ACTION, 0))
    if ra != 0:
        state, action, message = p.recovery_action(ra)
        code = str(ra) if ra in p.RECOVERY_ACTIONS else "other"  # bounded set of codes
        findings.append(Finding("recovery_action", code, state, action, message))

    bits = int(v.get(CLOCK_REASONS, 0)) & HW_SLOWDOWN_BITS
    if bits:
        if tracker.slowdown_since is None:
            tracker.slowdown_since = now
        if now - tracker.slowdown_since >= pol.slowdown_s:
            findings.append(
                Finding(
                    "hw_slowdown",
                    "",
                    HealthState.DEGRADED,
                    p.NONE,
                    f"sustained hardware slowdown (clock event reasons 0x{bits:x})",
                )
            )
    elif CLOCK_REASONS in v:
        tracker.slowdown_since = None
    return Evaluation(findings, observed=True, reset_detected=reset)
