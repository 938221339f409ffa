"""dcgm-compatible XID series: the last XID per GPU, and the XIDs in a window.

DCGM_FI_DEV_XID_ERRORS is a gauge of the last XID (0 before the first), with `err_code`/`err_msg`
labels worded as dcgm-exporter words them (exporter/dcgmxid.py). `window_counts` feeds
DCGM_EXP_XID_ERRORS_COUNT (exporter/dcgmexp.py, served only when the counters file lists it). The
counter that never loses counts across restarts is the health engine's gpuhealth_xid_errors_total.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from exporter.dcgmxid import dcgm_xid_message
from exporter.labels import escape_label_value
from exporter.model import EVENT_XID, DeviceEvent

# No own family here any more: DCGM_EXP_XID_ERRORS_COUNT takes its HELP and TYPE from the counters
# file (exporter/dcgmexp.py). Kept so exporter/ownmetrics.py's list of sources stays as it is.
FAMILIES: tuple[()] = ()

# Bound per GPU so an XID storm cannot grow memory without limit; past it the
# window count saturates (documented in docs/metrics.md).
MAX_WINDOW_EVENTS = 10_000


class XidTracker:
    def __init__(
        self,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        message: Callable[[int], str] = dcgm_xid_message,
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._message = message
        self._lock = threading.Lock()
        self._last: dict[str, int] = {}
        self._recent: dict[str, deque[tuple[float, int]]] = {}

    def on_events(self, events: list[DeviceEvent]) -> None:
        now = self._clock()
        with self._lock:
            for ev in events:
                if ev.event_type != EVENT_XID:
                    continue
                self._last[ev.gpu_uuid] = ev.xid
                self._recent.setdefault(ev.gpu_uuid, deque(maxlen=MAX_WINDOW_EVENTS)).append((now, ev.xid))

    def last_xid(self, gpu_uuid: str) -> int:
        with self._lock:
            return self._last.get(gpu_uuid, 0)

    def xid_attributes(self, gpu_uuid: str) -> tuple[int, tuple[tuple[str, str], ...]]:
        """(value, err_code and err_msg label pairs) for DCGM_FI_DEV_XID_ERRORS."""
        code = self.last_xid(gpu_uuid)
        msg = self._message(code)  # dcgm-exporter's table has 0 too ("No Error")
        return code, (("err_code", str(code)), ("err_msg", msg))

    def xid_labels(self, gpu_uuid: str) -> tuple[int, str]:
        """(value, extra labels) for DCGM_FI_DEV_XID_ERRORS."""
        code, pairs = self.xid_attributes(gpu_uuid)
        return code, ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)

    def window_counts(self, gpu_uuid: str) -> dict[int, int]:
        cutoff = self._clock() - self.window_s
        with self._lock:
            recent = self._recent.get(gpu_uuid)
            if not recent:
                return {}
            while recent and recent[0][0] < cutoff:
                recent.popleft()
            counts: dict[int, int] = {}
            for _, code in recent:
                counts[code] = counts.get(code, 0) + 1
            return counts
