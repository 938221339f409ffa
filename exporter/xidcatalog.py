"""The XID catalogue: what each XID means, as data. Imports nothing of ours.

Follows /work/shared/reference/xid-catalog.md (NVIDIA's Ampere+ catalogue and the behaviour of peers):
per XID the default class, the recommended action, a short message and the scope. The health policy
(`exporter.health.policy`: classes operators can override) and our own families read it; the DCGM
families' `err_msg` is dcgm-exporter's wording instead (`exporter.dcgmxid`).

Scope: `whole_gpu` is True when the fault lies in hardware every MIG instance shares (DRAM/ECC/row
remapping, GSP, the micro-controller, the bus, NVLink, initialisation); engine/context faults
(13, 31, 43, 94, 109, ...) follow the attribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Default classes (the values of `exporter.health.policy.XidClass`).
DefaultClass = Literal["application", "warn", "fence"]
APPLICATION: DefaultClass = "application"  # the application's fault: counted only
WARN: DefaultClass = "warn"  # degraded: still schedulable, worth a look
FENCE: DefaultClass = "fence"  # unhealthy: no new work until explicitly cleared

# Recommended actions (the Reason.action vocabulary).
NONE = "none"
RESTART_APP = "restart_app"
RESET_GPU = "reset_gpu"
REBOOT_NODE = "reboot_node"
CONTACT_SUPPORT = "contact_support"
ACTIONS = (NONE, RESTART_APP, RESET_GPU, REBOOT_NODE, CONTACT_SUPPORT)


@dataclass(frozen=True)
class XidEntry:
    cls: DefaultClass
    action: str
    message: str
    whole_gpu: bool = False


_A, _W, _F = APPLICATION, WARN, FENCE

CATALOGUE: dict[int, XidEntry] = {
    8: XidEntry(_W, RESTART_APP, "GPU stopped processing (FIFO idle timeout)"),
    11: XidEntry(_W, RESTART_APP, "invalid or corrupted push buffer stream"),
    13: XidEntry(_A, RESTART_APP, "graphics engine exception"),
    31: XidEntry(_A, RESTART_APP, "GPU memory page fault"),
    32: XidEntry(_W, RESTART_APP, "corrupted push buffer (check PCIe if repeated)"),
    38: XidEntry(_W, NONE, "driver firmware error"),
    43: XidEntry(_A, NONE, "application hit a software fault; GPU remains healthy"),
    44: XidEntry(_W, NONE, "graphics fault during context switch"),
    45: XidEntry(_A, NONE, "preemptive cleanup after other errors"),
    48: XidEntry(_F, RESET_GPU, "double-bit ECC error", whole_gpu=True),
    56: XidEntry(_W, CONTACT_SUPPORT, "display engine error (pre-Ampere)", whole_gpu=True),
    57: XidEntry(_W, CONTACT_SUPPORT, "memory interface error (pre-Ampere)", whole_gpu=True),
    58: XidEntry(_W, CONTACT_SUPPORT, "memory interface error (pre-Ampere)", whole_gpu=True),
    61: XidEntry(_W, CONTACT_SUPPORT, "micro-controller breakpoint (pre-Ampere)", whole_gpu=True),
    62: XidEntry(_F, RESET_GPU, "internal micro-controller halt", whole_gpu=True),
    63: XidEntry(_W, RESET_GPU, "row remap / page retirement recorded (reset to activate)", whole_gpu=True),
    64: XidEntry(_F, RESET_GPU, "row remap / page retirement failed", whole_gpu=True),
    68: XidEntry(_A, RESTART_APP, "video decoder exception"),
    69: XidEntry(_W, RESTART_APP, "graphics engine class error"),
    74: XidEntry(_F, RESET_GPU, "NVLink error", whole_gpu=True),
    79: XidEntry(_F, REBOOT_NODE, "GPU has fallen off the bus", whole_gpu=True),
    92: XidEntry(_W, NONE, "excessive single-bit ECC error rate", whole_gpu=True),
    94: XidEntry(_W, RESTART_APP, "contained ECC error (reset when convenient)"),
    95: XidEntry(_F, RESET_GPU, "uncontained ECC error", whole_gpu=True),
    109: XidEntry(_F, RESET_GPU, "context switch timeout"),
    119: XidEntry(_F, RESET_GPU, "GSP RPC timeout", whole_gpu=True),
    120: XidEntry(_F, RESET_GPU, "GSP error", whole_gpu=True),
    121: XidEntry(_W, NONE, "corrected C2C link errors", whole_gpu=True),
    140: XidEntry(_F, RESET_GPU, "uncorrectable ECC error escaped remapping", whole_gpu=True),
    143: XidEntry(_F, RESET_GPU, "GPU initialisation error", whole_gpu=True),
    154: XidEntry(_W, NONE, "GPU recovery action changed (see recovery action)", whole_gpu=True),
}
for _code in range(144, 151):
    CATALOGUE[_code] = XidEntry(_F, RESET_GPU, f"NVLink5 error (XID {_code})", whole_gpu=True)

UNKNOWN = XidEntry(_W, NONE, "unknown XID")
"""What an XID outside the catalogue gets."""


def xid_message(code: int) -> str:
    """A short human message for an XID (dcgm-exporter's err_msg label)."""
    entry = CATALOGUE.get(code)
    return entry.message if entry is not None else UNKNOWN.message
