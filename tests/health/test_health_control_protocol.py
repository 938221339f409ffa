"""The control protocol (exporter/health/control.py: respond, handler) without a socket."""

from __future__ import annotations

from typing import Any

import pytest

from exporter.health import control
from exporter.health.engine import CONTROL_SOCKET

from .conftest import GPU0, GPU1, EngineFactory, inventory, snapshot, xid


class Fake:
    """A control target that records what it was asked."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.clears: list[tuple[str, str]] = []
        self.peers: list[control.Peer | None] = []

    def clear(self, target: str, reason: str, *, peer: control.Peer | None = None) -> list[str]:
        self.peers.append(peer)
        if self.fail is not None:
            raise ValueError(self.fail)
        self.clears.append((target, reason))
        return [target]

    def list(self) -> list[dict[str, Any]]:
        return [{"uuid": GPU0}]


def test_the_socket_name_is_the_controls_and_the_engine_re_exports_it() -> None:
    assert control.CONTROL_SOCKET == CONTROL_SOCKET == "control.sock"


def test_list() -> None:
    assert control.respond(Fake(), {"op": "list"}) == {"ok": True, "devices": [{"uuid": GPU0}]}


def test_clear_passes_target_and_reason_as_given() -> None:
    fake = Fake()
    assert control.respond(fake, {"op": "clear", "target": " 0 ", "reason": "fixed"}) == {
        "ok": True,
        "cleared": [" 0 "],
    }
    assert fake.clears == [(" 0 ", "fixed")]


@pytest.mark.parametrize(
    "req",
    [
        {"op": "clear"},
        {"op": "clear", "target": "all"},
        {"op": "clear", "reason": "r"},
        {"op": "clear", "target": 0, "reason": "r"},
        {"op": "clear", "target": "all", "reason": None},
    ],
)
def test_clear_needs_string_target_and_reason(req: dict[str, Any]) -> None:
    fake = Fake()
    assert control.respond(fake, req) == {"ok": False, "error": "clear needs string 'target' and 'reason'"}
    assert fake.clears == []


def test_a_refused_clear_is_an_error_reply() -> None:
    resp = control.respond(Fake(fail="no GPU matches"), {"op": "clear", "target": "9", "reason": "r"})
    assert resp == {"ok": False, "error": "no GPU matches"}


@pytest.mark.parametrize("op", [None, "nope", 1])
def test_unknown_op(op: object) -> None:
    req: dict[str, Any] = {} if op is None else {"op": op}
    assert control.respond(Fake(), req) == {"ok": False, "error": f"unknown op {op!r}"}


def test_the_handler_asks_to_retry_until_ready() -> None:
    ready = False
    handle = control.handler(Fake(), lambda: ready)
    assert handle({"op": "list"}, None) == {"ok": False, "error": control.NOT_LOADED}
    ready = True
    assert handle({"op": "list"}, None)["ok"] is True


def test_an_engine_answers_through_respond(make_engine: EngineFactory) -> None:
    eng = make_engine()
    eng.on_snapshot(snapshot(inventory(), 1.0))
    eng.on_events([xid(79, GPU1)])
    listed = control.respond(eng, {"op": "list"})
    assert listed["ok"] and [d["state"] for d in listed["devices"]] == ["healthy", "unhealthy"]
    assert control.respond(eng, {"op": "clear", "target": "1", "reason": " "}) == {
        "ok": False,
        "error": "a reason is required for every clear",
    }
    assert control.respond(eng, {"op": "clear", "target": "1", "reason": "swapped"}) == {"ok": True, "cleared": [GPU1]}
    assert eng.verdict(GPU1).state.name == "HEALTHY"


def test_clear_passes_the_peer_on_and_the_transition_says_who_cleared(make_engine: EngineFactory) -> None:
    fake = Fake()
    peer = control.Peer(pid=4242, uid=1000, gid=1000)
    assert control.respond(fake, {"op": "clear", "target": "0", "reason": "fixed"}, peer)["ok"] is True
    assert fake.peers == [peer]

    eng = make_engine()
    eng.on_snapshot(snapshot(inventory(), 0.0))
    eng.on_events([xid(79, GPU1)])
    heard: list[Any] = []
    eng.add_transition_listener(heard.extend)
    assert control.respond(eng, {"op": "clear", "target": GPU1, "reason": "reseated"}, peer)["cleared"] == [GPU1]
    [t] = heard
    assert (t.uuid, t.state.name) == (GPU1, "HEALTHY")
    assert t.cleared == "cleared by uid 1000 pid 4242 over the control socket: reseated"
