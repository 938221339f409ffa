"""Simulated process lists (`--simulate --process-metrics ...`): a few plausible processes per device.

Deterministic per (seed, GPU, instance): each GPU (or MIG instance) runs one to three compute
processes with fixed PIDs that share the device's framebuffer use and, on a GPU, its utilisation in
fixed proportions, so the per-pod figures add up to the device figures. An idle device (no memory
used) lists none. The PIDs are made up: on a real host they belong to no pod ("no pod"), which is
what `--simulate` shows unless the pod side is faked too.
"""

from __future__ import annotations

from exporter.model import GpuProcess
from exporter.simulate.fieldnames import FB_USED, GPU_UTIL
from exporter.simulate.hashing import hash_key, uniform

_MIB = 1 << 20
_PID_BASE = 20000
_PID_SPAN = 40000


def process_shares(key: int, most: int) -> tuple[tuple[int, float], ...]:
    """(pid, share) of the device's processes: 1..most of them, shares summing to 1."""
    count = 1 + int(uniform(key, 1) * most) if most > 1 else 1
    weights = [0.2 + uniform(key, 10 + i) for i in range(count)]
    total = sum(weights)
    return tuple(
        (_PID_BASE + int(uniform(key, 20 + i) * _PID_SPAN) * 2 + i, w / total)  # distinct PIDs per device
        for i, w in enumerate(weights)
    )


def simulated_processes(
    shares: tuple[tuple[int, float], ...],
    values: dict[str, float],
    gpu_instance_id: int | None = None,
    with_utilisation: bool = True,
) -> tuple[GpuProcess, ...]:
    """The processes for one read of a device's `values` (FB_USED in MiB, GPU_UTIL in %)."""
    used_mib = values.get(FB_USED, 0.0)
    if used_mib <= 0:
        return ()
    util = values.get(GPU_UTIL) if with_utilisation else None
    return tuple(
        GpuProcess(
            pid=pid,
            kind="compute",
            used_memory_bytes=int(used_mib * share) * _MIB,
            gpu_instance_id=gpu_instance_id,
            compute_instance_id=0 if gpu_instance_id is not None else None,
            sm_util=round(util * share, 1) if util is not None else None,
            mem_util=round(util * share * 0.6, 1) if util is not None else None,
            enc_util=0.0 if util is not None else None,
            dec_util=0.0 if util is not None else None,
        )
        for pid, share in sorted(shares)
    )


def shares_key(seed: int, gpu_index: int, gi: int | None) -> int:
    return hash_key(seed, gpu_index, 0x9D1, -1 if gi is None else gi)
