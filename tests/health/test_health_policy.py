from __future__ import annotations

import math

import pytest

from exporter.health.policy import (
    REBOOT_NODE,
    RESET_GPU,
    RESTART_APP,
    Policy,
    PolicyError,
    XidClass,
    recovery_action,
    xid_message,
)
from exporter.health.verdict import HealthState


def test_defaults_follow_the_catalogue() -> None:
    pol = Policy.build()
    for xid in (13, 31, 43, 45, 68):
        assert pol.xid_rule(xid).cls is XidClass.APPLICATION, xid
    for xid in (48, 62, 64, 74, 79, 95, 109, 119, 120, 140, 143, *range(144, 151)):
        assert pol.xid_rule(xid).cls is XidClass.FENCE, xid
    for xid in (8, 32, 63, 92, 94, 154, 200):
        assert pol.xid_rule(xid).cls is XidClass.WARN, xid
    assert pol.xid_rule(79).action == REBOOT_NODE
    assert pol.xid_rule(48).action == RESET_GPU
    assert pol.xid_rule(13).action == RESTART_APP
    assert pol.xid_rule(79).whole_gpu and pol.xid_rule(48).whole_gpu and pol.xid_rule(119).whole_gpu
    assert not pol.xid_rule(109).whole_gpu and not pol.xid_rule(13).whole_gpu
    assert pol.auto_recover is False


def test_out_of_range_codes_fold_into_unknown() -> None:
    pol = Policy.build()
    assert pol.xid_rule(0).xid == 999
    assert pol.xid_rule(2**32 - 1).xid == 999
    assert pol.xid_rule(999).cls is XidClass.WARN


def test_overrides_change_classes() -> None:
    pol = Policy.build(fence_xids=[13], warn_xids=[79], ignore_xids=[94])
    assert pol.xid_rule(13).cls is XidClass.FENCE
    assert pol.xid_rule(13).action == RESET_GPU  # a fenced GPU needs at least a reset
    assert pol.xid_rule(79).cls is XidClass.WARN
    assert pol.xid_rule(94).cls is XidClass.IGNORE
    assert pol.xid_rule(94).cls.state is HealthState.HEALTHY


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fence_xids": [0]}, r"--health-fence-xids: XID 0 is out of range"),
        ({"warn_xids": [5000]}, r"--health-warn-xids: XID 5000 is out of range"),
        ({"fence_xids": [13], "ignore_xids": [13]}, r"XID 13 is in both --health-fence-xids and --health-ignore-xids"),
        ({"ignore_xids": ["x"]}, r"'x' is not an XID number"),
        ({"nvml_timeout_grace_s": -1}, r"--health-nvml-timeout-grace must be >= 0"),
        ({"slowdown_s": 0}, r"--health-slowdown-seconds must be > 0"),
        ({"slowdown_s": math.nan}, r"--health-slowdown-seconds"),
    ],
)
def test_invalid_config_is_rejected_with_a_clear_message(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        Policy.build(**kwargs)  # type: ignore[arg-type]


def test_xid_message_and_recovery_actions() -> None:
    assert xid_message(79) == "GPU has fallen off the bus"
    assert xid_message(4242) == "unknown XID"
    assert recovery_action(2)[:2] == (HealthState.UNHEALTHY, REBOOT_NODE)
    assert recovery_action(3)[0] is HealthState.DEGRADED
    assert recovery_action(99)[0] is HealthState.DEGRADED
