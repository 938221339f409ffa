"""Pod Events on a fence: the real PodMapper on a fake kubelet, the real kubernetes client on the fake API server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.health.engine import HealthEngine
from exporter.labels import RenderContext
from exporter.model import EVENT_XID, DeviceEvent
from exporter.pods import PodMapper, PodMappingConfig
from exporter.scheduling.faults import POD_EVENT, ApiFaults
from exporter.scheduling.podevents import REASON, PodEvents
from exporter.tokenbucket import TokenBucket
from tests.fakeapiserver import FakeApiServer
from tests.fakekubelet import FakeKubelet
from tests.pods.podfixtures import container, gpu_uuid, make_inventory, mig_uuid, pod

from .conftest import NODE, ApiFactory, wait_for

GPU = "nvidia.com/gpu"
MIG = "nvidia.com/mig-1g.10gb"
INV = make_inventory(2, mig={1: [(1, "1g.10gb"), (2, "1g.10gb")]})


def fence(engine: HealthEngine, uuid: str, code: int = 48) -> None:
    engine.on_events([DeviceEvent(uuid, EVENT_XID, code)])


@pytest.fixture
def mapper(kubelet: FakeKubelet, sock_dir: Path) -> Iterator[Callable[..., PodMapper]]:
    made: list[PodMapper] = []

    def factory(**kw: Any) -> PodMapper:
        kubelet.set_pods([
            pod("train-0", "ml", container("c", GPU, [gpu_uuid(0)])),
            pod("train-1", "ml", container("c", GPU, [gpu_uuid(0)]), container("side")),
            pod("infer", "serving", container("c", MIG, [mig_uuid(1, 1)])),
            pod("cpu-only", "ml", container("c")),
        ])  # fmt: skip
        m = PodMapper(PodMappingConfig(socket_path=kubelet.socket_path, node_name=NODE, watch_timeout_s=5, **kw))
        made.append(m)
        m.refresh(INV)
        assert wait_for(lambda: m.wait_idle(5) and len(m.holders(gpu_uuid(0))) == 2)
        return m

    yield factory
    for m in made:
        m.close()


Start = Callable[..., PodEvents]


@pytest.fixture
def start(faults: ApiFaults) -> Iterator[Start]:
    made: list[PodEvents] = []

    def factory(engine: HealthEngine, pods: PodMapper, api: Any, **kw: Any) -> PodEvents:
        ev = PodEvents(engine, pods, NODE, api, faults, **kw)
        ev.start()
        made.append(ev)
        return ev

    yield factory
    for e in made:
        e.stop()


def pod_events(server: FakeApiServer) -> list[dict[str, Any]]:
    return [e for e in server.events if e["involvedObject"]["kind"] == "Pod"]


def test_holders_lists_the_pods_of_a_gpu_and_of_its_mig_devices(mapper: Callable[..., PodMapper]) -> None:
    m = mapper()
    assert [(p.namespace, p.name) for p in m.holders(gpu_uuid(0))] == [("ml", "train-0"), ("ml", "train-1")]
    assert [(p.namespace, p.name) for p in m.holders(gpu_uuid(1))] == [("serving", "infer")]  # via its MIG
    assert [p.name for p in m.holders(mig_uuid(1, 1))] == ["infer"]
    assert m.holders(mig_uuid(1, 2)) == () and m.holders("GPU-unknown") == ()


def test_one_warning_event_per_pod_and_transition(
    engine: HealthEngine, mapper: Callable[..., PodMapper], make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api()
    ev = start(engine, mapper(), api)
    fence(engine, gpu_uuid(0))
    assert wait_for(lambda: len(pod_events(server)) == 2)
    by_pod = {e["involvedObject"]["name"]: e for e in pod_events(server)}
    assert set(by_pod) == {"train-0", "train-1"}
    e = by_pod["train-0"]
    assert e["metadata"]["namespace"] == "ml" and e["involvedObject"]["namespace"] == "ml"
    assert e["reason"] == REASON and e["type"] == "Warning"
    assert gpu_uuid(0) in e["message"] and "xid 48" in e["message"] and "reset_gpu" in e["message"]
    assert e["source"]["host"] == NODE
    posts = [r.path for r in server.requests if r.method == "POST"]
    assert sorted(posts) == ["/api/v1/namespaces/ml/events"] * 2

    fence(engine, gpu_uuid(0))  # the same fence again: no new transition, no new Event
    fence(engine, gpu_uuid(1), 79)  # the MIG device's pod on the other GPU
    assert wait_for(lambda: len(pod_events(server)) == 3)
    assert pod_events(server)[2]["involvedObject"]["name"] == "infer"
    assert "reboot_node" in pod_events(server)[2]["message"]
    text = ev.render_metrics(RenderContext("", "h"))
    assert 'gpuhealth_kubernetes_pod_events_total{result="posted"} 3\n' in text

    engine.clear("all", "fixed")
    fence(engine, gpu_uuid(0))  # a new transition: Events again
    assert wait_for(lambda: len(pod_events(server)) == 5)


def test_pod_uid_is_set_where_the_pod_watch_knows_it(
    engine: HealthEngine, mapper: Callable[..., PodMapper], make_api: ApiFactory, start: Start, sock_dir: Path
) -> None:
    server, api = make_api()
    server.upsert_pod({"metadata": {"name": "train-0", "namespace": "ml", "uid": "uid-0"}, "spec": {"nodeName": NODE}})
    m = mapper(enable_pod_uid=True, kubeconfig=server.write_kubeconfig(sock_dir / "kc"))
    assert wait_for(lambda: m.holders(gpu_uuid(0))[0].uid == "uid-0")
    start(engine, m, api)
    fence(engine, gpu_uuid(0))
    assert wait_for(lambda: len(pod_events(server)) == 2)
    uids = {e["involvedObject"]["name"]: e["involvedObject"].get("uid") for e in pod_events(server)}
    assert uids == {"train-0": "uid-0", "train-1": None}


def test_the_rate_limit_refuses_and_counts(
    engine: HealthEngine, mapper: Callable[..., PodMapper], make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api()
    ev = start(engine, mapper(), api, rate_per_s=0.001, burst=2)
    fence(engine, gpu_uuid(0))
    fence(engine, gpu_uuid(1))
    assert wait_for(lambda: ev.posted + ev.rate_limited == 3)
    assert ev.posted == 2 and ev.rate_limited == 1 and len(pod_events(server)) == 2
    assert 'gpuhealth_kubernetes_pod_events_total{result="rate_limited"} 1\n' in ev.render_metrics(
        RenderContext("", "h")
    )


def test_a_failed_post_is_retried_a_forbidden_one_is_not(
    engine: HealthEngine, mapper: Callable[..., PodMapper], make_api: ApiFactory, start: Start, faults: ApiFaults
) -> None:
    server, api = make_api()
    server.inject("POST", "/namespaces/ml/events", 503, count=1)
    server.inject("POST", "/namespaces/serving/events", 403, count=None)
    ev = start(engine, mapper(), api)
    fence(engine, gpu_uuid(0))
    fence(engine, gpu_uuid(1))
    assert wait_for(lambda: ev.posted == 2)  # the 503 one retried after a second
    assert wait_for(lambda: faults.errors(POD_EVENT) == 2)
    assert {e["involvedObject"]["name"] for e in pod_events(server)} == {"train-0", "train-1"}
    forbidden = [r for r in server.requests if r.path == "/api/v1/namespaces/serving/events"]
    assert len(forbidden) == 1


def test_a_server_that_stops_answering_never_delays_a_fence(
    engine: HealthEngine, mapper: Callable[..., PodMapper], make_api: ApiFactory, start: Start
) -> None:
    server, api = make_api()
    start(engine, mapper(), api)
    server.replying.clear()  # requests arrive and are never answered
    for i in range(2):
        fence(engine, gpu_uuid(i))  # each returns while the Event posts hang
    assert engine.verdict(gpu_uuid(1)).state.name == "UNHEALTHY"
    assert wait_for(lambda: any(r.method == "POST" and r.path.endswith("/events") for r in server.requests))
    server.replying.set()


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] = 100.0  # never more than the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
