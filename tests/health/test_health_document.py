"""The state document (exporter/health/state.py): document() and read_document() next to validate()."""

from __future__ import annotations

import json
from typing import Any

import pytest

from exporter.health import state
from exporter.health.records import DeviceRecord, ReasonRecord
from exporter.health.verdict import HealthState

from .conftest import GPU0, GPU1, MIG_A

U, D = HealthState.UNHEALTHY, HealthState.DEGRADED


def sample() -> state.Document:
    gpu = DeviceRecord(GPU0, "gpu", None, 0)
    gpu.reasons[("xid", "79")] = ReasonRecord(
        "xid", "79", "fell off the bus", 1.0, 2.5, 3, "reboot_node", U, False, "fatal"
    )
    gpu.tracker.baseline = {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 4.0}
    mig = DeviceRecord(MIG_A, "mig", GPU0, 0, 1)
    mig.reasons[("row_remap_pending", "")] = ReasonRecord(
        "row_remap_pending", "", "pending", 5.0, 6.0, 1, "reset_gpu", D, True, "warn"
    )
    return state.Document(
        {GPU0: gpu, MIG_A: mig, GPU1: DeviceRecord(GPU1, "gpu", None, 1)},
        {(GPU1, 79, "fatal"): 2, (GPU0, 13, "application"): 5},
        4,
        {"H100": {"b", "a"}, "A100": {"c"}},
    )


def test_the_document_shape() -> None:
    doc = state.document(sample(), 123.0)
    assert list(doc) == ["schema", "written_at", "devices", "xid_counts", "clears_total", "signals_seen"]
    assert doc["schema"] == state.SCHEMA_VERSION and doc["written_at"] == 123.0
    assert doc["devices"][GPU0] == {
        "meta": {"kind": "gpu", "parent": None, "index": 0, "gi": None},
        "reasons": [
            {
                "signal": "xid",
                "code": "79",
                "message": "fell off the bus",
                "first_seen": 1.0,
                "last_seen": 2.5,
                "count": 3,
                "action": "reboot_node",
                "state": 2,
                "level": False,
                "class": "fatal",
            }
        ],
        "baseline": {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": 4.0},
    }
    assert doc["devices"][MIG_A]["meta"] == {"kind": "mig", "parent": GPU0, "index": 0, "gi": 1}
    # Sorted, whatever the order in memory, so that equal states write equal files.
    assert doc["xid_counts"] == [
        {"gpu": GPU0, "xid": 13, "class": "application", "count": 5},
        {"gpu": GPU1, "xid": 79, "class": "fatal", "count": 2},
    ]
    assert doc["clears_total"] == 4
    assert list(doc["signals_seen"].items()) == [("A100", ["c"]), ("H100", ["a", "b"])]


def test_round_trip_through_json_and_validate() -> None:
    before = sample()
    back = state.read_document(state.validate(json.loads(json.dumps(state.document(before, 1.0)))))
    assert back.xid_counts == before.xid_counts
    assert back.clears_total == before.clears_total
    assert back.signals_seen == before.signals_seen
    assert list(back.devices) == list(before.devices)
    for uuid, rec in before.devices.items():
        got = back.devices[uuid]
        assert (got.kind, got.parent, got.index, got.gpu_instance_id) == (
            rec.kind,
            rec.parent,
            rec.index,
            rec.gpu_instance_id,
        )
        assert got.reasons == rec.reasons
        assert got.tracker.baseline == rec.tracker.baseline


def test_the_document_shares_nothing_with_the_records() -> None:
    doc_state = sample()
    doc = state.document(doc_state, 1.0)
    frozen = json.dumps(doc, sort_keys=True)
    gpu = doc_state.devices[GPU0]
    gpu.reasons[("xid", "79")].count += 1
    gpu.tracker.baseline["x"] = 1.0
    doc_state.signals_seen["H100"].add("z")
    doc_state.xid_counts[(GPU1, 79, "fatal")] += 1
    assert json.dumps(doc, sort_keys=True) == frozen


def test_an_empty_document() -> None:
    doc = state.document(state.Document(), 0.0)
    assert doc == {
        "schema": 2,
        "written_at": 0.0,
        "devices": {},
        "xid_counts": [],
        "clears_total": 0,
        "signals_seen": {},
    }
    assert state.read_document(state.validate(doc)) == state.Document()


def test_a_schema_1_document_reads_with_defaults() -> None:
    """Before 2 (and in hand-written files): no class, level, meta or signals_seen."""
    raw: dict[str, Any] = {
        "schema": 1,
        "devices": {
            GPU0: {
                "reasons": [
                    {
                        "signal": "dbe",
                        "code": "",
                        "message": "m",
                        "first_seen": 1,
                        "last_seen": 2,
                        "count": 1,
                        "action": "reset_gpu",
                        "state": 2,
                    }
                ]
            },
            MIG_A: {"meta": {"kind": "bogus", "parent": 7, "index": "0", "gi": 2}, "reasons": []},
            GPU1: {
                "reasons": [
                    {
                        "signal": "s",
                        "code": "c",
                        "message": "m",
                        "first_seen": 1,
                        "last_seen": 2,
                        "count": 1,
                        "action": "none",
                        "state": 1,
                    }
                ]
            },
        },
    }
    doc = state.read_document(state.validate(raw))
    gpu = doc.devices[GPU0]
    assert (gpu.kind, gpu.parent, gpu.index, gpu.gpu_instance_id) == ("gpu", None, None, None)
    (r,) = gpu.reasons.values()
    assert (r.cls, r.level, r.state, r.first_seen) == ("fence", False, U, 1.0)
    assert isinstance(r.first_seen, float)
    assert next(iter(doc.devices[GPU1].reasons.values())).cls == "warn"
    mig = doc.devices[MIG_A]
    assert (mig.kind, mig.parent, mig.index, mig.gpu_instance_id) == ("mig", None, None, 2)
    assert doc.xid_counts == {} and doc.signals_seen == {}


@pytest.mark.parametrize(("clears", "read"), [(3, 3), ("3", 0), (None, 0), (2.0, 0)])
def test_clears_total_that_is_not_an_integer_reads_as_0(clears: object, read: int) -> None:
    raw = {"schema": 2, "clears_total": clears}
    assert state.read_document(state.validate(raw)).clears_total == read
