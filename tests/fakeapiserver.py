"""A small threaded fake Kubernetes API server, driven through the real `kubernetes` client.

Endpoints:
  GET   /api/v1/pods                                    list / watch (fieldSelector spec.nodeName=X)
  GET   /apis/resource.k8s.io/<v>/resourceslices        list / watch (fieldSelector spec.nodeName=X)
  GET   /api/v1/nodes/<name>                            the node object (status merged from PATCHes)
  PATCH /api/v1/nodes/<name>/status                     recorded; merge-patched into the node
  PATCH /api/v1/nodes/<name>                            merge patch; metadata.resourceVersion, if given, must
                                                        match (409 otherwise), as the real server checks it
  PUT   /api/v1/nodes/<name>                            replace, resourceVersion checked (409 on a mismatch)
  POST  /api/v1/namespaces/<ns>/events                  recorded; echoed back with 201
  GET   /apis, /apis/resource.k8s.io, /apis/resource.k8s.io/<v>   discovery: the group, its versions and
                                                        each version's resources (resourceslices where
                                                        `resource_versions` has it, devicetaintrules where
                                                        `dra_taint_versions` has it)
  /apis/resource.k8s.io/<v>/devicetaintrules[/<name>]   list (labelSelector k=v[,k=v]) / watch, POST, GET,
                                                        PUT (resourceVersion checked), DELETE; validated
                                                        like the real registry for what we write (422)
Every request is recorded in `requests` (method, path, query, JSON body). Faults: `fail_lists` (500 on
lists), `inject(method, path_part, code, count)` (any status for matching requests), `delay_s` (every
reply that late), `node_write_hook` (runs before a Node write is applied: a concurrent writer).

    with FakeApiServer() as api:
        kubeconfig = api.write_kubeconfig(tmp_dir / "kubeconfig")
        api.upsert_pod({"metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
                        "spec": {"nodeName": "node1"}})
"""

from __future__ import annotations

import copy
import json
import queue
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PODS = "pods"
SLICES = "resourceslices"
RULES = "devicetaintrules"
RESOURCE_GROUP = "resource.k8s.io"
# Effects the registry accepts in each version (None is valid only from 1.35; a 1.33/1.34 v1alpha3
# server rejects it: pass none_effect=False to play one).
_TAINT_EFFECTS = ("NoSchedule", "NoExecute", "None")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


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
    def __init__(
        self,
        resource_versions: tuple[str, ...] = ("v1",),
        dra_taint_versions: tuple[str, ...] = (),
        *,
        none_effect: bool = True,
    ) -> None:
        # Which resource.k8s.io versions are served (others answer 404, like an older cluster).
        self.resource_versions = resource_versions
        # Which of them serve DeviceTaintRule (none by default: the rule API is behind feature gates).
        self.dra_taint_versions = dra_taint_versions
        self.none_effect = none_effect
        self._lock = threading.Lock()
        self._rv = 1
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {PODS: {}, SLICES: {}, RULES: {}}
        self._faults: list[list[Any]] = []  # [method, path part, code, count left (None: forever)]
        self.delay_s = 0.0
        # Cleared: every request is recorded, then its reply waits until it is set again (a server that
        # has stopped answering, without a clock in the test).
        self.replying = threading.Event()
        self.replying.set()
        self.node_write_hook: Callable[[str], None] | None = None
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

    def rules(self) -> dict[str, dict[str, Any]]:
        """The DeviceTaintRules stored, by name."""
        with self._lock:
            return {name: copy.deepcopy(o) for (_, name), o in self._objects[RULES].items()}

    def upsert_rule(self, obj: dict[str, Any]) -> None:
        """A rule written by someone else (another node's exporter, an admin)."""
        self._upsert(RULES, obj)

    def set_node(self, node: dict[str, Any]) -> None:
        """Store a Node (a new resourceVersion, as any write gets)."""
        node = copy.deepcopy(node)
        with self._lock:
            self._rv += 1
            node.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
            self.nodes[node["metadata"]["name"]] = node

    def node_taints(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(((self.nodes.get(name) or {}).get("spec") or {}).get("taints") or [])

    def inject(self, method: str, path_part: str, code: int, count: int | None = 1) -> None:
        """Answer the next `count` (None: every) `method` requests whose path contains `path_part` with `code`."""
        with self._lock:
            self._faults.append([method, path_part, code, count])

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _injected(self, method: str, path: str) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault[0] == method and fault[1] in path:
                    if fault[3] is not None:
                        fault[3] -= 1
                        if fault[3] <= 0:
                            self._faults.remove(fault)
                    return int(fault[2])
        return None

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

    # ------------------------------------------------------------------ DeviceTaintRules

    def _validate_rule(self, obj: Any, version: str) -> str | None:
        """What the real registry would refuse in a rule we write, or None."""
        if not isinstance(obj, dict):
            return "body is not an object"
        md = obj.get("metadata") or {}
        name = str(md.get("name", ""))
        if not name or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            return f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain"
        for k, v in (md.get("labels") or {}).items():
            if not isinstance(v, str) or len(v) > 63 or not _LABEL_VALUE.match(v):
                return f"metadata.labels: Invalid value: {v!r} for {k}: must be a valid label value"
        spec = obj.get("spec") or {}
        sel = spec.get("deviceSelector") or {}
        allowed = {"driver", "pool", "device"}
        if set(sel) - allowed:
            return f"spec.deviceSelector: unknown fields {sorted(set(sel) - allowed)} in {version}"
        taint = spec.get("taint") or {}
        effects = _TAINT_EFFECTS if self.none_effect else _TAINT_EFFECTS[:2]
        if taint.get("effect") not in effects:
            return f"spec.taint.effect: Unsupported value: {taint.get('effect')!r}: supported values: {effects}"
        if not taint.get("key"):
            return "spec.taint.key: Required value"
        value = taint.get("value", "")
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            return f"spec.taint.value: Invalid value: {value!r}"
        return None

    def _rules(self, h: BaseHTTPRequestHandler, method: str, version: str, name: str | None,
               query: dict[str, str], body: Any) -> None:  # fmt: skip
        api_version = f"{RESOURCE_GROUP}/{version}"
        if name is None and method == "GET":
            if query.get("watch") in ("true", "1"):
                self._watch(h, RULES, query, None)
                return
            wanted = _label_selector(query.get("labelSelector", ""))
            with self._lock:
                items = [dict(o, apiVersion=api_version) for o in self._objects[RULES].values()
                         if _labels_match(o, wanted)]  # fmt: skip
                rv = str(self._rv)
            self._send(h, 200, {"apiVersion": api_version, "kind": "DeviceTaintRuleList",
                                "metadata": {"resourceVersion": rv}, "items": items})  # fmt: skip
            return
        if name is None and method == "POST":
            problem = self._validate_rule(body, version)
            if problem:
                self._send(h, 422, _status(422, "Invalid", f"DeviceTaintRule is invalid: {problem}"))
                return
            obj = copy.deepcopy(body)
            key = ("", obj["metadata"]["name"])
            with self._lock:
                if key in self._objects[RULES]:
                    exists = True
                else:
                    exists = False
                    self._stamp_rule(obj, api_version, None)
                    self._objects[RULES][key] = obj
                    self._notify(RULES, "ADDED", obj)
            if exists:
                message = f'devicetaintrules.resource.k8s.io "{key[1]}" already exists'
                self._send(h, 409, _status(409, "AlreadyExists", message))
            else:
                self._send(h, 201, obj)
            return
        key = ("", name or "")
        with self._lock:
            current = copy.deepcopy(self._objects[RULES].get(key))
        if current is None:
            self._send(h, 404, _status(404, "NotFound", f'devicetaintrules.resource.k8s.io "{name}" not found'))
        elif method == "GET":
            self._send(h, 200, dict(current, apiVersion=api_version))
        elif method == "PUT":
            problem = self._validate_rule(body, version)
            if problem:
                self._send(h, 422, _status(422, "Invalid", f"DeviceTaintRule is invalid: {problem}"))
                return
            obj = copy.deepcopy(body)
            with self._lock:
                stored = self._objects[RULES].get(key)
                if stored is None or obj["metadata"].get("resourceVersion") != stored["metadata"]["resourceVersion"]:
                    conflict = True
                else:
                    conflict = False
                    self._stamp_rule(obj, api_version, stored)
                    self._objects[RULES][key] = obj
                    self._notify(RULES, "MODIFIED", obj)
            if conflict:
                message = (
                    f'Operation cannot be fulfilled on devicetaintrules.resource.k8s.io "{name}": '
                    "the object has been modified; please apply your changes to the latest version and try again"
                )
                self._send(h, 409, _status(409, "Conflict", message))
            else:
                self._send(h, 200, obj)
        elif method == "DELETE":
            self._delete(RULES, key)
            self._send(h, 200, _status(200, "", "deleted") | {"status": "Success"})
        else:
            self._send(h, 405, _status(405, "MethodNotAllowed", f"{method} not allowed"))

    def _stamp_rule(self, obj: dict[str, Any], api_version: str, stored: dict[str, Any] | None) -> None:
        """Server-set fields: resourceVersion, uid, generation, taint.timeAdded. Holds the lock."""
        self._rv += 1
        md = obj["metadata"]
        md["resourceVersion"] = str(self._rv)
        md["uid"] = (stored or {}).get("metadata", {}).get("uid") or f"uid-{self._rv}"
        md["generation"] = int((stored or {}).get("metadata", {}).get("generation", 0)) + 1
        obj["apiVersion"] = api_version
        obj["kind"] = "DeviceTaintRule"
        taint = obj["spec"]["taint"]
        old = ((stored or {}).get("spec") or {}).get("taint") or {}
        if not taint.get("timeAdded") or (old and old.get("effect") != taint.get("effect")):
            taint["timeAdded"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    # ------------------------------------------------------------------ discovery

    def _discovery(self, h: BaseHTTPRequestHandler, parts: list[str]) -> None:
        versions = sorted(set(self.resource_versions) | set(self.dra_taint_versions), key=_version_order)
        group = {
            "name": RESOURCE_GROUP,
            "versions": [{"groupVersion": f"{RESOURCE_GROUP}/{v}", "version": v} for v in versions],
            "preferredVersion": {"groupVersion": f"{RESOURCE_GROUP}/{versions[0]}", "version": versions[0]}
            if versions
            else None,
        }
        if parts == ["apis"]:
            groups = [group] if versions else []
            self._send(h, 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        elif len(parts) == 2 and versions:
            self._send(h, 200, dict(group, kind="APIGroup", apiVersion="v1"))
        elif len(parts) == 3 and parts[2] in versions:
            resources = []
            if parts[2] in self.resource_versions:
                resources.append(_api_resource(SLICES, "ResourceSlice", ["list", "watch", "get"]))
            if parts[2] in self.dra_taint_versions:
                verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
                resources.append(_api_resource(RULES, "DeviceTaintRule", verbs))
            self._send(h, 200, {"kind": "APIResourceList", "apiVersion": "v1",
                                "groupVersion": f"{RESOURCE_GROUP}/{parts[2]}", "resources": resources})  # fmt: skip
        else:
            self._send(h, 404, _status(404, "NotFound", "the server could not find the requested resource"))

    # ------------------------------------------------------------------ Nodes

    def _write_node(self, h: BaseHTTPRequestHandler, method: str, name: str, body: Any) -> None:
        if self.node_write_hook is not None:
            self.node_write_hook(name)
        with self._lock:
            current = self.nodes.get(name)
            if current is None:
                code, obj = 404, _status(404, "NotFound", f'nodes "{name}" not found')
            else:
                want_rv = ((body or {}).get("metadata") or {}).get("resourceVersion")
                if want_rv is not None and want_rv != current["metadata"].get("resourceVersion"):
                    message = (
                        f'Operation cannot be fulfilled on nodes "{name}": the object has been modified; '
                        "please apply your changes to the latest version and try again"
                    )
                    code, obj = 409, _status(409, "Conflict", message)
                elif method == "PUT" and want_rv is None:
                    code, obj = (
                        422,
                        _status(422, "Invalid", "metadata.resourceVersion: must be specified for an update"),
                    )
                else:
                    new = copy.deepcopy(body) if method == "PUT" else _merge_patch(current, body or {})
                    self._rv += 1
                    new.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
                    new["metadata"]["name"] = name
                    self.nodes[name] = new
                    code, obj = 200, copy.deepcopy(new)
        self._send(h, code, obj)

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

            def do_PUT(self) -> None:
                server._handle(self, "PUT")

            def do_DELETE(self) -> None:
                server._handle(self, "DELETE")

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
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow server: every reply this late
        self.replying.wait()
        injected = self._injected(method, parsed.path)
        if injected is not None:
            self._send(h, injected, _status(injected, "Injected", f"injected {injected} for {method} {parsed.path}"))
            return
        is_rules = len(parts) in (4, 5) and parts[:2] == ["apis", RESOURCE_GROUP] and parts[3] == RULES
        if method == "GET" and (parts == ["apis"] or parts[:2] == ["apis", RESOURCE_GROUP]) and len(parts) <= 3:
            self._discovery(h, parts)
        elif is_rules:
            if parts[2] not in self.dra_taint_versions:
                self._send(h, 404, _status(404, "NotFound", "the server could not find the requested resource"))
            else:
                self._rules(h, method, parts[2], parts[4] if len(parts) == 5 else None, query, body)
        elif method in ("PATCH", "PUT") and len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"]:
            self._write_node(h, method, parts[3], body)
        elif method == "GET" and parts == ["api", "v1", "pods"]:
            self._list_or_watch(h, PODS, "PodList", "v1", query, node)
        elif method == "GET" and len(parts) == 4 and parts[:2] == ["apis", "resource.k8s.io"] and parts[3] == SLICES:
            if parts[2] not in self.resource_versions:
                self._send(h, 404, _status(404, "NotFound", "the server could not find the requested resource"))
            else:
                self._list_or_watch(h, SLICES, "ResourceSliceList", f"resource.k8s.io/{parts[2]}", query, node)
        elif method == "GET" and len(parts) == 4 and parts[:3] == ["api", "v1", "nodes"]:
            with self._lock:
                obj = copy.deepcopy(self.nodes.get(parts[3]))
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
                self._rv += 1
                self.nodes[parts[3]] = _merge_patch(base, body or {})
                self.nodes[parts[3]]["metadata"]["resourceVersion"] = str(self._rv)
                obj = copy.deepcopy(self.nodes[parts[3]])
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


def _api_resource(plural: str, kind: str, verbs: list[str]) -> dict[str, Any]:
    return {"name": plural, "singularName": kind.lower(), "namespaced": False, "kind": kind, "verbs": verbs}


def _version_order(version: str) -> tuple[int, int, int]:
    """Kubernetes' priority: GA before beta before alpha, higher numbers first."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if m is None:
        return (3, 0, 0)
    stage = {None: 0, "beta": 1, "alpha": 2}[m.group(2)]
    return (stage, -int(m.group(1)), -int(m.group(3) or 0))


def _label_selector(selector: str) -> dict[str, str]:
    """Equality terms only (k=v, k==v), which is all we send."""
    out: dict[str, str] = {}
    for term in selector.split(","):
        if term.strip():
            key, _, value = term.partition("=")
            out[key.strip()] = value.lstrip("=").strip()
    return out


def _labels_match(obj: dict[str, Any], wanted: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


def nvidia_resource_slice(node: str, devices: list[tuple[str, str]], name: str | None = None) -> dict[str, Any]:
    """A ResourceSlice as NVIDIA's DRA driver (gpu.nvidia.com) publishes it for `node`: pool = node name,
    one device per (device name, uuid), e.g. ("gpu-0", "GPU-...") or ("gpu-0-mig-1g10gb-19-0", "MIG-...")."""
    published = [
        {"name": dev, "attributes": {"type": {"string": "mig" if uuid.startswith("MIG-") else "gpu"},
                                     "uuid": {"string": uuid}}}
        for dev, uuid in devices
    ]  # fmt: skip
    spec = {
        "driver": "gpu.nvidia.com",
        "nodeName": node,
        "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
    }
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name or f"{node}-gpu.nvidia.com"},
        "spec": {**spec, "devices": published},
    }
