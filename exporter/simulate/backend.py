"""`SimulatedBackend`: a simulated GPU node behind the `exporter.backend.Backend` protocol."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from exporter.backend import DeviceError, DeviceLostError
from exporter.fields import Event, FieldSpec, Label
from exporter.model import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_XID,
    TOPOLOGY_NODE,
    TOPOLOGY_SINGLE,
    TOPOLOGY_SYSTEM,
    DeviceEvent,
    Gpu,
    GpuLink,
    GpuProcess,
    Inventory,
    ReadResult,
)
from exporter.simulate.devices import SimGpu, SimMig
from exporter.simulate.events import LOST, EventQueue, SimulatedEventSource
from exporter.simulate.faults import Fault, parse_fault
from exporter.simulate.hashing import hash_key
from exporter.simulate.models import MODELS, place_migs
from exporter.simulate.processes import process_shares, shares_key, simulated_processes
from exporter.simulate.spec import SimConfig, parse_spec
from exporter.simulate.workload import DEFAULT_PATTERNS, MIG_PATTERNS

HANG_POLL_S = 0.05
# DGX-1 (V100) hybrid cube mesh: links between GPU positions on the board (nvidia-smi topo -m: NV1, NV2);
# every GPU has 6. The pairs are `_nvlink_pairs`' "cube" pairs.
DGX1_NVLINKS = {
    (0, 1): 1, (0, 2): 1, (0, 3): 2, (0, 4): 2,
    (1, 2): 2, (1, 3): 1, (1, 5): 2,
    (2, 3): 2, (2, 6): 1,
    (3, 7): 1,
    (4, 5): 1, (4, 6): 1, (4, 7): 2,
    (5, 6): 2, (5, 7): 1,
    (6, 7): 2,
}  # fmt: skip


class SimulatedBackend:
    """A simulated GPU node (spec grammar: `exporter.simulate.spec`)."""

    name: str = "simulated"

    def __init__(self, config: SimConfig | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        cfg = config or SimConfig()
        if cfg.model not in MODELS:
            raise ValueError(f"model={cfg.model!r}: unknown model (one of {', '.join(MODELS)})")
        self.config = cfg
        self.model = MODELS[cfg.model]
        self._clock = clock
        self._t0 = clock()
        self._stop = threading.Event()
        self._events = EventQueue(self.elapsed, self._stop, real_clock=clock is time.monotonic)
        self._gpus: list[SimGpu] = []
        for i in range(cfg.gpus):
            pattern = cfg.workload.get(i, DEFAULT_PATTERNS[i % len(DEFAULT_PATTERNS)])
            self._gpus.append(SimGpu(i, cfg.gpus, self.model, cfg.seed, pattern))
        self._by_uuid = {g.uuid: g for g in self._gpus}
        self._migs: dict[str, SimMig] = {}
        for i, names in sorted(cfg.mig.items()):
            gpu = self._gpus[i]
            gpu.mig_enabled = True
            for slot, (name, gi) in enumerate(place_migs(self.model, names, f"{i}:{'+'.join(names)}")):
                mk = hash_key(cfg.seed, i, 0x316, gi)
                pattern = cfg.workload.get(i) or MIG_PATTERNS[(slot + i) % len(MIG_PATTERNS)]
                mig = SimMig(gpu, self.model.mig[name], gi, slot, mk, pattern)
                gpu.migs.append(mig)
                self._migs[mig.uuid] = mig
        # uuid -> (pid, share) of its simulated processes (--process-metrics)
        self._shares = {g.uuid: process_shares(shares_key(cfg.seed, g.index, None), 3) for g in self._gpus}
        self._shares.update(
            {m.uuid: process_shares(shares_key(cfg.seed, m.parent.index, m.gi), 2) for m in self._migs.values()}
        )
        self._inventory_cache: tuple[tuple[bool, ...], Inventory] | None = None
        self._mig_gis = {g.index: {m.gi for m in g.migs} for g in self._gpus if g.mig_enabled}
        self._pairs = self._nvlink_pairs()
        self._links = self._topology()
        for text in cfg.faults:
            self._add_fault(parse_fault(text, cfg.gpus, self._mig_gis))

    @classmethod
    def from_spec(cls, spec: str | None, clock: Callable[[], float] = time.monotonic) -> SimulatedBackend:
        """Build from a `--simulate` spec; raises ValueError naming the bad part."""
        return cls(parse_spec(spec), clock=clock)

    def describe(self) -> str:
        """One line for logs: "8x NVIDIA H100 80GB HBM3 (seed 0, 2 MIG GPUs, 3 faults)"."""
        c = self.config
        return f"{c.gpus}x {self.model.name} (seed {c.seed}, {len(c.mig)} MIG GPUs, {len(c.faults)} faults)"

    def elapsed(self) -> float:
        """Simulated seconds since the backend was built."""
        return max(0.0, self._clock() - self._t0)

    # -- Backend protocol ---------------------------------------------------

    def start(self) -> None:
        self._stop.clear()

    def shutdown(self) -> None:
        self._stop.set()
        self._events.wake()

    def discover(self) -> Inventory:
        t = self.elapsed()
        present = tuple(g.state_fault(("vanish",), t) is None if g.faults else True for g in self._gpus)
        cached = self._inventory_cache
        if cached is not None and cached[0] == present:
            return cached[1]
        gpus = []
        for g, here in zip(self._gpus, present, strict=True):
            if not here:
                continue
            gpus.append(
                Gpu(
                    index=g.index,
                    uuid=g.uuid,
                    pci_bus_id=g.pci_bus_id,
                    minor=g.index,
                    name=self.model.name,
                    mig_enabled=g.mig_enabled,
                    migs=tuple(m.device for m in g.migs),
                    numa_node=g.numa,
                    attributes=(
                        ("name", self.model.name),
                        ("brand", "NVIDIA"),
                        # A board serial as nvidia-smi prints one: 13 digits, stable per simulated GPU.
                        ("serial", f"{1650923000000 + g.key % 1000000:013d}"),
                        ("vbios", "96.00.99.00.01"),
                        ("inforom_image", "G520.0200.00.05"),
                    ),
                )
            )
        visible = {g.uuid for g in gpus}
        pairs = frozenset(p for p in self._pairs if p[0] in visible and p[1] in visible)
        inv = Inventory(
            driver_version=self.config.driver,
            gpus=tuple(gpus),
            nvml_version=f"12.{self.config.driver}",
            nvlink_pairs=pairs,
            links=tuple(link for link in self._links if link.a in visible and link.b in visible),
            # As NVML answers nvmlDeviceGetP2PStatus(NVLINK): OK where linked, else NOT_SUPPORTED (5).
            p2p_status=tuple(
                sorted(
                    (a.uuid, b.uuid, 0 if tuple(sorted((a.uuid, b.uuid))) in pairs else 5)
                    for a in gpus
                    for b in gpus
                    if a is not b
                )
            ),
        )
        self._inventory_cache = (present, inv)
        return inv

    def _device_at(self, uuid: str) -> tuple[SimGpu, SimMig | None, float]:
        """The GPU (and MIG instance) `uuid` names and the time to read it at; raises what a read of a
        lost or failing device raises."""
        gpu = self._by_uuid.get(uuid)
        mig: SimMig | None = None
        if gpu is None:
            mig = self._migs.get(uuid)
            if mig is None:
                raise DeviceLostError(f"simulated node has no device {uuid}")
            gpu = mig.parent
        t = self.elapsed()
        if gpu.faults:
            t = self._availability(gpu, uuid, t)
        return gpu, mig, t

    def read(self, uuid: str, fields: Sequence[FieldSpec]) -> ReadResult:
        gpu, mig, t = self._device_at(uuid)
        vals = mig.values(t) if mig is not None else gpu.values(t)
        res = ReadResult()
        got, unsupported = res.values, res.unsupported
        for spec in fields:
            v = vals.get(spec.name)
            if v is not None:
                got[spec.name] = v
            elif not isinstance(spec.reader, (Event, Label)):
                unsupported.add(spec.name)
        return res

    def processes(self, uuid: str) -> tuple[GpuProcess, ...]:
        gpu, mig, t = self._device_at(uuid)
        if mig is not None:
            return simulated_processes(self._shares[mig.uuid], mig.values(t), mig.gi, with_utilisation=False)
        if gpu.mig_enabled:  # as NVML on a GPU handle: every instance's processes, with its ids
            listed = [p for m in gpu.migs for p in simulated_processes(self._shares[m.uuid], m.values(t), m.gi, False)]
            return tuple(sorted(listed, key=lambda p: p.pid))
        return simulated_processes(self._shares[uuid], gpu.values(t))

    def open_events(self, inventory: Inventory) -> SimulatedEventSource:
        return SimulatedEventSource(self._events, (g.uuid for g in inventory.gpus))

    # -- injection ----------------------------------------------------------

    def inject_xid(self, gpu_index: int, xid: int, gi: int | None = None, ci: int | None = None) -> None:
        """Fire an XID event now (thread-safe; wakes a waiting wait())."""
        gpu = self._gpu(gpu_index)
        if gi is not None and gi not in {m.gi for m in gpu.migs}:
            raise ValueError(f"GPU {gpu_index} has no GPU instance {gi}")
        event = DeviceEvent(
            gpu.uuid,
            EVENT_XID,
            xid=xid,
            gpu_instance_id=gi,
            compute_instance_id=(ci if ci is not None else 0) if gi is not None else None,
            timestamp=time.time(),
        )
        self._events.push(event)

    def inject(self, fault: str) -> Fault:
        """Add a fault (FAULT grammar) at runtime; without "@T" it starts now ("hang:2+30s"). Returns it."""
        text = fault.strip()
        if "@" not in text:
            head, plus, dur = text.partition("+")
            text = f"{head}@{self.elapsed():.6f}{plus}{dur}"
        parsed = parse_fault(text, len(self._gpus), self._mig_gis)
        self._add_fault(parsed)
        return parsed

    # -- internals ------------------------------------------------------------

    def _gpu(self, index: int) -> SimGpu:
        if not 0 <= index < len(self._gpus):
            raise ValueError(f"GPU {index} does not exist (the node has {len(self._gpus)} GPUs)")
        return self._gpus[index]

    def _add_fault(self, f: Fault) -> None:
        gpu = self._gpus[f.gpu]
        if f.kind != "xid":
            with gpu.lock:
                faults = [*gpu.faults, f]
                faults.sort(key=lambda x: x.at)
                gpu.faults = faults
                if f.kind == "thermal" and f.at < gpu.seg + 1:
                    gpu.reset()  # the past changed: recompute from the start, deterministically
        if f.kind == "xid":
            self._events.schedule(f.at, gpu.uuid, (EVENT_XID, f.xid, f.gi))
        elif f.kind == "dbe":
            self._events.schedule(f.at, gpu.uuid, (EVENT_DOUBLE_BIT_ECC, 0, None), (EVENT_XID, 48, None))
        elif f.kind == "remap-failure":
            self._events.schedule(f.at, gpu.uuid, (EVENT_XID, 64, None))
        elif f.kind == "lost":
            self._events.schedule(f.at, gpu.uuid, (LOST, 0, None))
        else:
            self._events.wake()  # a waiting wait re-checks (as every added fault did)

    def _availability(self, gpu: SimGpu, uuid: str, t: float) -> float:
        """Raise for a lost/vanished GPU; block while it hangs. Returns the time to read at."""
        while True:
            f = gpu.state_fault(("lost", "vanish"), t)
            if f is not None:
                raise DeviceLostError(f"simulated GPU {gpu.index} ({uuid}) is lost (fault {f.text})")
            h = gpu.state_fault(("hang",), t)
            if h is None:
                return t
            # Block like a wedged driver call, in chunks, until the hang ends or shutdown().
            if self._stop.wait(HANG_POLL_S):
                raise DeviceError(f"simulated GPU {gpu.index}: hung read interrupted by shutdown")
            t = self.elapsed()

    def _topology(self) -> tuple[GpuLink, ...]:
        """Per pair NVLink links and PCIe level, as NVML would report them for this model.

        "all": an NVSwitch baseboard, every GPU of a board of 8 reaches the others over all its links;
        "cube": DGX-1's hybrid cube mesh (1 or 2 links per peer, `DGX1_NVLINKS`). PCIe: the model's
        GPUs per switch share one (SINGLE), then the NUMA node (NODE), else SYSTEM.
        """
        model = self.model
        links: list[GpuLink] = []
        for a in self._gpus:
            for b in self._gpus:
                if a.index >= b.index:
                    continue
                count = 0
                if a.index // 8 == b.index // 8 and model.nvlink == "all":
                    count = model.nvlink_links
                elif a.index // 8 == b.index // 8 and model.nvlink == "cube":
                    count = DGX1_NVLINKS.get((a.index % 8, b.index % 8), 0)
                if a.index // model.pcie_per_switch == b.index // model.pcie_per_switch:
                    level = TOPOLOGY_SINGLE
                elif a.numa == b.numa:
                    level = TOPOLOGY_NODE
                else:
                    level = TOPOLOGY_SYSTEM
                x, y = sorted((a.uuid, b.uuid))
                links.append(GpuLink(x, y, nvlinks=count, pcie=level))
        return tuple(sorted(links, key=lambda link: (link.a, link.b)))

    def _nvlink_pairs(self) -> frozenset[tuple[str, str]]:
        topo = self.model.nvlink
        if topo == "none":
            return frozenset()
        pairs = set()
        for a in self._gpus:
            for b in self._gpus:
                if a.index >= b.index or a.index // 8 != b.index // 8:
                    continue
                i, j = a.index % 8, b.index % 8
                linked = topo == "all" or (i // 4 == j // 4) or (j == i + 4)
                if linked:
                    pairs.add((min(a.uuid, b.uuid), max(a.uuid, b.uuid)))
        return frozenset(pairs)
