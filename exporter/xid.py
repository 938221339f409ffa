"""dcgm-compatible XID series: the last XID per GPU and the count in a window.

DCGM_FI_DEV_XID_ERRORS is a gauge of the last XID (0 before the first), with
`err_code`/`err_msg` labels as in dcgm-exporter 4.x. DCGM_EXP_XID_ERRORS_COUNT
counts XIDs per code within `--xid-count-window-size`. The counter that never
loses counts across restarts is the health engine's gpuhealth_xid_errors_total.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from exporter.family import DCGM_DEVICE_LABELS, Family
from exporter.labels import RenderContext, escape_label_value
from exporter.model import EVENT_XID, DeviceEvent
from exporter.xidcatalog import xid_message

# dcgm-exporter's family, with its HELP text word for word. Served only while some GPU had an XID
# in the window.
XID_ERRORS_COUNT = Family(
    "DCGM_EXP_XID_ERRORS_COUNT",
    "gauge",
    "Count of XID Errors within user-specified time window (see xid-count-window-size flag).",
    f"{DCGM_DEVICE_LABELS}, window_size_in_ms, xid",
    "xid",
    note="dcgm-exporter's family and HELP text; served only while a GPU had an XID within the window.",
)
FAMILIES = (XID_ERRORS_COUNT,)

# Bound per GPU so an XID storm cannot grow memory without limit; past it the
# window count saturates (documented in docs/metrics.md).
MAX_WINDOW_EVENTS = 10_000


class XidTracker:
    def __init__(
        self,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
        message: Callable[[int], str] = xid_message,
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

    def xid_labels(self, gpu_uuid: str) -> tuple[int, str]:
        """(value, extra labels) for DCGM_FI_DEV_XID_ERRORS."""
        code = self.last_xid(gpu_uuid)
        msg = "No Error" if code == 0 else self._message(code)
        return code, f'err_code="{code}",err_msg="{escape_label_value(msg)}"'

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

    def render_count_family(self, ctx: RenderContext, gpu_uuids: list[str]) -> str:
        fam = XID_ERRORS_COUNT
        window = f'window_size_in_ms="{int(self.window_s * 1000)}"'
        lines: list[str] = []
        for uuid in gpu_uuids:
            labels = ctx.dcgm_labels(uuid)
            for code, n in sorted(self.window_counts(uuid).items()):
                lines.append(fam.sample(f'{labels},{window},xid="{code}"', n))
        return fam.header + "".join(lines) if lines else ""
