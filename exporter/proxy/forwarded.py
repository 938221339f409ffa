"""The device list the proxy forwards to the kubelet for one resource: the upstream's list with each
fenced device marked Unhealthy, built once per change and handed to every open stream.

What the kubelet is told, by the upstream's state:
- streaming: its devices, each as the upstream says, except Healthy devices whose GPU (or MIG device,
  or the GPU of a MIG device or replica) is fenced, which are sent Unhealthy;
- its stream down (NVIDIA's plugin restarting): the devices of its last list, every one Unhealthy, so
  the kubelet keeps the capacity but allocates nothing it cannot vouch for, and our registration stays;
- never streamed yet: nothing (no message; the proxy registers with the kubelet only after the first list).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.rm import HEALTHY, UNHEALTHY

_RECHECK_S = 1.0  # a waiting stream looks at its RPC context at least this often


@dataclass(frozen=True)
class Counts:
    healthy: int = 0
    unhealthy: int = 0
    fenced: int = 0  # Healthy upstream, Unhealthy here because of a verdict


class ForwardedList:
    """Written by the upstream reader and the verdict refresh, read by the kubelet's streams."""

    def __init__(self, resource: str) -> None:
        self.resource = resource
        self._cond = threading.Condition()
        self._upstream: list[pb.Device] | None = None  # the upstream's last list (None: never listed)
        self._upstream_up = False
        self._version = 0
        self._message = b""
        self.counts = Counts()
        self.streams_open = 0
        self.last_stream_change = 0.0

    @property
    def listed(self) -> bool:
        """Whether the upstream has sent a list at all (there is something to tell the kubelet)."""
        with self._cond:
            return self._upstream is not None

    def upstream_list(self, devices: list[pb.Device], fenced: Callable[[str], bool]) -> None:
        """A list from the upstream's stream: forwarded at once, even when it equals the last one."""
        with self._cond:
            self._upstream, self._upstream_up = devices, True
            self._build(fenced, always=True)

    def upstream_down(self, fenced: Callable[[str], bool]) -> None:
        with self._cond:
            if not self._upstream_up:
                return
            self._upstream_up = False
            self._build(fenced, always=False)

    def refresh(self, fenced: Callable[[str], bool]) -> bool:
        """Verdicts changed: a new message only when what the kubelet sees changes."""
        with self._cond:
            return self._build(fenced, always=False)

    def _build(self, fenced: Callable[[str], bool], always: bool) -> bool:
        if self._upstream is None:
            return False
        out = pb.ListAndWatchResponse()
        healthy = unhealthy = held = 0
        for device in self._upstream:
            copy = out.devices.add()
            copy.CopyFrom(device)
            if device.health == HEALTHY and self._upstream_up:
                if fenced(device.ID):
                    copy.health = UNHEALTHY
                    held += 1
            elif self._upstream_up:
                pass  # the upstream's own Unhealthy (or anything not Healthy) stays as it is
            else:
                copy.health = UNHEALTHY
            if copy.health == HEALTHY:
                healthy += 1
            else:
                unhealthy += 1
        message = out.SerializeToString(deterministic=True)
        self.counts = Counts(healthy, unhealthy, held)
        if message == self._message and not always:
            return False
        self._message = message
        self._version += 1
        self._cond.notify_all()
        return True

    # --- the kubelet's streams ---
    def stream_opened(self, now: float) -> None:
        with self._cond:
            self.streams_open += 1
            self.last_stream_change = now

    def stream_closed(self, now: float) -> None:
        with self._cond:
            self.streams_open -= 1
            self.last_stream_change = now

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_newer(self, seen: int, done: Callable[[], bool]) -> tuple[int, bytes] | None:
        """The newest serialised message once it is newer than `seen`; None when `done()`."""
        with self._cond:
            while self._version == seen:
                if done():
                    return None
                self._cond.wait(_RECHECK_S)
            if done():
                return None
            return self._version, self._message
