"""Health verdicts and the small interface the device plugin consumes."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


class HealthState(enum.IntEnum):
    """HEALTHY < DEGRADED < UNHEALTHY are ordered by severity; the metric value is the int.

    UNKNOWN is outside that order: the monitor itself cannot judge the device (NVML failing for
    a reason of ours). It never changes what is allocatable, is never persisted, and gives way to
    UNHEALTHY: a fenced device stays fenced while we cannot look at it.
    """

    HEALTHY = 0
    DEGRADED = 1
    UNHEALTHY = 2
    UNKNOWN = 3


# How bad a state is for someone watching: not seeing a GPU is worse than a warning about it,
# better than a fence.
_CONCERN = {HealthState.HEALTHY: 0, HealthState.DEGRADED: 1, HealthState.UNKNOWN: 2, HealthState.UNHEALTHY: 3}


def is_worse(state: HealthState, than: HealthState) -> bool:
    """Whether a change from `than` to `state` deserves a warning."""
    return _CONCERN[state] > _CONCERN[than]


def combine(states: Iterable[HealthState]) -> HealthState:
    """The verdict of a set of reasons: the worst judged state, or UNKNOWN over anything but a fence."""
    worst = HealthState.HEALTHY
    unknown = False
    for state in states:
        if state is HealthState.UNKNOWN:
            unknown = True
        elif state > worst:
            worst = state
    if unknown and worst is not HealthState.UNHEALTHY:
        return HealthState.UNKNOWN
    return worst


@dataclass(frozen=True)
class Reason:
    signal: str  # "xid", "dbe", "row_remap_failure", "gpu_lost", "nvml_timeout", ...
    code: str  # XID number, recovery action number, NVML error name; "" when none
    message: str
    first_seen: float
    last_seen: float
    count: int
    action: str  # "none", "restart_app", "reset_gpu", "reboot_node", "contact_support"
    state: HealthState  # what this reason alone makes of the device


@dataclass(frozen=True)
class Verdict:
    uuid: str  # GPU-... or MIG-...
    state: HealthState
    reasons: tuple[Reason, ...] = ()

    @property
    def healthy_for_scheduling(self) -> bool:
        """Degraded devices stay allocatable; only unhealthy ones are fenced."""
        return self.state is not HealthState.UNHEALTHY


class HealthView(Protocol):
    """What the device plugin (and anything else that acts) needs from health."""

    def verdict(self, uuid: str) -> Verdict:
        """The verdict for a GPU or MIG UUID (a MIG device inherits a fenced parent)."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread, quickly) after any verdict changes."""
        ...

    def verdicts(self) -> Mapping[str, Verdict]: ...
