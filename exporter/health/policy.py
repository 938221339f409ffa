"""Health policy as data: what each XID and polled signal means, and what to do about it.

The XID table follows /work/shared/reference/xid-catalog.md (NVIDIA's Ampere+ catalogue and the
behaviour of peers). Operators override classes with --health-{fence,warn,ignore}-xids; the
scope (whole GPU or one MIG instance) and the message of an XID stay those of the table.

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


# Recommended actions (the Reason.action vocabulary).
NONE = "none"
RESTART_APP = "restart_app"
RESET_GPU = "reset_gpu"
REBOOT_NODE = "reboot_node"
CONTACT_SUPPORT = "contact_support"
ACTIONS = (NONE, RESTART_APP, RESET_GPU, REBOOT_NODE, CONTACT_SUPPORT)

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


_A, _W, _F = XidClass.APPLICATION, XidClass.WARN, XidClass.FENCE

_TABLE: dict[int, _Row] = {
    8: _Row(_W, RESTART_APP, "GPU stopped processing (FIFO idle timeout)"),
    11: _Row(_W, RESTART_APP, "invalid or corrupted push buffer stream"),
    13: _Row(_A, RESTART_APP, "graphics engine exception"),
    31: _Row(_A, RESTART_APP, "GPU memory page fault"),
    32: _Row(_W, RESTART_APP, "corrupted push buffer (check PCIe if repeated)"),
    38: _Row(_W, NONE, "driver firmware error"),
    43: _Row(_A, NONE, "application hit a software fault; GPU remains healthy"),
    44: _Row(_W, NONE, "graphics fault during context switch"),
    45: _Row(_A, NONE, "preemptive cleanup after other errors"),
    48: _Row(_F, RESET_GPU, "double-bit ECC error", whole_gpu=True),
    56: _Row(_W, CONTACT_SUPPORT, "display engine error (pre-Ampere)", whole_gpu=True),
    57: _Row(_W, CONTACT_SUPPORT, "memory interface error (pre-Ampere)", whole_gpu=True),
    58: _Row(_W, CONTACT_SUPPORT, "memory interface error (pre-Ampere)", whole_gpu=True),
    61: _Row(_W, CONTACT_SUPPORT, "micro-controller breakpoint (pre-Ampere)", whole_gpu=True),
    62: _Row(_F, RESET_GPU, "internal micro-controller halt", whole_gpu=True),
    63: _Row(_W, RESET_GPU, "row remap / page retirement recorded (reset to activate)", whole_gpu=True),
    64: _Row(_F, RESET_GPU, "row remap / page retirement failed", whole_gpu=True),
    68: _Row(_A, RESTART_APP, "video decoder exception"),
    69: _Row(_W, RESTART_APP, "graphics engine class error"),
    74: _Row(_F, RESET_GPU, "NVLink error", whole_gpu=True),
    79: _Row(_F, REBOOT_NODE, "GPU has fallen off the bus", whole_gpu=True),
    92: _Row(_W, NONE, "excessive single-bit ECC error rate", whole_gpu=True),
    94: _Row(_W, RESTART_APP, "contained ECC error (reset when convenient)"),
    95: _Row(_F, RESET_GPU, "uncontained ECC error", whole_gpu=True),
    109: _Row(_F, RESET_GPU, "context switch timeout"),
    119: _Row(_F, RESET_GPU, "GSP RPC timeout", whole_gpu=True),
    120: _Row(_F, RESET_GPU, "GSP error", whole_gpu=True),
    121: _Row(_W, NONE, "corrected C2C link errors", whole_gpu=True),
    140: _Row(_F, RESET_GPU, "uncorrectable ECC error escaped remapping", whole_gpu=True),
    143: _Row(_F, RESET_GPU, "GPU initialisation error", whole_gpu=True),
    154: _Row(_W, NONE, "GPU recovery action changed (see recovery action)", whole_gpu=True),
}
for _code in range(144, 151):
    _TABLE[_code] = _Row(_F, RESET_GPU, f"NVLink5 error (XID {_code})", whole_gpu=True)

_UNKNOWN_ROW = _Row(_W, NONE, "unknown XID")


def xid_message(code: int) -> str:
    """A short human message for an XID (dcgm-exporter's err_msg label)."""
    row = _TABLE.get(code)
    return row.message if row is not None else _UNKNOWN_ROW.message


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
