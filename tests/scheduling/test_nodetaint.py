"""The Node taint through the real kubernetes client against tests/fakeapiserver.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from exporter.config import NodeTaint
from exporter.health.engine import HealthEngine
from exporter.labels import RenderContext
from exporter.model import Inventory
from exporter.scheduling.faults import NODE_TAINT, ApiFaults
from exporter.scheduling.nodetaint import NodeTaintReconciler
from tests.fakeapiserver import FakeApiServer

from .conftest import GPU0, GPU1, NODE, ApiFactory, inventory, wait_for, xid

OURS = NodeTaint("gpu-health-exporter/unhealthy", "true", "NoSchedule")
THEIRS = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
SAME_KEY_OTHER_EFFECT = {"key": OURS.key, "value": "x", "effect": "NoExecute"}
Start = Callable[..., NodeTaintReconciler]


@pytest.fixture
def start(faults: ApiFaults) -> Iterator[Start]:
    made: list[NodeTaintReconciler] = []

    def factory(engine: HealthEngine, api: Any, inv: Inventory | None = None, **kw: Any) -> NodeTaintReconciler:
        kw.setdefault("backoff_initial_s", 0.05)
        kw.setdefault("backoff_max_s", 0.1)
        rec = NodeTaintReconciler(engine, NODE, api, OURS, lambda: inv, faults, **kw)
        rec.start()
        made.append(rec)
        return rec

    yield factory
    for r in made:
        r.stop()


def node(taints: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "spec": {"taints": taints}}


def ours_on(server: FakeApiServer) -> list[dict[str, Any]]:
    return [t for t in server.node_taints(NODE) if t["key"] == OURS.key and t["effect"] == OURS.effect]


def test_a_reboot_node_verdict_taints_the_node_and_a_clear_removes_it(
    engine: HealthEngine, make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api()
    server.set_node(node([THEIRS, SAME_KEY_OTHER_EFFECT]))
    rec = start(engine, api, inventory())
    assert rec.wait_passes(1, 10) and ours_on(server) == [] and rec.applied is False
    engine.on_events([xid(79, GPU0)])  # fallen off the bus: reboot the node
    assert wait_for(lambda: len(ours_on(server)) == 1)
    taint = ours_on(server)[0]
    assert taint["value"] == "true" and taint["timeAdded"]
    assert THEIRS in server.node_taints(NODE) and SAME_KEY_OTHER_EFFECT in server.node_taints(NODE)
    assert wait_for(lambda: rec.applied is True)
    assert "gpuhealth_node_taint_applied 1\n" in rec.render_metrics(RenderContext("", "h"))
    patches = [r for r in server.requests if r.method == "PATCH" and r.path == f"/api/v1/nodes/{NODE}"]
    assert patches and patches[0].body["metadata"]["resourceVersion"]  # guarded by the version it read

    engine.clear("all", "rebooted")
    assert wait_for(lambda: ours_on(server) == [])
    assert server.node_taints(NODE) == [THEIRS, SAME_KEY_OTHER_EFFECT]
    assert wait_for(lambda: rec.applied is False)


def test_every_gpu_fenced_taints_one_healthy_gpu_does_not(
    engine: HealthEngine, make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api()
    server.set_node(node([]))
    rec = start(engine, api, inventory())
    engine.on_events([xid(48, GPU0)])  # reset_gpu: not a reboot
    assert wait_for(lambda: engine.verdict(GPU0).state.name == "UNHEALTHY")
    n = rec.passes
    rec.wake()  # a pass that has seen the fence
    assert rec.wait_passes(n + 1, 10)
    assert ours_on(server) == []
    engine.on_events([xid(48, GPU1)])  # now every GPU of the node is fenced
    assert wait_for(lambda: len(ours_on(server)) == 1)
    engine.clear(GPU1, "replaced")
    assert wait_for(lambda: ours_on(server) == [])


def test_an_empty_inventory_never_counts_as_every_gpu_fenced(
    engine: HealthEngine, make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api()
    server.set_node(node([]))
    engine.on_events([xid(48, GPU0)])
    rec = start(engine, api, Inventory("570.86.15", ()))
    assert rec.wait_passes(1, 10)
    assert ours_on(server) == [] and rec.applied is False
    assert not [r for r in server.requests if r.method == "PATCH"]


def test_a_leftover_taint_of_ours_is_removed_at_start(engine: HealthEngine, make_api: ApiFactory, start: Start) -> None:
    server, api = make_api()
    leftover = {"key": OURS.key, "value": OURS.value, "effect": OURS.effect, "timeAdded": "2026-01-01T00:00:00Z"}
    server.set_node(node([leftover, THEIRS]))
    rec = start(engine, api, inventory())
    assert rec.wait_passes(1, 10)
    assert server.node_taints(NODE) == [THEIRS]


def test_a_concurrent_change_to_other_taints_is_never_lost(
    engine: HealthEngine, make_api: ApiFactory, start: Start, faults: ApiFaults
) -> None:
    server, api = make_api()
    server.set_node(node([THEIRS]))
    someone = {"key": "example.com/maintenance", "effect": "NoExecute"}
    writes: list[str] = []

    def concurrent_writer(name: str) -> None:
        if not writes:  # between our read and our write, once: an admin adds a taint
            writes.append(name)
            server.set_node(node([THEIRS, someone]))

    server.node_write_hook = concurrent_writer
    rec = start(engine, api, inventory())
    engine.on_events([xid(79, GPU0)])
    assert wait_for(lambda: len(ours_on(server)) == 1)
    assert THEIRS in server.node_taints(NODE) and someone in server.node_taints(NODE)
    # The server has the taint a moment before our client has read the reply: wait for the client too.
    assert wait_for(lambda: rec.applied is True)
    assert writes == [NODE] and faults.errors(NODE_TAINT) == 1  # the 409, then a fresh read and patch


def test_forbidden_is_counted_and_retried_and_never_touches_verdicts(
    engine: HealthEngine, make_api: ApiFactory, start: Start, faults: ApiFaults, capsys: pytest.CaptureFixture[str]
) -> None:
    server, api = make_api()
    server.set_node(node([]))
    server.inject("PATCH", f"/api/v1/nodes/{NODE}", 403, count=None)
    start(engine, api, inventory())
    engine.on_events([xid(79, GPU0)])
    assert wait_for(lambda: faults.errors(NODE_TAINT) >= 3)
    assert engine.verdict(GPU0).state.name == "UNHEALTHY" and engine.verdict(GPU1).state.name == "HEALTHY"
    out = capsys.readouterr().out
    assert out.count("kubernetes_write_failed") == 1 and "forbidden" in out
    server.clear_faults()
    assert wait_for(lambda: len(ours_on(server)) == 1)


def test_a_node_that_does_not_exist_is_a_logged_failure(
    engine: HealthEngine, make_api: ApiFactory, start: Start, faults: ApiFaults
) -> None:
    _server, api = make_api()  # no Node object at all
    rec = start(engine, api, inventory())
    assert wait_for(lambda: faults.errors(NODE_TAINT) >= 1)
    assert rec.applied is None and "gpuhealth_node_taint_applied 0\n" in rec.render_metrics(RenderContext("", "h"))


def test_taint_wanted_judges_only_judged_reasons_and_real_inventories() -> None:
    from exporter.health.verdict import HealthState, Reason, Verdict
    from exporter.scheduling.nodetaint import taint_wanted

    def reason(state: HealthState, action: str) -> Reason:
        return Reason("xid", "79", "m", 0.0, 0.0, 1, action, state)

    inv = inventory()
    fenced = Verdict(GPU0, HealthState.UNHEALTHY, (reason(HealthState.UNHEALTHY, "reset_gpu"),))
    healthy = Verdict(GPU1, HealthState.HEALTHY)
    unknown = Verdict(GPU1, HealthState.UNKNOWN, (reason(HealthState.UNKNOWN, "reboot_node"),))
    reboot = Verdict(GPU1, HealthState.UNHEALTHY, (reason(HealthState.UNHEALTHY, "reboot_node"),))
    of = {GPU0: fenced, GPU1: healthy}
    assert taint_wanted(of, inv, lambda u: of.get(u, healthy)) is None
    of = {GPU0: fenced, GPU1: unknown}  # the monitor's trouble: never a reason to drain
    assert taint_wanted(of, inv, lambda u: of.get(u, healthy)) is None
    of = {GPU0: fenced, GPU1: reboot}
    assert taint_wanted(of, inv, lambda u: of.get(u, healthy)) == "reboot_node"
    both = {GPU0: fenced, GPU1: Verdict(GPU1, HealthState.UNHEALTHY, fenced.reasons)}
    assert taint_wanted(both, inv, lambda u: both[u]) == "all_gpus_fenced"
    assert taint_wanted(both, Inventory("570.86.15", ()), lambda u: both[u]) is None
    assert taint_wanted(both, None, lambda u: both[u]) is None
