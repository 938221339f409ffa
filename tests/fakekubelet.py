"""A fake kubelet PodResources server: real gRPC, same protos, on a unix socket.

Importable (`FakeKubelet`) for tests, or run for e2e runs and benchmarks:

    python tests/fakekubelet.py --socket /tmp/k/kubelet.sock --layout layout.json

Layout JSON (proto field names):
    {"pods": [{"name": "p", "namespace": "ns", "containers": [{"name": "c",
        "devices": [{"resource_name": "nvidia.com/gpu", "device_ids": ["GPU-..."]}],
        "dynamic_resources": [{"claim_name": "x", "claim_namespace": "ns", "claim_resources":
            [{"driver_name": "gpu.nvidia.com", "pool_name": "node1", "device_name": "gpu-0"}]}]}]}],
     "allocatable": [{"resource_name": "nvidia.com/gpu", "device_ids": ["GPU-..."]}],
     "behavior": {"List": "ok"}, "serve_v1": true}
Behaviours per method (List, GetAllocatableResources, Get, v1alpha1.List):
ok | unimplemented | resource_exhausted | unavailable | hang (answers only when released or the
caller's deadline passes). With --layout, SIGHUP reloads the file.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # allow `python tests/fakekubelet.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import grpc
from google.protobuf import json_format

from podresources.api.v1 import podresources_pb2 as v1_pb2
from podresources.api.v1 import podresources_pb2_grpc as v1_grpc
from podresources.api.v1alpha1 import podresources_pb2 as v1alpha1_pb2
from podresources.api.v1alpha1 import podresources_pb2_grpc as v1alpha1_grpc

BEHAVIOURS = ("ok", "unimplemented", "resource_exhausted", "unavailable", "hang")

_ABORTS = {
    "unimplemented": grpc.StatusCode.UNIMPLEMENTED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


def _strip_v1_only(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """v1alpha1 knows only name/namespace/containers{name, devices{resource_name, device_ids}}."""
    out = []
    for p in pods:
        containers = [
            {
                "name": c.get("name", ""),
                "devices": [
                    {"resource_name": d.get("resource_name", ""), "device_ids": list(d.get("device_ids", []))}
                    for d in c.get("devices", [])
                ],
            }
            for c in p.get("containers", [])
        ]
        out.append({"name": p.get("name", ""), "namespace": p.get("namespace", ""), "containers": containers})
    return out


class FakeKubelet:
    """Serves v1 (unless serve_v1=False, like a pre-1.20 kubelet) and v1alpha1 on one socket."""

    def __init__(self, socket_path: str | os.PathLike[str], layout: dict[str, Any] | None = None) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self._lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()
        self._behaviour: dict[str, str] = {}
        self._release = threading.Event()
        self._server: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self.serve_v1 = True
        self._list_v1 = v1_pb2.ListPodResourcesResponse()
        self._list_v1alpha1 = v1alpha1_pb2.ListPodResourcesResponse()
        self._alloc = v1_pb2.AllocatableResourcesResponse()
        self._pods: dict[tuple[str, str], Any] = {}
        self.set_layout(layout or {})

    # ------------------------------------------------------------------ control

    def set_layout(self, layout: dict[str, Any]) -> None:
        """Replace pods, allocatable, behaviours (and serve_v1, applied on the next start)."""
        self.set_pods(layout.get("pods", []))
        self.set_allocatable(layout.get("allocatable", []))
        for method, behaviour in (layout.get("behavior") or {}).items():
            self.set_behaviour(method, behaviour)
        self.serve_v1 = bool(layout.get("serve_v1", True))

    def set_pods(self, pods: list[dict[str, Any]]) -> None:
        v1 = json_format.ParseDict({"pod_resources": pods}, v1_pb2.ListPodResourcesResponse())
        alpha = json_format.ParseDict({"pod_resources": _strip_v1_only(pods)}, v1alpha1_pb2.ListPodResourcesResponse())
        with self._lock:
            self._list_v1, self._list_v1alpha1 = v1, alpha
            self._pods = {(p.namespace, p.name): p for p in v1.pod_resources}

    def set_allocatable(self, devices: list[dict[str, Any]]) -> None:
        alloc = json_format.ParseDict({"devices": devices}, v1_pb2.AllocatableResourcesResponse())
        with self._lock:
            self._alloc = alloc

    def set_behaviour(self, method: str, behaviour: str) -> None:
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        with self._lock:
            self._behaviour[method] = behaviour
        if behaviour != "hang":
            self._release.set()
        else:
            self._release.clear()

    def release_hangs(self) -> None:
        self._release.set()

    def start(self) -> FakeKubelet:
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        self._executor = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="fake-kubelet")
        server = grpc.server(self._executor)
        if self.serve_v1:
            v1_grpc.add_PodResourcesListerServicer_to_server(_V1(self), server)
        v1alpha1_grpc.add_PodResourcesListerServicer_to_server(_V1alpha1(self), server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self, remove_socket: bool = True) -> None:
        self._release.set()
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        if self._executor is not None:
            # Idle worker threads would otherwise be joined only at interpreter exit.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if remove_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def restart(self) -> None:
        """What a kubelet restart looks like to clients: the socket is deleted and recreated."""
        self.stop(remove_socket=True)
        self.start()

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving

    def _answer(self, method: str, context: grpc.ServicerContext) -> None:
        """Count the call and apply the configured behaviour (abort or hang) before answering."""
        with self._lock:
            self.calls[method] += 1
            behaviour = self._behaviour.get(method, "ok")
        if behaviour == "hang":
            while context.is_active() and not self._release.wait(0.02):
                pass
            if not context.is_active():
                context.abort(grpc.StatusCode.CANCELLED, "caller gave up")
        elif behaviour in _ABORTS:
            context.abort(_ABORTS[behaviour], f"fake kubelet: {behaviour}")

    def list_v1(self, context: grpc.ServicerContext) -> Any:
        self._answer("List", context)
        with self._lock:
            return self._list_v1

    def list_v1alpha1(self, context: grpc.ServicerContext) -> Any:
        self._answer("v1alpha1.List", context)
        with self._lock:
            return self._list_v1alpha1

    def allocatable(self, context: grpc.ServicerContext) -> Any:
        self._answer("GetAllocatableResources", context)
        with self._lock:
            return self._alloc

    def get(self, namespace: str, name: str, context: grpc.ServicerContext) -> Any:
        self._answer("Get", context)
        with self._lock:
            pod = self._pods.get((namespace, name))
        if pod is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"pod {namespace}/{name} not found")
        return v1_pb2.GetPodResourcesResponse(pod_resources=pod)


class _V1(v1_grpc.PodResourcesListerServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeKubelet) -> None:
        self.fake = fake

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.fake.list_v1(context)

    def GetAllocatableResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.fake.allocatable(context)

    def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.fake.get(request.pod_namespace, request.pod_name, context)


class _V1alpha1(v1alpha1_grpc.PodResourcesListerServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeKubelet) -> None:
        self.fake = fake

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self.fake.list_v1alpha1(context)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fake kubelet PodResources server")
    parser.add_argument("--socket", required=True, help="unix socket path to serve on")
    parser.add_argument("--layout", help="layout JSON file (see module docstring); SIGHUP reloads it")
    args = parser.parse_args(argv)

    def load() -> dict[str, Any]:
        if not args.layout:
            return {}
        with open(args.layout) as f:
            data: dict[str, Any] = json.load(f)
            return data

    fake = FakeKubelet(args.socket, load()).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGHUP, lambda *_: fake.set_layout(load()))
    print(f"fake kubelet serving on {fake.socket_path}", flush=True)
    done.wait()
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
