"""A simulated node on a hand-driven clock, for the simulator's tests."""

from __future__ import annotations

from exporter.simulate import SimulatedBackend


class Clock:
    """Time as the simulator sees it; tests move it with `advance`."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make(spec: str | None = None, t: float = 1000.0) -> tuple[SimulatedBackend, Clock]:
    clock = Clock(t)
    return SimulatedBackend.from_spec(spec, clock=clock), clock
