"""Run by test_health_crash: an engine under an endless XID storm, waiting to be killed with -9."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

from exporter.health.engine import HealthEngine
from exporter.health.policy import Policy
from exporter.model import EVENT_XID, DeviceEvent

GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
GPU1 = "GPU-11111111-1111-1111-1111-111111111111"


def main() -> None:
    # Many writes a second so the kill lands mid-write as often as possible.
    eng = HealthEngine(Policy.build(), Path(sys.argv[1]), control_socket=False, max_writes_per_s=1000)
    eng.start()
    eng.on_events([DeviceEvent(GPU0, EVENT_XID, 79, timestamp=time.time())])
    print("FENCED", flush=True)  # on_events returned: the fence is on disk
    for i in itertools.count():
        code = (13, 31, 79, 94, 48)[i % 5]
        eng.on_events([DeviceEvent(GPU1 if i % 3 else GPU0, EVENT_XID, code, timestamp=time.time())] * 50)


if __name__ == "__main__":
    main()
