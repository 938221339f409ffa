"""Health policy as data: what each XID and polled signal means, and what to do about it.

The XID facts (default class, action, message, scope) are `exporter.xidcatalog`'s, which follows
/work/shared/reference/xid-catalog.md (NVIDIA's Ampere+ catalogue and the behaviour of peers).
Operators override classes with --health-{fence,warn,ignore}-xids; the scope (whole GPU or one MIG
instance) and the message of an XID stay those of the catalogue.

Scope decision: an XID attributed to a GPU instance fences only the MIG devices of that instance,
unless the fault lies in hardware every instance shares (DRAM/ECC/row remapping, GSP, the
micro-controller, the bus, NVLink, initialisation). For those `whole_gpu` is True and the parent GPU
is marked, which fences every MIG device of it. Engine/context faults (13, 31, 43, 94, 109, ...)
follow the attribution.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from exporter.config import DEFAULTS
from exporter.health.verdict import HealthState
from exporter.xidcatalog import ACTIONS as ACTIONS
from exporter.xidcatalog import CATALOGUE, UNKNOWN
from exporter.xidcatalog import CONTACT_SUPPORT as CONTACT_SUPPORT
from exporter.xidcatalog import NONE as NONE
from exporter.xidcatalog import REBOOT_NODE as REBOOT_NODE
from exporter.xidcatalog import RESET_GPU as RESET_GPU
from exporter.xidcatalog import RESTART_APP as RESTART_APP
from exporter.xidcatalog import xid_message as xid_message


class PolicyError(ValueError):
    """Invalid health configuration; the message names the flag and the offending value."""


class XidClass(str, enum.Enum):
    APPLICATION = "application"  # the application's fault: counted only
    WARN = "warn"  # degraded: still schedulable, worth a look
    FENCE = "fence"  # unhealthy: no new work until explicitly cleared
    IGNORE = "ignore"  # operator said so: counted only

    @property
    def state(self) -> HealthState:
        if self is XidClass.FENCE:
            return HealthState.UNHEALTHY
        if self is XidClass.WARN:
            return HealthState.DEGRADED
        return HealthState.HEALTHY


# Recommended actions (the Reason.action vocabulary) are the catalogue's: NONE, RESTART_APP,
# RESET_GPU, REBOOT_NODE, CONTACT_SUPPORT (ACTIONS), re-exported here.

# Highest first: what an operator should do when a device carries several reasons.
ACTION_RANK = {CONTACT_SUPPORT: 4, REBOOT_NODE: 3, RESET_GPU: 2, RESTART_APP: 1, NONE: 0}

# NVML reports XIDs as an unsigned int; real codes are < 256 today. Anything outside this range in an
# event is folded into 999 ("unknown") so that a misbehaving driver cannot grow our tables.
XID_MIN = 1
XID_MAX = 1023
XID_UNKNOWN = 999


@dataclass(frozen=True)
class XidRule:
    xid: int
    cls: XidClass
    action: str
    message: str
    whole_gpu: bool


@dataclass(frozen=True)
class _Row:
    cls: XidClass
    action: str
    message: str
    whole_gpu: bool = False


# The catalogue with its default classes as XidClass, built once.
_TABLE: dict[int, _Row] = {
    code: _Row(XidClass(e.cls), e.action, e.message, e.whole_gpu) for code, e in CATALOGUE.items()
}
_UNKNOWN_ROW = _Row(XidClass(UNKNOWN.cls), UNKNOWN.action, UNKNOWN.message, UNKNOWN.whole_gpu)


def normalise_xid(code: int) -> int:
    return code if XID_MIN <= code <= XID_MAX else XID_UNKNOWN


@dataclass(frozen=True)
class Policy:
    """Validated health configuration; build it with Policy.build()."""

    overrides: dict[int, XidClass] = field(default_factory=dict)
    nvml_timeout_grace_s: float = DEFAULTS.health_nvml_timeout_grace_s
    slowdown_s: float = DEFAULTS.health_slowdown_s
    auto_recover: bool = False

    @classmethod
    def build(
        cls,
        fence_xids: Iterable[int] = (),
        warn_xids: Iterable[int] = (),
        ignore_xids: Iterable[int] = (),
        nvml_timeout_grace_s: float = DEFAULTS.health_nvml_timeout_grace_s,
        slowdown_s: float = DEFAULTS.health_slowdown_s,
        auto_recover: bool = False,
    ) -> Policy:
        overrides: dict[int, XidClass] = {}
        seen_in: dict[int, str] = {}
        for flag, xids, klass in (
            ("--health-fence-xids", fence_xids, XidClass.FENCE),
            ("--health-warn-xids", warn_xids, XidClass.WARN),
            ("--health-ignore-xids", ignore_xids, XidClass.IGNORE),
        ):
            for xid in xids:
                if isinstance(xid, bool) or not isinstance(xid, int):
                    raise PolicyError(f"{flag}: {xid!r} is not an XID number")
                if not XID_MIN <= xid <= XID_MAX:
                    raise PolicyError(f"{flag}: XID {xid} is out of range {XID_MIN}..{XID_MAX}")
                if xid in seen_in and seen_in[xid] != flag:
                    raise PolicyError(f"XID {xid} is in both {seen_in[xid]} and {flag}; pick one")
                seen_in[xid] = flag
                overrides[xid] = klass
        # NaN compares false with everything, so check the positive form.
        if not (nvml_timeout_grace_s >= 0):
            raise PolicyError(f"--health-nvml-timeout-grace must be >= 0, got {nvml_timeout_grace_s}")
        if not (slowdown_s > 0):
            raise PolicyError(f"--health-slowdown-seconds must be > 0, got {slowdown_s}")
        return cls(overrides, float(nvml_timeout_grace_s), float(slowdown_s), bool(auto_recover))

    def xid_rule(self, code: int) -> XidRule:
        code = normalise_xid(code)
        row = _TABLE.get(code, _UNKNOWN_ROW)
        klass = self.overrides.get(code, row.cls)
        action = row.action
        if klass is XidClass.FENCE and action in (NONE, RESTART_APP):
            action = RESET_GPU  # fenced by the operator: the GPU needs at least a reset to come back
        elif klass is XidClass.APPLICATION:
            action = RESTART_APP
        elif klass is XidClass.IGNORE:
            action = NONE
        message = row.message if code in _TABLE else f"unknown XID {code}"
        return XidRule(code, klass, action, message, row.whole_gpu)


# Driver recovery action (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) -> (state, action, message).
RECOVERY_ACTIONS: dict[int, tuple[HealthState, str, str]] = {
    1: (HealthState.UNHEALTHY, RESET_GPU, "driver requests a GPU reset"),
    2: (HealthState.UNHEALTHY, REBOOT_NODE, "driver requests a node reboot"),
    3: (HealthState.DEGRADED, NONE, "driver requests draining peer-to-peer traffic"),
    4: (HealthState.UNHEALTHY, RESET_GPU, "driver requests drain and GPU reset"),
    5: (HealthState.DEGRADED, NONE, "driver requests recovering the IMEX domain"),
    6: (HealthState.UNHEALTHY, RESET_GPU, "driver requests a bus reset"),
    7: (HealthState.UNHEALTHY, REBOOT_NODE, "driver requests a system reboot"),
}


def recovery_action(value: int) -> tuple[HealthState, str, str]:
    return RECOVERY_ACTIONS.get(value, (HealthState.DEGRADED, NONE, f"unknown driver recovery action {value}"))
