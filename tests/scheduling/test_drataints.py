"""DeviceTaintRules through the real kubernetes client against tests/fakeapiserver.py, every API version."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from exporter.health.engine import HealthEngine
from exporter.labels import RenderContext
from exporter.model import EVENT_GPU_LOST, DeviceEvent
from exporter.scheduling.drataints import (
    NODE_LABEL,
    TAINT_KEY,
    DraTaintRules,
    node_label_value,
    rule_name,
)
from exporter.scheduling.faults import DRA_TAINT, ApiFaults
from tests.fakeapiserver import FakeApiServer
from tests.health.conftest import Clock, inventory, snapshot

from .conftest import DRIVER, GPU0, GPU1, MIG_A, MIG_B, NODE, TAINT_VERSIONS, ApiFactory, nvidia_slice, wait_for, xid

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
Start = Callable[..., DraTaintRules]


@pytest.fixture
def start(faults: ApiFaults) -> Iterator[Start]:
    made: list[DraTaintRules] = []

    def factory(engine: HealthEngine, api: Any, effect: str = "NoSchedule", **kw: Any) -> DraTaintRules:
        kw.setdefault("watch_timeout_s", 5)
        rules = DraTaintRules(engine, NODE, api, effect, kw.pop("faults", faults), **kw)
        rules.start()
        made.append(rules)
        return rules

    yield factory
    for r in made:
        r.stop()


def ours(server: FakeApiServer) -> dict[str, dict[str, Any]]:
    return {n: r for n, r in server.rules().items() if r["metadata"].get("labels", {}).get(NODE_LABEL) == NODE}


def by_device(server: FakeApiServer) -> dict[str, dict[str, Any]]:
    return {r["spec"]["deviceSelector"]["device"]: r for r in ours(server).values()}


@pytest.mark.parametrize("version", TAINT_VERSIONS)
def test_fence_creates_a_rule_and_a_clear_removes_it(
    version: str, engine: HealthEngine, make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api(dra_taint_versions=(version,))
    server.upsert_resource_slice(nvidia_slice())
    rules = start(engine, api)
    assert rules.wait_passes(1, 10)
    assert ours(server) == {} and rules.supported is True

    engine.on_events([xid(48, GPU0)])
    assert wait_for(lambda: "gpu-0" in by_device(server))
    rule = by_device(server)["gpu-0"]
    assert rule["apiVersion"] == f"resource.k8s.io/{version}"
    assert rule["metadata"]["name"] == rule_name(NODE, DRIVER, NODE, "gpu-0")
    assert rule["metadata"]["annotations"]["gpu-health-exporter/uuid"] == GPU0
    assert rule["spec"]["deviceSelector"] == {"driver": DRIVER, "pool": NODE, "device": "gpu-0"}
    assert {k: v for k, v in rule["spec"]["taint"].items() if k != "timeAdded"} == {
        "key": TAINT_KEY,
        "value": "48",
        "effect": "NoSchedule",
    }
    assert set(by_device(server)) == {"gpu-0"}  # the healthy GPU gets none
    posts = [r for r in server.requests if r.method == "POST" and r.path.endswith("/devicetaintrules")]
    assert {r.path for r in posts} == {f"/apis/resource.k8s.io/{version}/devicetaintrules"}

    engine.clear("all", "reseated")
    assert wait_for(lambda: ours(server) == {})
    assert wait_for(lambda: rules.present == 0)


def test_mig_devices_of_a_fenced_gpu_are_tainted_through_their_uuid(
    engine: HealthEngine, make_api: ApiFactory, start: Start, clock: Clock
) -> None:
    server, api = make_api(dra_taint_versions=("v1beta2",))
    server.upsert_resource_slice(nvidia_slice(mig=True))
    start(engine, api, "NoExecute")
    engine.on_snapshot(snapshot(inventory(mig=True), clock.t))  # the engine learns GPU0's MIG devices
    engine.on_events([DeviceEvent(GPU0, EVENT_GPU_LOST)])
    want = {"gpu-0-mig-3g40gb-9-0", "gpu-0-mig-3g40gb-9-4"}
    assert wait_for(lambda: set(by_device(server)) == want)
    for rule in by_device(server).values():
        assert rule["spec"]["taint"]["effect"] == "NoExecute"
        assert rule["spec"]["taint"]["value"]  # the reason's code or signal, never empty
    uuids = {r["metadata"]["annotations"]["gpu-health-exporter/uuid"] for r in ours(server).values()}
    assert uuids == {MIG_A, MIG_B}


def test_a_slice_published_after_the_fence_is_tainted(engine: HealthEngine, make_api: ApiFactory, start: Start) -> None:
    server, api = make_api(dra_taint_versions=("v1alpha3",))
    rules = start(engine, api)
    engine.on_events([xid(48, GPU1)])
    assert rules.wait_passes(1, 10) and ours(server) == {}
    server.upsert_resource_slice(nvidia_slice())  # the driver (re)starts: its slice arrives through the watch
    assert wait_for(lambda: set(by_device(server)) == {"gpu-1"})
    server.delete_resource_slice(nvidia_slice()["metadata"]["name"])  # the device is gone: its rule too
    assert wait_for(lambda: ours(server) == {})


def test_start_collects_stale_rules_of_this_node_only(engine: HealthEngine, make_api: ApiFactory, start: Start) -> None:
    server, api = make_api(dra_taint_versions=("v1beta2",))
    server.upsert_resource_slice(nvidia_slice())
    engine.on_events([xid(48, GPU1)])  # GPU1 fenced before the (re)start: its rule is kept

    def rule(name: str, node: str, device: str, effect: str = "NoSchedule") -> dict[str, Any]:
        return {"metadata": {"name": name, "labels": {NODE_LABEL: node}},
                "spec": {"deviceSelector": {"driver": DRIVER, "pool": node, "device": device},
                         "taint": {"key": TAINT_KEY, "value": "79", "effect": effect}}}  # fmt: skip

    server.upsert_rule(rule(rule_name(NODE, DRIVER, NODE, "gpu-0"), NODE, "gpu-0"))  # healthy now: stale
    server.upsert_rule(rule(rule_name(NODE, DRIVER, NODE, "gpu-7"), NODE, "gpu-7"))  # device gone: stale
    kept = rule_name(NODE, DRIVER, NODE, "gpu-1")
    server.upsert_rule(rule(kept, NODE, "gpu-1", effect="NoExecute"))  # ours, fenced, but the wrong effect
    server.upsert_rule(rule("other-node-rule", "node2", "gpu-0"))
    server.upsert_rule({"metadata": {"name": "admin-rule"}, "spec": {"deviceSelector": {"device": "gpu-0"},
                        "taint": {"key": "admin", "effect": "NoSchedule"}}})  # fmt: skip
    rules = start(engine, api)
    assert rules.wait_passes(1, 10)
    assert set(ours(server)) == {kept}
    assert ours(server)[kept]["spec"]["taint"]["effect"] == "NoSchedule"
    assert ours(server)[kept]["spec"]["taint"]["value"] == "48"
    assert {"other-node-rule", "admin-rule"} <= set(server.rules())
    lists = [r for r in server.requests if r.method == "GET" and r.path.endswith("/devicetaintrules")]
    assert lists and lists[0].query["labelSelector"] == f"{NODE_LABEL}={NODE}"


def test_no_version_serves_rules_exported_and_logged_once(
    engine: HealthEngine, make_api: ApiFactory, start: Start, capsys: pytest.CaptureFixture[str]
) -> None:
    server, api = make_api(dra_taint_versions=())  # resource.k8s.io served (slices), rules not
    server.upsert_resource_slice(nvidia_slice())
    rules = start(engine, api, resync_s=0.05)
    assert wait_for(lambda: rules.supported is False)
    engine.on_events([xid(48, GPU0)])
    engine.on_events([xid(48, GPU1)])
    assert wait_for(lambda: len([r for r in server.requests if r.path.rstrip("/") == "/apis/resource.k8s.io"]) >= 3)
    text = rules.render_metrics(RenderContext("", "h"))
    assert "gpuhealth_dra_taints_supported 0\n" in text and "gpuhealth_dra_device_taint_rules 0\n" in text
    assert not [r for r in server.requests if "devicetaintrules" in r.path]
    assert capsys.readouterr().out.count("dra_device_taints_unsupported") == 1
    # The cluster is upgraded: the next resync finds the API and taints what is fenced.
    server.dra_taint_versions = ("v1beta2",)
    assert wait_for(lambda: set(by_device(server)) == {"gpu-0", "gpu-1"})
    assert "gpuhealth_dra_taints_supported 1\n" in rules.render_metrics(RenderContext("", "h"))


def test_degraded_gets_effect_none_where_the_server_has_it(
    engine: HealthEngine, make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api(dra_taint_versions=("v1alpha3",))
    server.upsert_resource_slice(nvidia_slice())
    start(engine, api)
    engine.on_events([xid(63, GPU0)])  # a warning class XID: degraded, not fenced
    assert engine.verdict(GPU0).state.name == "DEGRADED"
    assert wait_for(lambda: "gpu-0" in by_device(server))
    assert by_device(server)["gpu-0"]["spec"]["taint"]["effect"] == "None"


def test_a_server_before_1_35_refuses_effect_none_and_fences_still_go_through(
    engine: HealthEngine, make_api: ApiFactory, start: Start, faults: ApiFaults
) -> None:
    server, api = make_api(dra_taint_versions=("v1alpha3",), none_effect=False)
    server.upsert_resource_slice(nvidia_slice())
    rules = start(engine, api)
    engine.on_events([xid(63, GPU0)])
    engine.on_events([xid(48, GPU1)])
    assert wait_for(lambda: set(by_device(server)) == {"gpu-1"})
    n = rules.passes
    assert rules.wait_passes(n + 1, 10)
    assert set(by_device(server)) == {"gpu-1"} and faults.errors(DRA_TAINT) == 0
    refused = [r for r in server.requests if r.method == "POST" and (r.body or {}).get("spec", {}).get("taint", {})
               .get("effect") == "None"]  # fmt: skip
    assert len(refused) == 1  # asked once, then degraded devices go untainted


@pytest.mark.parametrize(("code", "kind"), [(403, "forbidden"), (422, "invalid"), (500, "server_error")])
def test_a_refused_write_is_logged_counted_and_retried(
    code: int, kind: str, engine: HealthEngine, make_api: ApiFactory, start: Start, faults: ApiFaults,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    server, api = make_api(dra_taint_versions=("v1",))
    server.upsert_resource_slice(nvidia_slice())
    server.inject("POST", "/devicetaintrules", code, count=None)
    start(engine, api, backoff_initial_s=0.05, backoff_max_s=0.1)
    engine.on_events([xid(48, GPU0)])
    assert wait_for(lambda: faults.errors(DRA_TAINT) >= 3)
    assert engine.verdict(GPU0).state.name == "UNHEALTHY"  # our failure never clears a fence
    out = capsys.readouterr().out
    assert out.count("kubernetes_write_failed") == 1 and f"kind={kind}" in out.replace("'", "")
    server.clear_faults()
    assert wait_for(lambda: "gpu-0" in by_device(server))
    said: list[str] = []

    def recovered() -> bool:  # logged right after the write's reply: poll the log for it
        said.append(capsys.readouterr().out)
        return "kubernetes_writes_recovered" in "".join(said)

    assert wait_for(recovered)


def test_a_server_that_stops_answering_never_delays_a_fence(
    engine: HealthEngine, make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api(dra_taint_versions=("v1",))
    server.upsert_resource_slice(nvidia_slice())
    start(engine, api)
    engine.on_events([xid(48, GPU1)])
    assert wait_for(lambda: "gpu-1" in by_device(server))  # discovered, slices listed: the writer is up
    server.replying.clear()  # from now on requests arrive and are never answered
    engine.on_events([xid(48, GPU0)])  # returns while the rule's create hangs
    assert engine.verdict(GPU0).state.name == "UNHEALTHY"
    assert wait_for(lambda: any(r.method == "POST" and r.path.endswith("/devicetaintrules") for r in server.requests))
    assert "gpu-0" not in by_device(server)
    server.replying.set()
    assert wait_for(lambda: "gpu-0" in by_device(server))


def test_an_unreachable_server_is_counted_and_claims_nothing(
    engine: HealthEngine, make_api: ApiFactory, start: Start, faults: ApiFaults
) -> None:
    server, api = make_api(dra_taint_versions=("v1",))
    server.delay_s = 0.5  # slow replies first
    rules = start(engine, api, backoff_initial_s=0.05, backoff_max_s=0.1)
    server.stop()  # then gone
    engine.on_events([xid(48, GPU0)])
    assert engine.verdict(GPU0).state.name == "UNHEALTHY"
    assert wait_for(lambda: faults.errors(DRA_TAINT) >= 2)
    assert rules.supported is None  # never answered: no claim either way


def test_a_rule_changed_or_deleted_by_someone_else_is_restored_at_resync(
    engine: HealthEngine, make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api(dra_taint_versions=("v1",))
    server.upsert_resource_slice(nvidia_slice())
    start(engine, api, resync_s=0.1)
    engine.on_events([xid(48, GPU0)])
    assert wait_for(lambda: "gpu-0" in by_device(server))
    name = rule_name(NODE, DRIVER, NODE, "gpu-0")
    changed = server.rules()[name]
    changed["spec"]["taint"]["effect"] = "NoExecute"
    server.upsert_rule(changed)  # a new resourceVersion: our cached copy is now stale (409 on update)
    assert wait_for(lambda: server.rules()[name]["spec"]["taint"]["effect"] == "NoSchedule")
    server._delete("devicetaintrules", ("", name))
    assert wait_for(lambda: name in server.rules())


def test_names_and_labels() -> None:
    name = rule_name(NODE, DRIVER, NODE, "gpu-0-mig-1g10gb-19-0")
    assert name == rule_name(NODE, DRIVER, NODE, "gpu-0-mig-1g10gb-19-0")  # deterministic
    assert name.startswith("gpuhealth-node1-gpu-0-mig-1g10gb-19-0-") and DNS_SUBDOMAIN.match(name)
    assert rule_name(NODE, DRIVER, NODE, "gpu-0") != rule_name(NODE, "other.example.com", NODE, "gpu-0")
    assert rule_name(NODE, DRIVER, NODE, "GPU_0") != rule_name(NODE, DRIVER, NODE, "gpu-0")  # cut alike, hash differs
    long_node = ".".join(["a" * 63] * 3) + ".b"
    long_name = rule_name(long_node, DRIVER, long_node, "d" * 200)
    assert len(long_name) <= 253 and DNS_SUBDOMAIN.match(long_name)
    assert node_label_value(NODE) == NODE
    hashed = node_label_value(long_node)
    assert hashed.startswith("sha256-") and len(hashed) <= 63 and hashed == node_label_value(long_node)


def test_the_rule_api_going_away_is_discovered_again(
    engine: HealthEngine, make_api: ApiFactory, start: Start, faults: ApiFaults
) -> None:
    server, api = make_api(dra_taint_versions=("v1beta2",))
    server.upsert_resource_slice(nvidia_slice())
    rules = start(engine, api, backoff_initial_s=0.05, backoff_max_s=0.1)
    assert rules.wait_passes(1, 10) and rules.supported is True
    server.dra_taint_versions = ()  # a gate turned off, a downgrade
    engine.on_events([xid(48, GPU0)])
    assert wait_for(lambda: rules.supported is False)
    assert faults.errors(DRA_TAINT) >= 1  # the 404 that told us
    server.dra_taint_versions = ("v1alpha3",)  # back, in another version
    rules.resync_s = 0.05
    rules.wake()
    assert wait_for(lambda: set(by_device(server)) == {"gpu-0"})
    assert next(iter(server.rules().values()))["apiVersion"] == "resource.k8s.io/v1alpha3"
