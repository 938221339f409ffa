"""Writing the health state file: atomic, durable, retried; the state directory it lives in.

Write protocol: temp file in the same directory, fsync it, rename over state.json, fsync the
directory. A reader therefore sees either the old or the new file, never a torn one. A file we
cannot parse is moved aside (never deleted: it may hold the only record of a fence) and we start
empty rather than crash-looping on it. A newer version's file is left exactly as it is and start-up
stops with StateError (exporter/health/state.py: the document and its versions).

The state dir is the daemon's alone: it must be owned by our euid (else start-up stops) and is kept
at mode 0700. Temp files get unpredictable names and are created with O_EXCL|O_NOFOLLOW relative
to the directory's fd, so a planted symlink is never followed, and never written through.

A write that fails (disk full, out of file descriptors, something in the way) leaves the newest
state in memory only; the writer thread retries it with backoff until it is on disk, and
StateStore.problem() says so meanwhile (for /ready and the write-failures counter).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from exporter.boundedread import read_regular_file
from exporter.health.state import (
    MAX_STATE_BYTES,
    SCHEMA_VERSION,
    STATE_FILE,
    StateError,
    StateVersionError,
    parse_state_bytes,
)
from exporter.logs import Reminder

_TMP_PREFIX = ".state.json.tmp-"
# Retries of a failed write: quick at first (a transient EMFILE, a blip on a network volume), then
# no more than one attempt every 30 s for a lasting fault (disk full) so as not to spin.
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 30.0
DIR_MODE = 0o700
_TMP_TRIES = 16  # fresh names to try when one is taken (EEXIST): only a planted file does that
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_O_TMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

log = structlog.get_logger()


def _octal(mode: int) -> str:
    return f"{mode:04o}"


class StateStore:
    """Loads and writes <state_dir>/state.json. Writes are serialised and never go backwards."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.dir = state_dir
        self.path = state_dir / STATE_FILE
        self._clock = clock
        self._lock = threading.Lock()
        self._written_gen = -1
        # The current streak of failed writes: since when (store clock) and the latest error.
        self._failing_since: float | None = None
        self._failing_error = ""
        self._streak = 0
        self._reminder = Reminder(60.0)
        self.write_failures = 0  # failed write attempts, retries included (the metric)
        # Called after a failed write so that the writer thread retries it: a fence written by the
        # engine's own thread would otherwise stay in memory only until the next unrelated change.
        self.on_write_failed: Callable[[], None] | None = None
        # False until load() has read (or ruled out) the file: until then memory holds nothing worth
        # writing, and writing it would replace every fence on disk with an empty document.
        self._loaded = False
        self.file_errors = 0  # corrupt/unreadable files moved aside (the metric)

    @property
    def loaded(self) -> bool:
        return self._loaded

    def problem(self) -> str | None:
        """Why the newest state is not on disk (a failure streak is going on), or None."""
        since, error = self._failing_since, self._failing_error
        if since is None:
            return None
        return f"health state not on disk since {max(0.0, self._clock() - since):.0f}s: {error}"

    def prepare(self) -> None:
        """Create the state dir if it is missing; make sure it is ours alone.

        Raises StateError, changing nothing, when another user owns it: whoever owns it can plant
        files in it or read the verdicts, and chmod-ing their directory is not ours to do either.
        """
        try:
            self.dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            st = self.dir.stat()
        except OSError as e:
            log.error("health_state_dir_unusable", path=str(self.dir), error=str(e))
            return
        euid = os.geteuid()
        if st.st_uid != euid:
            raise StateError(
                f"state dir {self.dir} is owned by uid {st.st_uid}, not by this daemon (euid {euid}); refusing to "
                f"use it, since its owner could plant files in it. chown it to uid {euid} (with its files) or "
                "point --state-dir at a directory of this user"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode != DIR_MODE:
            try:
                os.chmod(self.dir, DIR_MODE)
            except OSError as e:
                log.error("health_state_dir_unusable", path=str(self.dir), error=f"chmod {_octal(DIR_MODE)}: {e}")
                return
            log.warning(
                "health_state_dir_mode_fixed", path=str(self.dir), old_mode=_octal(mode), new_mode=_octal(DIR_MODE)
            )

    def load(self) -> dict[str, Any] | None:
        """The stored document, or None when there is none (first start, or it was moved aside).

        Raises StateError, having changed nothing in the dir, when the file is a newer version's.
        """
        doc = self._read()
        # Only now that the dir is known to be ours to write: a newer version's temps stay too.
        try:
            self._remove_stale_temps()
        except OSError as e:
            log.error("health_state_dir_unusable", path=str(self.dir), error=str(e))
        self._loaded = True
        return doc

    def _read(self) -> dict[str, Any] | None:
        try:
            raw = read_regular_file(self.path, MAX_STATE_BYTES)  # a FIFO there must not hang start-up
        except FileNotFoundError:
            return None
        except OSError as e:
            self._move_aside(f"unreadable: {e}")
            return None
        try:
            return parse_state_bytes(raw)
        except StateVersionError as e:
            raise StateError(
                f"{self.path} has schema {e.found}, this version reads up to {SCHEMA_VERSION}; it was written "
                "by a newer gpu-health-exporter and may hold fences. Run that version (or newer) again; to "
                "start this one with empty health state instead, move the file away first (its fences are "
                "then forgotten)"
            ) from None
        except ValueError as e:  # JSONDecodeError and StateFormatError are ValueErrors
            self._move_aside(str(e))
            return None

    def _remove_stale_temps(self) -> None:
        # Left behind by a kill -9 between create and rename; never the live file. unlink(2) on a
        # symlink removes the link, never what it points to; a directory is not ours and stays.
        dfd = os.open(self.dir, _O_DIR)
        try:
            with os.scandir(dfd) as entries:
                stale = [e.name for e in entries if e.name.startswith(_TMP_PREFIX)]
            for name in stale:
                with contextlib.suppress(OSError):
                    if not stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode):
                        os.unlink(name, dir_fd=dfd)
        finally:
            os.close(dfd)

    def _move_aside(self, why: str) -> None:
        self.file_errors += 1
        aside = self.path.with_name(f"{STATE_FILE}.corrupt-{int(self._clock())}")
        try:
            os.replace(self.path, aside)
            moved: str | None = str(aside)
        except OSError as e:
            moved = None
            why = f"{why}; moving it aside failed: {e}"
        # Loud on purpose: any fence recorded in that file is forgotten from here on.
        log.error(
            "health_state_file_corrupt",
            path=str(self.path),
            moved_to=moved,
            error=why,
            consequence="starting with empty health state; previously fenced GPUs are NOT fenced",
        )

    def write(self, doc: dict[str, Any], generation: int) -> bool:
        """Atomically replace the file with `doc` unless a newer generation is already on disk.

        False when the write failed: the caller keeps the state in memory and the writer thread
        (told through on_write_failed) retries with a newer rendering.
        """
        with self._lock:
            if not self._loaded:
                # A bug if it happens (the engine writes only once started); refuse rather than lose fences.
                log.error("health_state_write_refused", path=str(self.path), reason="state file never loaded")
                return False
            if generation <= self._written_gen:
                return True
            data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
            try:
                self._replace(data)
            except OSError as e:
                self._failed(e)
                hook = self.on_write_failed
            else:
                self._succeeded(generation)
                return True
        if hook is not None:
            hook()
        return False

    def _replace(self, data: bytes) -> None:
        # Everything relative to one fd of the directory: the temp file, the rename and the fsync
        # all concern the same directory, whatever happens to its path meanwhile.
        dfd = os.open(self.dir, _O_DIR)
        try:
            name, fd = self._create_temp(dfd)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(name, STATE_FILE, src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)
                raise
            os.fsync(dfd)  # the rename itself is durable only once the directory is
        finally:
            os.close(dfd)

    @staticmethod
    def _create_temp(dfd: int) -> tuple[str, int]:
        """A new temp file: an unguessable name, O_EXCL (never an existing file, never through a
        symlink, dangling or not), mode 0600. A name in use (planted?) is skipped for another."""
        taken: FileExistsError | None = None
        for _ in range(_TMP_TRIES):
            name = _TMP_PREFIX + secrets.token_hex(16)
            try:
                return name, os.open(name, _O_TMP, 0o600, dir_fd=dfd)
            except FileExistsError as e:
                taken = e
        assert taken is not None
        raise taken  # a failed write like any other: retried, and reported

    def _failed(self, e: OSError) -> None:
        self.write_failures += 1
        self._streak += 1
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        self._failing_error = f"{e.strerror or e} ({self.path})"
        # Once when the streak starts, then once a minute while it lasts: not once per retry.
        if self._reminder.due("failing"):
            log.error(
                "health_state_write_failed",
                path=str(self.path),
                error=str(e),
                failures=self._streak,
                not_durable_s=round(now - self._failing_since, 1),
                consequence="the newest verdicts are in memory only (a restart now would forget them); retrying",
            )

    def _succeeded(self, generation: int) -> None:
        if self._failing_since is not None:
            log.info(
                "health_state_write_recovered",
                path=str(self.path),
                failures=self._streak,
                not_durable_s=round(self._clock() - self._failing_since, 1),
            )
            self._reminder.clear("failing")
        self._failing_since, self._failing_error, self._streak = None, "", 0
        self._written_gen = generation


class CoalescingWriter:
    """Writes the latest state at most `max_per_s` times a second, from its own thread.

    `render` is called (by this thread) to get (document, generation); it must take the engine's
    lock itself so that the document is consistent.
    """

    def __init__(
        self,
        store: StateStore,
        render: Callable[[], tuple[dict[str, Any], int]],
        max_per_s: float = 4.0,
        *,
        retry_first_s: float = RETRY_FIRST_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self._store = store
        self._render = render
        self._interval = 1.0 / max_per_s
        self._retry_first_s = retry_first_s
        self._retry_max_s = retry_max_s
        self._dirty = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Any failed write, the engine's synchronous ones included, is retried from this thread.
        store.on_write_failed = self.mark_dirty

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-state-writer", daemon=True)
        self._thread.start()

    def mark_dirty(self) -> None:
        self._dirty.set()

    def _run(self) -> None:
        backoff = self._retry_first_s
        while not self._stopping.is_set():
            self._dirty.wait()
            if self._stopping.is_set():
                break
            self._dirty.clear()
            if self.flush():
                backoff = self._retry_first_s
                pause = self._interval  # the rate limit
            else:
                # Still not on disk: go again after the backoff, with a fresh rendering of memory.
                self._dirty.set()
                pause, backoff = backoff, min(backoff * 2, self._retry_max_s)
            self._stopping.wait(pause)  # stop() cuts it short

    def flush(self) -> bool:
        doc, gen = self._render()
        return self._store.write(doc, gen)

    def stop(self) -> None:
        """Stop the thread; flush what it had not written yet, but only if it was ever started."""
        thread, self._thread = self._thread, None
        if thread is None:
            return  # never started (a start that failed): there is nothing of ours to write
        self._stopping.set()
        self._dirty.set()
        thread.join(timeout=5)
        # Counts since the last coalesced write must not be lost on a clean stop; one last try if
        # writes are failing (we are exiting: there is no later retry).
        if not self.flush():
            log.error(
                "health_state_not_durable_at_exit",
                path=str(self._store.path),
                problem=self._store.problem(),
                consequence="verdicts since the last successful write are lost; a fence among them is forgotten",
            )
