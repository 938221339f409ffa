"""DCGM_FI_DEV_XID_ERRORS' `err_code`/`err_msg` labels read as dcgm-exporter writes them."""

from __future__ import annotations

import pytest

from exporter.dcgmxid import MESSAGES, UNKNOWN_ERROR, dcgm_xid_message
from exporter.model import EVENT_XID, DeviceEvent
from exporter.xid import XidTracker

GPU = "GPU-0"


def tracker_after(xid: int | None) -> XidTracker:
    t = XidTracker(300)
    if xid is not None:
        t.on_events([DeviceEvent(GPU, EVENT_XID, xid)])
    return t


@pytest.mark.parametrize(
    ("xid", "labels"),
    [
        (None, 'err_code="0",err_msg="No Error"'),  # before the first XID
        (79, 'err_code="79",err_msg="GPU has fallen off the bus"'),
        (48, 'err_code="48",err_msg="Double Bit ECC Error"'),
        (13, 'err_code="13",err_msg="Graphics Engine Exception"'),
        (172, 'err_code="172",err_msg="Uncorrectable SRAM Error"'),  # the table's last entry
        (173, 'err_code="173",err_msg="Unknown Error"'),  # past it
        (999, 'err_code="999",err_msg="Unknown Error"'),
    ],
)
def test_err_msg_is_dcgm_exporters_wording(xid: int | None, labels: str) -> None:
    value, extra = tracker_after(xid).xid_labels(GPU)
    assert value == (xid or 0)
    assert extra == labels


def test_table_covers_every_code_up_to_172_and_nothing_else() -> None:
    assert sorted(MESSAGES) == list(range(173))
    assert dcgm_xid_message(-1) == UNKNOWN_ERROR
    assert MESSAGES[45] == "Preemptive cleanup, due to previous errors -- Most likely to see when running multiple cuda"


def test_own_families_keep_the_policy_wording() -> None:
    # The health part reads the policy catalogue, not dcgm-exporter's table.
    from exporter.xidcatalog import xid_message

    assert xid_message(79) == "GPU has fallen off the bus"
    assert xid_message(48) != dcgm_xid_message(48)
