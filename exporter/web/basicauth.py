"""Basic auth as exporter-toolkit does it (web/handler.go, web/cache.go): bcrypt hashes, results cached by
(user, hash, password) so a scraper costs one bcrypt per password change, an unknown user checked against a
dummy hash of the same cost so timing does not tell which users exist, one bcrypt at a time.

The bcrypt runs in this module's own thread, never on the event loop: a client guessing passwords slows
only its own requests, not the scrapes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

CACHE_SIZE = 100


def _dummy_hash(cost: int) -> bytes:
    # A well-formed hash no password matches: checking it costs what checking a real one of `cost` does.
    return b"$2b$%02d$" % cost + b"." * 22 + b"A" * 31


def parse_basic(header: str) -> tuple[str, str] | None:
    """(user, password) from an Authorization header, as Go's Request.BasicAuth reads it."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class BasicAuth:
    """Checks credentials against one configuration's users."""

    def __init__(self, users: tuple[tuple[str, str], ...], executor: ThreadPoolExecutor) -> None:
        self._users = dict(users)
        costs = [int(h[4:6]) if h[3] == "$" else int(h[3:5]) for h in self._users.values()]
        self._dummy = _dummy_hash(max(costs, default=10))
        self._cache: dict[bytes, bool] = {}
        self._pending: dict[bytes, list[Callable[[bool], None]]] = {}
        self._lock = threading.Lock()
        self._executor = executor

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def _key(self, user: str, hashed: bytes, password: str) -> bytes:
        # A digest, not the password itself, is what stays in memory.
        return hashlib.sha256(b"\0".join((user.encode(), hashed, password.encode()))).digest()

    def cached(self, credentials: tuple[str, str]) -> bool | None:
        """The known answer for these credentials, or None if bcrypt must run."""
        user, password = credentials
        key = self._key(user, self._hash_of(user), password)
        with self._lock:
            return self._cache.get(key)

    def check(self, credentials: tuple[str, str], done: Callable[[bool], None]) -> None:
        """Run bcrypt in the auth thread; `done(ok)` is called from that thread. Requests with the same
        credentials that arrive while it runs wait for that one run: 50 scrapers connecting at once with
        one password cost one bcrypt, not fifty in a row."""
        user, password = credentials
        key = self._key(user, self._hash_of(user), password)
        with self._lock:
            waiting = self._pending.get(key)
            if waiting is not None:
                waiting.append(done)
                return
            self._pending[key] = [done]
        fut = self._executor.submit(self._check_now, credentials)
        fut.add_done_callback(lambda f: self._finish(key, _result(f)))

    def _finish(self, key: bytes, ok: bool) -> None:
        with self._lock:
            waiting = self._pending.pop(key, [])
        for done in waiting:
            done(ok)

    def _hash_of(self, user: str) -> bytes:
        hashed = self._users.get(user)
        return hashed.encode() if hashed is not None else self._dummy

    def _check_now(self, credentials: tuple[str, str]) -> bool:
        import bcrypt

        user, password = credentials
        hashed = self._hash_of(user)
        try:
            ok = bcrypt.checkpw(password.encode("utf-8", "surrogateescape"), hashed)
        except ValueError:  # the dummy never matches; a malformed hash cannot pass the loader
            ok = False
        ok = ok and user in self._users
        key = self._key(user, hashed, password)
        with self._lock:
            if len(self._cache) >= CACHE_SIZE:
                # Random eviction of a tenth, as exporter-toolkit's cache: cheap and not skewed.
                for victim in random.sample(list(self._cache), max(1, len(self._cache) // 10)):
                    del self._cache[victim]
            self._cache[key] = ok
        return ok


def _result(fut: Future[bool]) -> bool:
    try:
        return fut.result()
    except Exception:  # bcrypt itself failing: refuse, never let the request through
        return False
