"""Reading a small file that a user or an attacker may have put anything at: bounded, regular files only.

A FIFO or a character device in place of a counters file, a state file or a web config would hang
start-up (a FIFO waits for a writer) or never end (/dev/zero); a file gigabytes long would be read
into memory. Each is refused with an OSError that says which, so every caller's existing
`except OSError` path reports it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class RefusedFile(OSError):
    """The path is not a regular file, or is larger than the caller's limit; str() says which."""


def _size_text(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 and limit % (1 << 20) == 0 else f"{limit} bytes"


def _refuse_kind(st: os.stat_result, limit: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise RefusedFile("is a directory")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise RefusedFile(f"not a regular file ({kind})")
    if st.st_size > limit:
        raise RefusedFile(f"{st.st_size} bytes, more than {_size_text(limit)}")


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """The file's bytes. Raises FileNotFoundError, RefusedFile or another OSError."""
    _refuse_kind(os.stat(path), limit)
    # O_NONBLOCK: should the path become a FIFO after the check, opening it does not wait for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        _refuse_kind(os.fstat(fd), limit)  # what was opened, should the path have changed since the check
        chunks: list[bytes] = []
        left = limit + 1  # one byte more tells a file that grew past the limit
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise RefusedFile(f"more than {_size_text(limit)}")
    return data
