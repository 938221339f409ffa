"""NvmlBackend.discover() says each lasting condition once (then at most once a minute), through
the real pynvml binding against the fake libnvidia-ml.so.1."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from exporter.logs import Reminder
from exporter.nvml import NvmlBackend


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend(fake_nvml: Any, clock: Clock) -> Iterator[NvmlBackend]:
    b = NvmlBackend(fake_nvml.use("h100x8"))
    b.discovery_log = Reminder(60.0, clock=clock)
    b.start()
    yield b
    b.shutdown()


def named(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event]


def test_lost_gpu_is_logged_once_not_every_discovery(backend: NvmlBackend, fake_nvml: Any, clock: Clock) -> None:
    inv = backend.discover()
    fake_nvml.control("lost", gpu=3)
    with capture_logs() as logs:
        for _ in range(20):
            assert backend.discover().gpus == inv.gpus  # still listed with its last known identity
            clock.now += 1
    unreadable = named(logs, "gpu_unreadable_in_discovery")
    assert len(unreadable) == 1
    assert unreadable[0]["index"] == 3 and unreadable[0]["uuid"] == inv.gpus[3].uuid
    assert unreadable[0]["log_level"] == "warning"

    # A minute on, still lost: said once more.
    clock.now += 60
    with capture_logs() as logs:
        for _ in range(20):
            backend.discover()
    assert len(named(logs, "gpu_unreadable_in_discovery")) == 1

    # Back: said once, and nothing more while it stays fine.
    fake_nvml.control("recover", gpu=3)
    with capture_logs() as logs:
        for _ in range(5):
            backend.discover()
    again = named(logs, "gpu_readable_again")
    assert [(e["index"], e["uuid"], e["log_level"]) for e in again] == [(3, inv.gpus[3].uuid, "info")]
    assert not named(logs, "gpu_unreadable_in_discovery")

    # Lost again later: a new condition, logged at once.
    fake_nvml.control("lost", gpu=3)
    with capture_logs() as logs:
        backend.discover()
    assert len(named(logs, "gpu_unreadable_in_discovery")) == 1


def test_gpu_never_discovered_is_logged_once(backend: NvmlBackend, fake_nvml: Any, clock: Clock) -> None:
    fake_nvml.control("lost", gpu=5)  # before the first discovery: no identity to fall back to
    with capture_logs() as logs:
        for _ in range(20):
            assert len(backend.discover().gpus) == 7
            clock.now += 1
    failed = named(logs, "gpu_discovery_failed")
    assert [(e["index"], e["log_level"]) for e in failed] == [(5, "warning")]

    clock.now += 60
    with capture_logs() as logs:
        backend.discover()
        backend.discover()
    assert len(named(logs, "gpu_discovery_failed")) == 1

    fake_nvml.control("recover", gpu=5)
    with capture_logs() as logs:
        for _ in range(5):
            assert len(backend.discover().gpus) == 8
    assert [e["index"] for e in named(logs, "gpu_readable_again")] == [5]


def test_other_gpus_have_their_own_conditions(backend: NvmlBackend, fake_nvml: Any) -> None:
    backend.discover()
    with capture_logs() as logs:
        fake_nvml.control("lost", gpu=1)
        backend.discover()
        fake_nvml.control("lost", gpu=6)
        for _ in range(10):
            backend.discover()
    assert [e["index"] for e in named(logs, "gpu_unreadable_in_discovery")] == [1, 6]
