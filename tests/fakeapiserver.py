"""A small threaded fake Kubernetes API server, driven through the real `kubernetes` client.

Endpoints:
  GET   /api/v1/pods                                    list / watch (fieldSelector spec.nodeName=X)
  GET   /apis/resource.k8s.io/<v>/resourceslices        list / watch (fieldSelector spec.nodeName=X)
  GET   /api/v1/nodes/<name>                            the node object (status merged from PATCHes)
  PATCH /api/v1/nodes/<name>/status                     recorded; merge-patched into the node
  POST  /api/v1/namespaces/<ns>/events                  recorded; echoed back with 201
Every request is recorded in `requests` (method, path, query, JSON body).

    with FakeApiServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_dir / "kubeconfig")
        api.upsert_pod({"metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
                        "spec": {"nodeName": "node1"}})
"""

from __future__ import annotations

import copy
import json
import queue
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PODS = "pods"
SLICES = "resourceslices"


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    body: Any


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what strategic merge does for the fields tests use)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _merge_patch(result.get(k), v)
    return result


class FakeApiServer:
    def __init__(self, resource_versions: tuple[str, ...] = ("v1",)) -> None:
        # Which resource.k8s.io versions are served (others answer 404, like an older cluster).
        self.resource_versions = resource_versions
        self._lock = threading.Lock()
        self._rv = 1
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {PODS: {}, SLICES: {}}
        self._watchers: list[tuple[str, str | None, queue.Queue[dict[str, Any] | None]]] = []
        # (resourceVersion, kind, event): watches replay what happened after the version they ask for.
        self._history: list[tuple[int, str, dict[str, Any]]] = []
        self.nodes: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.requests: list[RecordedRequest] = []
        self.fail_lists = 0  # answer this many list calls with 500 (to test retry paths)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FakeApiServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-apiserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            for _, _, q in self._watchers:
                q.put(None)
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: str | Path) -> str:
        """A kubeconfig (JSON is valid YAML) pointing at this server."""
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        Path(path).write_text(json.dumps(cfg))
        return str(path)

    # ------------------------------------------------------------------ object store

    def upsert_pod(self, pod: dict[str, Any]) -> None:
        self._upsert(PODS, pod)

    def delete_pod(self, namespace: str, name: str) -> None:
        self._delete(PODS, (namespace, name))

    def upsert_resource_slice(self, obj: dict[str, Any]) -> None:
        self._upsert(SLICES, obj)

    def delete_resource_slice(self, name: str) -> None:
        self._delete(SLICES, ("", name))

    def watcher_count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for k, _, _ in self._watchers if k == kind)

    def wait_for_watchers(self, kind: str, n: int = 1, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.watcher_count(kind) >= n:
                return True
            time.sleep(0.01)
        return False

    def _upsert(self, kind: str, obj: dict[str, Any]) -> None:
        obj = copy.deepcopy(obj)
        md = obj.setdefault("metadata", {})
        key = (md.get("namespace", ""), md["name"])
        with self._lock:
            self._rv += 1
            md["resourceVersion"] = str(self._rv)
            event = "MODIFIED" if key in self._objects[kind] else "ADDED"
            self._objects[kind][key] = obj
            self._notify(kind, event, obj)

    def _delete(self, kind: str, key: tuple[str, str]) -> None:
        with self._lock:
            obj = self._objects[kind].pop(key, None)
            if obj is None:
                return
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._notify(kind, "DELETED", obj)

    def _notify(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        self._history.append((self._rv, kind, {"type": event, "object": obj}))
        for k, node, q in self._watchers:
            if k == kind and _matches(obj, node):
                q.put({"type": event, "object": obj})

    # ------------------------------------------------------------------ HTTP

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

            def do_GET(self) -> None:
                server._handle(self, "GET")

            def do_PATCH(self) -> None:
                server._handle(self, "PATCH")

            def do_POST(self) -> None:
                server._handle(self, "POST")

        return Handler

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append(RecordedRequest(method, parsed.path, query, body))
        parts = [p for p in parsed.path.split("/") if p]
        node = _node_from_selector(query.get("fieldSelector", ""))
        if method == "GET" and parts == ["api", "v1", "pods"]:
            self._list_or_watch(h, PODS, "PodList", "v1", query, node)
        elif method == "GET" and len(parts) == 4 and parts[:2] == ["apis", "resource.k8s.io"] and parts[3] == SLICES:
            if parts[2] not in self.resource_versions:
                self._send(h, 404, _status(404, "NotFound", "the server could not find the requested resource"))
            else:
                self._list_or_watch(h, SLICES, "ResourceSliceList", f"resource.k8s.io/{parts[2]}", query, node)
        elif method == "GET" and len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"]:
            with self._lock:
                obj = self.nodes.get(parts[3])
            if obj is None:
                self._send(h, 404, _status(404, "NotFound", f'nodes "{parts[3]}" not found'))
            else:
                self._send(h, 200, obj)
        elif method == "PATCH" and len(parts) == 5 and parts[:3] == ["api", "v1", "nodes"] and parts[4] == "status":
            with self._lock:
                base = self.nodes.get(parts[3]) or {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": parts[3]},
                }
                self.nodes[parts[3]] = _merge_patch(base, body or {})
                obj = self.nodes[parts[3]]
            self._send(h, 200, obj)
        elif method == "POST" and len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "events":
            obj = dict(body or {})
            with self._lock:
                self.events.append(obj)
            self._send(h, 201, obj)
        else:
            self._send(h, 404, _status(404, "NotFound", f"{method} {parsed.path} not served by the fake"))

    def _list_or_watch(
        self, h: BaseHTTPRequestHandler, kind: str, list_kind: str, api_version: str, query: dict[str, str],
        node: str | None,
    ) -> None:  # fmt: skip
        if query.get("watch") in ("true", "1"):
            self._watch(h, kind, query, node)
            return
        with self._lock:
            if self.fail_lists > 0:
                self.fail_lists -= 1
                fail = True
            else:
                fail = False
                items = [o for o in self._objects[kind].values() if _matches(o, node)]
                rv = str(self._rv)
        if fail:
            self._send(h, 500, _status(500, "InternalError", "injected failure"))
            return
        self._send(h, 200, {"apiVersion": api_version, "kind": list_kind, "metadata": {"resourceVersion": rv},
                            "items": items})  # fmt: skip

    def _watch(self, h: BaseHTTPRequestHandler, kind: str, query: dict[str, str], node: str | None) -> None:
        q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        entry = (kind, node, q)
        since = int(query.get("resourceVersion") or 0)
        with self._lock:
            for rv, k, past in self._history:
                if rv > since and k == kind and _matches(past["object"], node):
                    q.put(past)
            self._watchers.append(entry)
        timeout = float(query.get("timeoutSeconds", "300"))
        deadline = time.monotonic() + timeout
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    event = q.get(timeout=min(left, 0.5))
                except queue.Empty:
                    continue
                if event is None:
                    break
                data = json.dumps(event).encode() + b"\n"
                h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self._lock:
                self._watchers.remove(entry)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}  # fmt: skip


def _node_from_selector(selector: str) -> str | None:
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if key.strip() == "spec.nodeName":
            return value.lstrip("=").strip()
    return None


def _matches(obj: dict[str, Any], node: str | None) -> bool:
    return node is None or (obj.get("spec") or {}).get("nodeName") == node
