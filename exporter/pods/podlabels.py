"""Pod labels as Prometheus label names: sanitised, allowlisted, never colliding.

A duplicate label name makes the whole scrape invalid, so keys that would collide with a label
already on GPU series (`RESERVED_LABELS`) or with an earlier key that sanitises to the same name
are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Pod label keys that would collide with labels already on GPU series (a duplicate label name
# makes the whole scrape invalid), so they are never copied from pod labels.
RESERVED_LABELS = frozenset(
    {
        "gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID", "Hostname",
        "hostname", "DCGM_FI_DRIVER_VERSION", "err_code", "err_msg", "xid", "window_size_in_ms",
        "container", "namespace", "pod", "pod_uid", "vgpu", "resource", "job", "instance",
    }
)  # fmt: skip
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_label_name(key: str) -> str:
    """`app.kubernetes.io/name` -> `app_kubernetes_io_name`; a leading digit gets `_`."""
    name = _INVALID_LABEL_CHARS.sub("_", key)
    return f"_{name}" if name[:1].isdigit() else name


def compile_allowlist(pattern: str | None) -> re.Pattern[str] | None:
    """--kubernetes-pod-labels-allowlist, compiled (None or "": every key is allowed)."""
    return re.compile(pattern) if pattern else None


def pod_label_pairs(labels: Iterable[tuple[str, str]], allowlist: re.Pattern[str] | None) -> list[tuple[str, str]]:
    """The (name, value) pairs to copy from a pod's labels, in the order given (sorted by key)."""
    taken = set(RESERVED_LABELS)
    pairs: list[tuple[str, str]] = []
    for k, v in labels:
        if allowlist is not None and not allowlist.fullmatch(k):
            continue
        name = sanitize_label_name(k)
        if name.startswith("__") or name in taken:
            continue  # reserved, or two keys that sanitise to the same name: keep the first
        taken.add(name)
        pairs.append((name, v))
    return pairs
