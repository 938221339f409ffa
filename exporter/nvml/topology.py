"""Per GPU pair topology at discovery: NVLink links between the two GPUs and their PCIe level.

As NVIDIA's go-gpuallocator reads it (`internal/links/device.go`): every active link's remote PCI
address (`nvmlDeviceGetNvLinkState`, `nvmlDeviceGetNvLinkRemotePciInfo_v2`) counted per peer GPU, and
`nvmlDeviceGetTopologyCommonAncestor` for the PCIe level. One difference: a link whose remote is an
NVSwitch (`nvmlDeviceGetNvLinkRemoteDeviceType`) leads to every GPU on the fabric, so two GPUs with
switch links count the fewer of their switch links (upstream finds no peer there and counts none).

Read once per GPU set (the topology does not change while the GPUs stay). Nothing here may break
discovery: a call that fails leaves that fact unknown (no links, PCIe level None) and the result is
not cached, so the next discovery asks again; a driver without the calls gives no topology.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pynvml

from exporter.model import Gpu, GpuLink
from exporter.nvml.errors import FUNCTION_NOT_FOUND, code

_MAX_LINKS = int(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))
_SWITCH = int(getattr(pynvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2))
_GPU = int(getattr(pynvml, "NVML_NVLINK_DEVICE_TYPE_GPU", 0))
# Upstream skips a link on these (a link index the GPU does not have, or a link NVML cannot describe).
_SKIP = {pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_INVALID_ARGUMENT}

_Bus = tuple[int, int, int]  # PCI (domain, bus, device): the function is always 0 for a GPU


def parse_bus_id(bus_id: str) -> _Bus | None:
    """ "00000000:8D:00.0" or "0000:8D:00.0" -> (0, 0x8D, 0); None when it is not a PCI address."""
    try:
        domain, bus, rest = bus_id.strip().split(":")
        device = rest.split(".")[0]
        return int(domain, 16), int(bus, 16), int(device, 16)
    except ValueError:
        return None


class _Incomplete(Exception):
    """A fact could not be read this time: keep what was read, do not cache it."""


class TopologyReader:
    """`read(gpus, handle_for)` -> one `GpuLink` per unordered GPU pair; cached while the GPUs stay."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, ...] | None = None
        self._links: tuple[GpuLink, ...] = ()
        self._nvlink_calls = True  # False once the driver lacks the NVLink calls
        self._level_call = True  # False once it lacks nvmlDeviceGetTopologyCommonAncestor

    def reset(self) -> None:
        with self._lock:
            self._key = None

    def read(self, gpus: Sequence[Gpu], handle_for: Callable[[str], Any]) -> tuple[GpuLink, ...]:
        key = tuple(g.uuid for g in gpus)
        with self._lock:
            if key == self._key:
                return self._links
        complete = True
        handles: dict[str, Any] = {}
        for g in gpus:
            try:
                handles[g.uuid] = handle_for(g.uuid)
            except Exception:  # a lost GPU: its pairs stay unknown
                complete = False
        buses = {bus: g.uuid for g in gpus if (bus := parse_bus_id(g.pci_bus_id)) is not None}
        direct: dict[str, dict[str, int]] = {}
        switch: dict[str, int] = {}
        for uuid, handle in handles.items():
            try:
                direct[uuid], switch[uuid] = self._nvlinks(handle, buses)
            except _Incomplete:
                complete = False
        links: list[GpuLink] = []
        ordered = sorted(gpus, key=lambda g: g.uuid)
        for i, ga in enumerate(ordered):
            for gb in ordered[i + 1 :]:
                a, b = ga.uuid, gb.uuid
                # Both ends count the same links; where only one end could be read, trust it.
                ends = [direct[x].get(y, 0) for x, y in ((a, b), (b, a)) if x in direct]
                count = min(ends) if ends else 0
                if switch.get(a, 0) > 0 and switch.get(b, 0) > 0:
                    count += min(switch[a], switch[b])
                level: int | None = None
                if a in handles and b in handles:
                    try:
                        level = self._level(handles[a], handles[b])
                    except _Incomplete:
                        complete = False
                links.append(GpuLink(a, b, nvlinks=count, pcie=level))
        result = tuple(links)
        if complete:
            with self._lock:
                self._key, self._links = key, result
        return result

    def _nvlinks(self, handle: Any, buses: dict[_Bus, str]) -> tuple[dict[str, int], int]:
        """(links per peer GPU UUID, links to NVSwitches) of one GPU."""
        peers: dict[str, int] = {}
        switch = 0
        if not self._nvlink_calls:
            return peers, switch
        for link in range(_MAX_LINKS):
            try:
                if not pynvml.nvmlDeviceGetNvLinkState(handle, link):
                    continue
                remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)
            except pynvml.NVMLError as err:
                if code(err) == FUNCTION_NOT_FOUND:
                    self._nvlink_calls = False
                    return {}, 0
                if code(err) in _SKIP:
                    continue
                raise _Incomplete from err
            kind = self._remote_type(handle, link)
            peer = buses.get((int(remote.domain), int(remote.bus), int(remote.device)))
            if kind == _SWITCH:
                switch += 1
            elif peer is not None and kind in (_GPU, None):
                peers[peer] = peers.get(peer, 0) + 1
        return peers, switch

    def _remote_type(self, handle: Any, link: int) -> int | None:
        try:
            return int(pynvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link))
        except pynvml.NVMLError:
            return None  # older drivers: the remote's PCI address alone says whether it is one of ours

    def _level(self, a: Any, b: Any) -> int | None:
        if not self._level_call:
            return None
        try:
            return int(pynvml.nvmlDeviceGetTopologyCommonAncestor(a, b))
        except pynvml.NVMLError as err:
            if code(err) == FUNCTION_NOT_FOUND:
                self._level_call = False
                return None
            if code(err) in _SKIP:
                return None  # a lasting answer (e.g. a virtual GPU): unknown, no need to ask again
            raise _Incomplete from err
