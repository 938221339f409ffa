"""The simulator's GPM (DCP) fields: Hopper only, correlated with utilisation, deterministic."""

from __future__ import annotations

from exporter.fields import CATALOGUE, Gpm
from tests.simulate.simnode import make

GPM = tuple(f for f in CATALOGUE if isinstance(f.reader, Gpm))
ACTIVITY = tuple(f for f in GPM if f.scope == "instance")
NAMES = {f.name for f in GPM}
UTIL = next(f for f in CATALOGUE if f.name == "DCGM_FI_DEV_GPU_UTIL")


def test_h100_gives_every_gpm_field_in_range() -> None:
    b, clock = make()
    inv = b.discover()
    for _ in range(5):
        for g in inv.gpus:
            res = b.read(g.uuid, GPM)
            assert set(res.values) == NAMES and not res.unsupported, g.index
            for f in ACTIVITY:
                assert 0.0 <= res.values[f.name] <= 1.0, (g.index, f.name)
            assert 0.0 <= res.values["DCGM_FI_PROF_NVLINK_TX_BYTES"] <= 900e9
        clock.advance(61.7)


def test_activity_follows_utilisation_and_idle_is_zero() -> None:
    b, clock = make()
    inv = b.discover()
    seen_busy = seen_idle = False
    for _ in range(40):
        for g in inv.gpus:
            v = b.read(g.uuid, (*GPM, UTIL)).values
            util = v["DCGM_FI_DEV_GPU_UTIL"]
            assert v["DCGM_FI_PROF_GR_ENGINE_ACTIVE"] == round(util / 100, 4)
            assert v["DCGM_FI_PROF_SM_ACTIVE"] <= v["DCGM_FI_PROF_GR_ENGINE_ACTIVE"]
            assert v["DCGM_FI_PROF_SM_OCCUPANCY"] <= v["DCGM_FI_PROF_SM_ACTIVE"]
            assert v["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] <= v["DCGM_FI_PROF_SM_ACTIVE"]
            if util == 0:
                seen_idle = True
                assert all(v[f.name] == 0 for f in ACTIVITY), g.index
                assert v["DCGM_FI_PROF_NVLINK_TX_BYTES"] == 0
            elif util > 80:
                seen_busy = True
                assert v["DCGM_FI_PROF_SM_ACTIVE"] > 0.5
        clock.advance(13.0)
    assert seen_busy and seen_idle


def test_training_gpu_uses_tensor_cores_and_nvlink() -> None:
    b, _ = make()
    gpu0 = b.discover().gpus[0]  # "train" pattern
    v = b.read(gpu0.uuid, (*GPM, UTIL)).values
    assert v["DCGM_FI_DEV_GPU_UTIL"] > 50  # training keeps it busy: what the rest is about
    assert v["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] > 0.3
    assert v["DCGM_FI_PROF_NVLINK_TX_BYTES"] > 1e9
    assert v["DCGM_FI_PROF_NVLINK_TX_BYTES"] == v["DCGM_FI_PROF_NVLINK_RX_BYTES"]


def test_older_models_have_no_gpm() -> None:
    for spec in ("a100x2", "v100x2", "l4x2", "rtx4090"):
        b, _ = make(spec)
        for g in b.discover().gpus:
            res = b.read(g.uuid, GPM)
            assert res.values == {} and res.unsupported == NAMES, spec


def test_mig_instances_have_activity_but_no_nvlink() -> None:
    b, clock = make("h100x1,mig=0:3g.40gb+2g.20gb+1g.10gb*2")
    gpu = b.discover().gpus[0]
    assert len(gpu.migs) == 4
    for _ in range(10):
        for mig in gpu.migs:
            res = b.read(mig.uuid, GPM)
            assert set(res.values) == {f.name for f in ACTIVITY}, mig.gpu_instance_id
            assert all(0 <= x <= 1 for x in res.values.values())
        parent = b.read(gpu.uuid, GPM).values
        assert set(parent) == NAMES
        assert parent["DCGM_FI_PROF_NVLINK_TX_BYTES"] == 0  # MIG mode: no NVLink traffic
        clock.advance(31.0)


def test_deterministic() -> None:
    def trace() -> list[dict[str, float]]:
        b, clock = make("h100x4,seed=7")
        inv = b.discover()
        out: list[dict[str, float]] = []
        for _ in range(5):
            out.extend(b.read(g.uuid, GPM).values for g in inv.gpus)
            clock.advance(7.5)
        return out

    assert trace() == trace()
