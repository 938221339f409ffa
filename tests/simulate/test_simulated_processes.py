"""The simulated process lists (`--simulate --process-metrics ...`): deterministic, adding up to the
device's figures, MIG instances with their ids, faults applied as to reads."""

from __future__ import annotations

import pytest

from exporter.backend import DeviceLostError
from exporter.fields import lookup
from exporter.simulate.fieldnames import FB_USED, GPU_UTIL
from tests.simulate.simnode import make

MIB = 1 << 20
WANTED = tuple(spec for name in (FB_USED, GPU_UTIL) if (spec := lookup(name)) is not None)


def test_the_same_spec_lists_the_same_processes_and_they_add_up_to_the_gpu() -> None:
    a, clock_a = make("h100x8,seed=7")
    b, _ = make("h100x8,seed=7")
    inv = a.discover()
    busy = 0
    for gpu in inv.gpus:
        listed = a.processes(gpu.uuid)
        assert listed == b.processes(gpu.uuid)
        values = a.read(gpu.uuid, WANTED).values
        if not listed:
            assert values[FB_USED] == 0
            continue
        busy += 1
        assert 1 <= len(listed) <= 3 and len({p.pid for p in listed}) == len(listed)
        assert all(p.kind == "compute" and p.gpu_instance_id is None for p in listed)
        used = sum(p.used_memory_bytes or 0 for p in listed)
        assert values[FB_USED] * MIB - len(listed) * MIB <= used <= values[FB_USED] * MIB
        assert sum(p.sm_util or 0 for p in listed) == pytest.approx(values[GPU_UTIL], abs=0.1 * len(listed))
    assert busy >= 4
    pids = {g.uuid: [p.pid for p in a.processes(g.uuid)] for g in inv.gpus}
    clock_a.advance(90)  # the values change over time, the PIDs do not
    later = {g.uuid: [p.pid for p in a.processes(g.uuid)] for g in inv.gpus}
    assert all(later[u] == pids[u] for u in pids if pids[u] and later[u])
    other, _ = make("h100x8,seed=8")
    assert [p.pid for g in other.discover().gpus for p in other.processes(g.uuid)] != [
        pid for g in inv.gpus for pid in pids[g.uuid]
    ]


def test_mig_instances_list_their_processes_and_the_gpu_aggregates_them() -> None:
    b, _ = make("h100x2,mig=0:3g.40gb+2g.20gb")
    gpu = b.discover().gpus[0]
    per_instance = {m.uuid: b.processes(m.uuid) for m in gpu.migs}
    for mig in gpu.migs:
        assert all(p.gpu_instance_id == mig.gpu_instance_id and p.sm_util is None for p in per_instance[mig.uuid])
    aggregate = b.processes(gpu.uuid)
    assert sorted(p.pid for p in aggregate) == sorted(p.pid for ps in per_instance.values() for p in ps)


def test_a_lost_gpu_has_no_process_list() -> None:
    b, clock = make("h100x2,faults=lost:1@10s")
    gpu1 = b.discover().gpus[1].uuid
    b.processes(gpu1)
    clock.advance(11)
    with pytest.raises(DeviceLostError):
        b.processes(gpu1)
    with pytest.raises(DeviceLostError):
        b.processes("GPU-not-there")
