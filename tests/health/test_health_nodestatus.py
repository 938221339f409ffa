"""Node condition and Events through the real kubernetes client against tests/fakeapiserver.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from exporter.health.control import Peer
from exporter.health.nodestatus import CONDITION_TYPE, NodeStatusReporter
from exporter.model import EVENT_XID, DeviceEvent
from tests.fakeapiserver import FakeApiServer

from .conftest import GPU0, EngineFactory


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def condition(api: FakeApiServer, node: str) -> dict[str, str] | None:
    for c in api.nodes.get(node, {}).get("status", {}).get("conditions", []):
        if c["type"] == CONDITION_TYPE:
            return dict(c)
    return None


def test_condition_and_events(make_engine: EngineFactory, tmp_path: Path) -> None:
    eng = make_engine()
    with FakeApiServer() as api:
        rep = NodeStatusReporter(eng, "node1", kubeconfig=api.write_kubeconfig(tmp_path / "kc"))
        rep.start()
        try:
            assert wait_for(lambda: (condition(api, "node1") or {}).get("reason") == "AllGPUsHealthy")
            eng.on_events([DeviceEvent(GPU0, EVENT_XID, 79)])
            assert wait_for(lambda: (condition(api, "node1") or {}).get("status") == "False")
            c = condition(api, "node1")
            assert c is not None and c["reason"] == "GPUsUnhealthy" and GPU0 in c["message"]
            assert wait_for(lambda: len(api.events) == 1)
            ev = api.events[0]
            assert ev["reason"] == "GPUUnhealthy" and ev["type"] == "Warning"
            assert ev["involvedObject"]["name"] == "node1" and GPU0 in ev["message"]
            eng.clear("all", "fixed", peer=Peer(pid=4242, uid=0, gid=0))
            assert wait_for(lambda: (condition(api, "node1") or {}).get("status") == "True")
            assert wait_for(lambda: len(api.events) == 2 and api.events[1]["reason"] == "GPUHealthy")
            # The audit trail reaches the cluster: who cleared it, and why.
            assert api.events[1]["message"].endswith("cleared by uid 0 pid 4242 over the control socket: fixed")
            patches = [r for r in api.requests if r.method == "PATCH"]
            assert patches and patches[0].path == "/api/v1/nodes/node1/status"
        finally:
            rep.stop()


def test_unreachable_api_server_never_blocks_the_engine(make_engine: EngineFactory, tmp_path: Path) -> None:
    eng = make_engine()
    with FakeApiServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kc")
    # The server is gone: every call fails (connection refused) on the reporter's thread.
    rep = NodeStatusReporter(eng, "node1", kubeconfig=kubeconfig)
    rep.start()
    try:
        start = time.monotonic()
        for _ in range(50):
            eng.on_events([DeviceEvent(GPU0, EVENT_XID, 79)])
            eng.clear("all", "flap")
        assert time.monotonic() - start < 5  # generous: the point is that nothing waits on HTTP
        assert eng.verdict(GPU0).healthy_for_scheduling
    finally:
        rep.stop()


def test_unknown_verdicts_keep_the_condition_true_and_say_why() -> None:
    from exporter.health.nodestatus import condition_for
    from exporter.health.verdict import HealthState, Verdict, is_worse

    status, reason, message = condition_for({"GPU-a": Verdict("GPU-a", HealthState.UNKNOWN)})
    assert (status, reason) == ("True", "GPUHealthUnknown") and "GPU-a" in message
    fenced = {"GPU-a": Verdict("GPU-a", HealthState.UNKNOWN), "GPU-b": Verdict("GPU-b", HealthState.UNHEALTHY)}
    assert condition_for(fenced)[:2] == ("False", "GPUsUnhealthy")
    assert is_worse(HealthState.UNHEALTHY, HealthState.UNKNOWN)  # a fence after a blind spot warns
    assert is_worse(HealthState.UNKNOWN, HealthState.DEGRADED)
    assert not is_worse(HealthState.HEALTHY, HealthState.UNKNOWN)
