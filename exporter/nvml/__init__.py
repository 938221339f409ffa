"""The NVML adapter: the only package that imports pynvml.

`NvmlBackend` implements `exporter.backend.Backend` on top of the nvidia-ml-py binding. Everything
it returns is plain data from `exporter.model`, already in the exported unit (FieldSpec.scale
applied). Its parts, one concern each:

- `errors`: NVML error codes and names, the monitor-fault errors, whole-device failures
- `compat`: old-driver fallbacks (a versioned symbol missing -> the older one, remembered)
- `discovery`: GPUs, MIG devices, NVLink pairs; handle and identity caches; lasting trouble logged once a minute
- `fieldvalues`: batched nvmlDeviceGetFieldValues (FieldValue, Rate), its decoding quirks, rates
- `calls`: Call() fields, a table of one small function per call, shared values read once per read
- `gpm`: Gpm() fields from GPM samples
- `processes`: the processes on a GPU or MIG device, their memory and utilisation (`--process-metrics`)
- `events`: `NvmlEventSource`, the event set
- `backend`: `NvmlBackend`, composing them
"""

from __future__ import annotations

from exporter.nvml.backend import NvmlBackend
from exporter.nvml.events import WANTED_EVENTS, NvmlEventSource

__all__ = ["WANTED_EVENTS", "NvmlBackend", "NvmlEventSource"]
