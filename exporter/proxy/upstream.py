"""The proxy's client of one upstream registration: the plugin's socket in the upstream directory, its
ListAndWatch stream read in a thread, and its unary RPCs called with the bytes the kubelet sent.

Each Register from the upstream makes a new `Upstream`; the one it replaces is closed. A stream that
ends is dialled again with a short backoff (a plugin whose gRPC server restarted without registering
again is still heard); the usual way back is the plugin's next Register.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import grpc
import structlog

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb

log = structlog.get_logger(__name__)

SERVICE = "/v1beta1.DevicePlugin/"
UNARY_RPCS = ("Allocate", "GetPreferredAllocation", "PreStartContainer", "GetDevicePluginOptions")
_MAX_MESSAGE = 16 * 1024 * 1024
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 2.0


class UpstreamUnavailable(Exception):
    """The upstream plugin's registration is gone (replaced or closed) while a call was on its way."""


class Upstream:
    def __init__(
        self,
        upstream_dir: str,
        request: pb.RegisterRequest,
        on_list: Callable[[Upstream, list[pb.Device]], None],
        on_down: Callable[[Upstream], None],
    ) -> None:
        self.resource = request.resource_name
        self.endpoint = request.endpoint
        self.options = request.options  # what it registered with: the kubelet registration repeats them
        self.path = os.path.join(upstream_dir, request.endpoint)
        self._on_list = on_list
        self._on_down = on_down
        self._channel = grpc.insecure_channel(
            f"unix://{self.path}",
            options=[("grpc.default_authority", "localhost"), ("grpc.max_receive_message_length", _MAX_MESSAGE)],
        )
        self._list_and_watch = self._channel.unary_stream(
            SERVICE + "ListAndWatch",
            request_serializer=pb.Empty.SerializeToString,
            response_deserializer=pb.ListAndWatchResponse.FromString,
        )
        # No (de)serialisers: the kubelet's request bytes go up, the upstream's response bytes come back.
        self._unary = {rpc: self._channel.unary_unary(SERVICE + rpc) for rpc in UNARY_RPCS}
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._stream: Any = None
        self.streaming = False
        self.lists = 0
        self._thread = threading.Thread(target=self._read, name=f"proxy-up-{self.resource}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """End the stream and the channel; calls on their way fail with UNAVAILABLE/CANCELLED."""
        self._closed.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()
        self._channel.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def call(
        self, rpc: str, request: bytes, timeout: float | None, on_cancel: Callable[[Callable[[], Any]], Any]
    ) -> bytes:
        """Call `rpc` with the kubelet's request bytes and deadline; its response bytes, unchanged.

        `on_cancel(cancel)` ties the upstream call to the kubelet's: the kubelet giving up cancels it.
        Raises grpc.RpcError with the upstream's status, or UpstreamUnavailable."""
        if self._closed.is_set():
            raise UpstreamUnavailable(f"{self.resource}: the upstream plugin's registration was replaced")
        try:
            future = self._unary[rpc].future(request, timeout=timeout)
        except ValueError as exc:  # the channel was closed under us
            raise UpstreamUnavailable(f"{self.resource}: {exc}") from None
        on_cancel(future.cancel)
        result: bytes = future.result()
        return result

    def _read(self) -> None:
        backoff = _BACKOFF_FIRST_S
        while not self._closed.is_set():
            try:
                stream = self._list_and_watch(pb.Empty(), wait_for_ready=False)
                with self._lock:
                    self._stream = stream
                for message in stream:
                    if self._closed.is_set():
                        break
                    if not self.streaming:
                        self.streaming = True
                        log.info("upstream ListAndWatch streaming", resource=self.resource, endpoint=self.endpoint)
                    self.lists += 1
                    backoff = _BACKOFF_FIRST_S
                    self._on_list(self, list(message.devices))
                reason = "the upstream ended its ListAndWatch stream"
            except grpc.RpcError as exc:
                reason = f"{exc.code()}: {exc.details()}"
            except ValueError as exc:  # the channel was closed by close()
                reason = str(exc)
            with self._lock:
                self._stream = None
            if self._closed.is_set():
                break
            if self.streaming:
                self.streaming = False
                log.warning("upstream ListAndWatch down", resource=self.resource, endpoint=self.endpoint, reason=reason)
            self._on_down(self)
            if self._closed.wait(backoff):
                break
            backoff = min(backoff * 2, _BACKOFF_MAX_S)
        self.streaming = False
