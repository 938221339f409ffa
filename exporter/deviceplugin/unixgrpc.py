"""A gRPC server on a unix socket file it created and knows as its own, as kubelet plugins need.

The kubelet deletes every socket in its plugin directory when it restarts, and a listener cannot
move to a new file: the owner asks `socket_ok()` and, once it is False, stops this generation and
starts a new one. The file is known by device and inode, so a file someone else created at the
path since (a new generation, another plugin) is never removed by an old generation's stop.
Used by our device plugin's servers, the proxy's relay servers and its Registration server.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc


def remove_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class UnixSocketServer:
    """One server generation on `path`; `add_services(server)` adds the servicers before it starts."""

    def __init__(
        self,
        path: str,
        add_services: Callable[[Any], None],
        *,
        workers: int,
        thread_prefix: str,
        max_message: int | None = None,
    ) -> None:
        self.path = path
        self._add_services = add_services
        self._workers = workers
        self._thread_prefix = thread_prefix
        self._options = [("grpc.max_receive_message_length", max_message)] if max_message else []
        self._server: Any = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._inode: tuple[int, int] | None = None

    def start(self) -> None:
        """Serve on a new file at `path` (a leftover there goes first). Raises OSError when it cannot."""
        remove_socket(self.path)
        # Kept so stop() can shut it down: grpc's server.stop() leaves the executor's threads alive, and
        # every kubelet restart creates a new generation.
        self._executor = futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self._thread_prefix)
        server = grpc.server(self._executor, options=self._options)
        self._add_services(server)
        try:
            bound = server.add_insecure_port(f"unix://{self.path}")
        except RuntimeError:  # recent grpcio raises instead of returning 0
            bound = 0
        if not bound:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise OSError(f"cannot listen on {self.path}")
        server.start()
        self._server = server
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    def socket_ok(self) -> bool:
        """True while serving and the file at `path` is still this generation's listener."""
        return self._server is not None and self._file_is_ours()

    def _file_is_ours(self) -> bool:
        if self._inode is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._inode

    def stop(self, grace: float | None = None) -> None:
        """Stop serving (open calls get `grace` seconds) and remove the file if it is still ours."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=grace).wait(5)
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if self._file_is_ours():  # after a kubelet restart it is already gone, or someone else's
            remove_socket(self.path)
        self._inode = None
