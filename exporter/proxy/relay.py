"""The kubelet-facing DevicePlugin service for one resource: what the kubelet dials back.

ListAndWatch streams the `ForwardedList`. Allocate, PreStartContainer and GetDevicePluginOptions go to
the upstream as the kubelet's request bytes, with the kubelet's deadline, and its response bytes (or
its error status) come back unchanged: the service is registered with a generic handler without
(de)serialisers, so nothing is re-encoded. GetPreferredAllocation is decoded only to take fenced
devices out of the candidates; the upstream's answer comes back unchanged. The proxy never answers in
the upstream's stead, with one exception: GetDevicePluginOptions while the upstream is unreachable
answers with the options the upstream registered with (the kubelet asks inside our Register, which a
restarting upstream must not fail).

A sync grpc.server, as exporter/deviceplugin/server.py explains: one long-lived stream per resource.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.deviceplugin.unixgrpc import UnixSocketServer
from exporter.proxy.forwarded import ForwardedList
from exporter.proxy.upstream import UNARY_RPCS, Upstream, UpstreamUnavailable

log = structlog.get_logger(__name__)

FORWARDED_RPCS = UNARY_RPCS
_WORKERS = 8
_MAX_STREAMS = 4  # the kubelet's one, plus slack for a re-registration overlap; the oldest goes first
_MAX_MESSAGE = 16 * 1024 * 1024
_STOP_GRACE_S = 2.0
# grpc reports "no deadline" as a time_remaining() of about 9e18 s; anything past a year is none.
_NO_DEADLINE_S = 365 * 24 * 3600.0


class RelayCounts:
    """forwarded_total{rpc,result}: written by RPC threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {(rpc, r): 0 for rpc in FORWARDED_RPCS for r in ("ok", "error")}

    def add(self, rpc: str, ok: bool) -> None:
        with self._lock:
            self._counts[(rpc, "ok" if ok else "error")] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


class RelayServicer:
    """The five RPCs for one resource; one instance per server generation."""

    def __init__(
        self,
        forwarded: ForwardedList,
        upstream: Callable[[], Upstream | None],
        is_fenced: Callable[[str], bool],
        counts: RelayCounts,
    ) -> None:
        self._forwarded = forwarded
        self._upstream = upstream
        self._is_fenced = is_fenced
        self._counts = counts
        self._lock = threading.Lock()
        self._closed = False
        self._streams: list[threading.Event] = []

    def close(self, timeout: float) -> None:
        """End this generation's streams, waiting up to `timeout` for them to finish."""
        with self._lock:
            self._closed = True
        self._forwarded.wake()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._streams:
                    return
            time.sleep(0.01)

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(rpc: str) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: self._forward(rpc, req, ctx))

        return grpc.method_handlers_generic_handler(
            "v1beta1.DevicePlugin",
            {
                "ListAndWatch": grpc.unary_stream_rpc_method_handler(
                    self._list_and_watch, request_deserializer=pb.Empty.FromString
                ),
                "GetPreferredAllocation": grpc.unary_unary_rpc_method_handler(self._preferred),
                "Allocate": unary("Allocate"),
                "PreStartContainer": unary("PreStartContainer"),
                "GetDevicePluginOptions": grpc.unary_unary_rpc_method_handler(self._options),
            },
        )

    # --- ListAndWatch ---
    def _list_and_watch(self, request: pb.Empty, context: Any) -> Iterator[bytes]:
        ended = threading.Event()
        with self._lock:
            if self._closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{self._forwarded.resource}: proxy shutting down")
            superseded = self._streams[: max(0, len(self._streams) - _MAX_STREAMS + 1)]
            self._streams.append(ended)
        for old in superseded:
            old.set()
        self._forwarded.stream_opened(time.monotonic())
        context.add_callback(self._forwarded.wake)
        log.info("kubelet ListAndWatch opened", resource=self._forwarded.resource)
        try:
            seen = 0
            while True:
                nxt = self._forwarded.wait_newer(
                    seen, lambda: self._closed or ended.is_set() or not context.is_active()
                )
                if nxt is None:
                    return
                seen, message = nxt
                yield message
        finally:
            with self._lock:
                self._streams.remove(ended)
            self._forwarded.stream_closed(time.monotonic())
            log.info("kubelet ListAndWatch closed", resource=self._forwarded.resource)

    # --- forwarded calls ---
    def _forward(self, rpc: str, request: bytes, context: Any) -> bytes:
        upstream = self._upstream()
        if upstream is None:
            self._counts.add(rpc, ok=False)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self._forwarded.resource}: no upstream plugin registered")
        assert upstream is not None
        try:
            response = upstream.call(rpc, request, _deadline(context), context.add_callback)
        except grpc.RpcError as exc:
            self._counts.add(rpc, ok=False)
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            context.abort(code, exc.details() if isinstance(exc, grpc.Call) else str(exc))
        except (UpstreamUnavailable, grpc.FutureCancelledError) as exc:
            self._counts.add(rpc, ok=False)
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc) or f"{self._forwarded.resource}: call cancelled")
        self._counts.add(rpc, ok=True)
        return response

    def _preferred(self, request: bytes, context: Any) -> bytes:
        """Fenced devices leave the candidates; `must_include` is the kubelet's and stays as sent."""
        decoded = pb.PreferredAllocationRequest.FromString(request)
        changed = False
        for req in decoded.container_requests:
            keep = [i for i in req.available_deviceIDs if i in req.must_include_deviceIDs or not self._is_fenced(i)]
            if len(keep) != len(req.available_deviceIDs):
                del req.available_deviceIDs[:]
                req.available_deviceIDs.extend(keep)
                changed = True
        return self._forward("GetPreferredAllocation", decoded.SerializeToString() if changed else request, context)

    def _options(self, request: bytes, context: Any) -> bytes:
        upstream = self._upstream()
        if upstream is None:
            return self._forward("GetDevicePluginOptions", request, context)  # aborts UNAVAILABLE
        try:
            response = upstream.call("GetDevicePluginOptions", request, _deadline(context), context.add_callback)
        except (grpc.RpcError, UpstreamUnavailable, grpc.FutureCancelledError) as exc:
            # The upstream is restarting: answer with the options it registered with. The kubelet asks
            # inside our Register, and failing it would take the resource away until the next retry.
            self._counts.add("GetDevicePluginOptions", ok=False)
            log.info("upstream options unavailable; answering with its registered ones", error=str(exc))
            registered: bytes = upstream.options.SerializeToString()
            return registered
        self._counts.add("GetDevicePluginOptions", ok=True)
        return response


def _deadline(context: Any) -> float | None:
    """The kubelet's time left for this call, for the upstream call; None when it set no deadline
    (as for Allocate and GetPreferredAllocation, which it calls without one)."""
    remaining: float | None = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


class RelayServer:
    """One gRPC server generation on `<real dir>/<endpoint>`; a kubelet restart deletes the file, and
    the proxy then starts a new generation (a unix listener cannot move to a new file)."""

    def __init__(self, path: str, servicer: RelayServicer) -> None:
        self.path = path
        self._servicer = servicer
        self._grpc = UnixSocketServer(
            path,
            lambda server: server.add_generic_rpc_handlers((self._servicer.handler(),)),
            workers=_WORKERS,
            thread_prefix="proxy-relay",
            max_message=_MAX_MESSAGE,
        )

    def start(self) -> None:
        self._grpc.start()

    def socket_ok(self) -> bool:
        return self._grpc.socket_ok()

    def stop(self) -> None:
        # The streams end with an OK status first, as a plugin's own stop ends them.
        self._servicer.close(_STOP_GRACE_S)
        self._grpc.stop(_STOP_GRACE_S)
