"""A simulated GPU node for `--simulate[=SPEC]`: no GPU, no driver, no compiler.

`SimulatedBackend` implements `exporter.backend.Backend`, so collection,
rendering, health and the device plugin run the same code as on real GPUs.
It serves demos, trying dashboards and alert rules, and load-testing Prometheus.

Values are a pure function of (spec, seed, elapsed time): the simulation steps
in one-second segments from the moment the backend was built, using a clock
injected in the constructor (`time.monotonic` by default), so tests can drive
time. Each GPU follows a workload pattern (train, infer, batch, hold, idle);
power follows utilisation (capped at the model's limit, which makes the power
violation counter grow), temperature follows power with a thermal lag, energy
integrates power, and counters only ever increase.

Spec grammar, in short: comma-separated items, each a preset (`h100x8`, the
default; `a100x4`, `l4x2`, `rtx4090`, `v100x8`), `file:PATH.json`, or KEY=VALUE
with KEY one of model, gpus, seed, driver, mig, workload, faults. Faults read
KIND:GPU[/giG][:ARG][@TIME[+DURATION]], e.g. `faults=xid:3:79@30s;hang:2@1m+30s`.
The full grammar is in `exporter.simulate.spec`; docs/simulate.md is the reference.

The package, one concern per module:

- `fieldnames`: the DCGM field names the simulator produces, and which a model supports.
- `models`:     GPU models (`MODELS`), their MIG profiles and MIG placement.
- `hashing`:    deterministic hashing (splitmix64) and value noise.
- `workload`:   workload patterns: utilisation and framebuffer use over time.
- `faults`:     `Fault` and the FAULT parser.
- `spec`:       the `--simulate` spec parser (`parse_spec`, `SimConfig`).
- `devices`:    simulated GPUs and MIG devices: stepped state and values.
- `processes`:  the simulated process lists (a few compute processes per device, `--process-metrics`).
- `events`:     `EventQueue` (scheduled and injected events, owned by the backend) and the event source over it.
- `backend`:    `SimulatedBackend`, the `exporter.backend.Backend` implementation.
"""

from __future__ import annotations

from exporter.simulate.backend import HANG_POLL_S, SimulatedBackend
from exporter.simulate.events import SimulatedEventSource
from exporter.simulate.faults import RECOVERY_ACTIONS, Fault, parse_fault
from exporter.simulate.models import MODELS, GpuModel, MigProfile
from exporter.simulate.spec import DEFAULT_DRIVER, MAX_GPUS, SimConfig, parse_spec
from exporter.simulate.workload import PATTERNS

__all__ = [
    "DEFAULT_DRIVER",
    "HANG_POLL_S",
    "MAX_GPUS",
    "MODELS",
    "PATTERNS",
    "RECOVERY_ACTIONS",
    "Fault",
    "GpuModel",
    "MigProfile",
    "SimConfig",
    "SimulatedBackend",
    "SimulatedEventSource",
    "parse_fault",
    "parse_spec",
]
