from __future__ import annotations

import threading
import time

from exporter.backend import BackendError, DeviceLostError
from exporter.events import EventPump
from exporter.model import EVENT_GPU_LOST, EVENT_XID, DeviceEvent, Inventory
from tests.core.fakebackend import ScriptedBackend


class FailingEvents(ScriptedBackend):
    """open_events always fails, like a driver that refuses registration."""

    def __init__(self) -> None:
        super().__init__(gpus=1)
        self.opens = 0

    def open_events(self, inventory: Inventory):  # type: ignore[no-untyped-def]
        self.opens += 1
        raise BackendError("register failed")


class LosingEvents(ScriptedBackend):
    """Delivers one XID, then reports the GPU lost on every wait."""

    def __init__(self) -> None:
        super().__init__(gpus=1)
        self.opens = 0

    def open_events(self, inventory: Inventory):  # type: ignore[no-untyped-def]
        self.opens += 1
        backend = self

        class Source:
            registered = ("GPU-00000000",)
            delivered = False

            def wait(self, timeout_s: float) -> list[DeviceEvent]:
                if backend.opens == 1 and not self.delivered:
                    self.delivered = True
                    return [DeviceEvent("GPU-00000000", EVENT_XID, xid=79)]
                raise DeviceLostError("GPU-00000000")

            def close(self) -> None: ...

        return Source()


def test_failing_event_set_is_rebuilt_with_backoff_not_a_busy_loop() -> None:
    backend = FailingEvents()
    delays: list[float] = []
    seven = threading.Event()

    def pause(seconds: float) -> bool:
        delays.append(seconds)
        if len(delays) >= 7:
            seven.set()
        threading.Event().wait(0.001)
        return False

    pump = EventPump(backend, lambda: backend.inventory, lambda: None, sleep=pause)
    pump.start()
    assert seven.wait(5)
    pump.stop()
    assert delays[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # doubling, capped: never a tight loop
    assert backend.opens >= 7


def test_gpu_lost_during_wait_is_delivered_and_triggers_rediscovery() -> None:
    backend = LosingEvents()
    got: list[DeviceEvent] = []
    rediscover = threading.Event()
    pump = EventPump(backend, lambda: backend.inventory, rediscover.set)
    pump.add_listener(got.extend)
    pump.start()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and len(got) < 2:
        time.sleep(0.02)
    pump.stop()
    assert [(e.event_type, e.xid) for e in got[:2]] == [(EVENT_XID, 79), (EVENT_GPU_LOST, 0)]
    assert rediscover.is_set()


def test_a_failing_listener_does_not_stop_delivery() -> None:
    backend = LosingEvents()
    got: list[DeviceEvent] = []

    def broken(_events: list[DeviceEvent]) -> None:
        raise RuntimeError("bug in a consumer")

    pump = EventPump(backend, lambda: backend.inventory, lambda: None)
    pump.add_listener(broken)
    pump.add_listener(got.extend)
    pump.start()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not got:
        time.sleep(0.02)
    pump.stop()
    assert got and got[0].xid == 79


class QuietEvents(ScriptedBackend):
    """Registers every GPU; its waits never return an event (a MIG change that happens while no set is
    registered, during a rebuild, is never delivered: the driver only tells the sets that exist)."""

    def __init__(self) -> None:
        super().__init__(gpus=1)
        self.opened = threading.Semaphore(0)

    def open_events(self, inventory: Inventory):  # type: ignore[no-untyped-def]
        self.opened.release()

        class Source:
            registered = tuple(g.uuid for g in inventory.gpus)

            def wait(self, timeout_s: float) -> list[DeviceEvent]:
                time.sleep(min(timeout_s, 0.01))
                return []

            def close(self) -> None: ...

        return Source()


def test_a_rebuild_after_a_layout_change_asks_for_rediscovery() -> None:
    """Between seeing a new layout and registering the new set, a MIG reconfiguration has no set to be
    delivered to: the pump asks the collector to enumerate again once the new set is registered."""
    backend = QuietEvents()
    layouts = [backend.inventory]
    asked = threading.Event()
    pump = EventPump(backend, lambda: layouts[-1], asked.set)
    pump.start()
    try:
        assert backend.opened.acquire(timeout=3)
        assert not asked.wait(0.2)  # the first registration follows a discovery: nothing to ask
        inv = backend.inventory
        layouts.append(Inventory(inv.driver_version, (inv.gpus[0].__class__(1, "GPU-00000009", "x", 1, "m"),)))
        assert backend.opened.acquire(timeout=3)  # rebuilt for the new layout
        assert asked.wait(3)
    finally:
        pump.stop()
