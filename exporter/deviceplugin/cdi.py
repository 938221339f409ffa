"""CDI spec management: which device names the specs on the node define, and regenerating ours.

Allocate never hands out a CDI device name that no spec defines: the runtime would fail the container
with an opaque "unresolvable CDI devices" error long after the kubelet admitted the pod. `SpecIndex`
reads the spec files in the CDI directories (`/etc/cdi`, `/var/run/cdi`; the runtime reads only
`*.json` and `*.yaml` there, not subdirectories) and keeps, per file version (inode, size, mtime),
the `kind` and `devices[].name` it defines; a file that does not parse is logged once per version and
ignored, never fatal.

`SpecGenerator` keeps our own spec current, as NVIDIA's plugin does at start-up
(cmd/nvidia-device-plugin/plugin-manager.go, internal/cdi): on every inventory change it runs
`nvidia-ctk cdi generate` on its own thread (never a gRPC thread), with a timeout, into a private
directory next to the spec file, checks that the result defines our kind, then renames it into place;
a failed or timed-out run leaves the previous spec untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import yaml

log = structlog.get_logger(__name__)

DEFAULT_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")
# NVIDIA's plugin: vendor k8s.device-plugin.nvidia.com, class gpu, written as
# /var/run/cdi/<vendor>-<class>.json (CDI's GenerateNameForSpec). A vendor of its own keeps it apart
# from the toolkit's nvidia.com/gpu spec: two files defining one device in one directory conflict.
DEFAULT_CDI_KIND = "k8s.device-plugin.nvidia.com/gpu"
DEFAULT_SPEC_FILE = "/var/run/cdi/k8s.device-plugin.nvidia.com-gpu.json"
DEFAULT_NVIDIA_CTK = "/usr/bin/nvidia-ctk"  # upstream's DefaultNvidiaCTKPath
SPEC_EXTENSIONS = (".json", ".yaml")  # what CDI's cache reads; anything else is invisible to the runtime
_MAX_SPEC_BYTES = 16 * 1024 * 1024
_TMP_DIR = ".gpu-health-exporter"  # a subdirectory: the runtime does not read it
RETRY_FIRST_S = 5.0  # a failed generation is retried after this, doubling up to RETRY_MAX_S
RETRY_MAX_S = 300.0


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the file and what is wrong."""


def parse_spec(text: str, path: str) -> tuple[str, frozenset[str]]:
    """(kind, device names) of one spec file's text; SpecError says why it is unusable."""
    try:
        doc: Any = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {first}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: a CDI spec must be a mapping, found {type(doc).__name__}")
    kind = doc.get("kind")
    if not isinstance(kind, str) or "/" not in kind:
        raise SpecError(f"{path}: 'kind' must be '<vendor>/<class>', found {kind!r}")
    devices = doc.get("devices")
    if not isinstance(devices, list):
        raise SpecError(f"{path}: 'devices' must be a list, found {type(devices).__name__}")
    names: list[str] = []
    for i, dev in enumerate(devices):
        name = dev.get("name") if isinstance(dev, dict) else None
        if name is None:
            raise SpecError(f"{path}: devices[{i}] has no 'name'")
        if not isinstance(name, str) or not name:
            # e.g. YAML `name: 0` is a number; the runtime's CDI parser rejects it too.
            raise SpecError(f"{path}: devices[{i}].name must be a non-empty string, found {name!r}")
        names.append(name)
    return kind, frozenset(names)


@dataclass(frozen=True)
class _Entry:
    version: tuple[int, int, int]
    kind: str | None  # None: the file did not parse
    names: frozenset[str]


class SpecIndex:
    """The device names the CDI spec files define, re-read only when a file changes. Thread-safe."""

    def __init__(self, dirs: Sequence[str] = DEFAULT_SPEC_DIRS) -> None:
        self.dirs = tuple(dirs)
        self._lock = threading.Lock()
        self._files: dict[str, _Entry] = {}

    def _scan(self) -> list[str]:
        paths: list[str] = []
        for d in self.dirs:
            try:
                with os.scandir(d) as it:
                    paths += sorted(
                        e.path for e in it if e.name.endswith(SPEC_EXTENSIONS) and e.is_file(follow_symlinks=True)
                    )
            except OSError:
                continue  # a directory that does not exist defines nothing
        return paths

    def _entry(self, path: str) -> _Entry | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        old = self._files.get(path)
        if old is not None and old.version == version:
            return old
        try:
            if st.st_size > _MAX_SPEC_BYTES:
                raise SpecError(f"{path}: {st.st_size} bytes is too large for a CDI spec")
            with open(path, encoding="utf-8", errors="replace") as f:
                kind, names = parse_spec(f.read(), path)
            entry = _Entry(version, kind, names)
        except (SpecError, OSError) as exc:
            # Logged once per file version: Allocate asks often, the file changes rarely.
            log.warning("CDI spec file ignored", path=path, error=str(exc))
            entry = _Entry(version, None, frozenset())
        self._files[path] = entry
        return entry

    def devices(self) -> dict[str, frozenset[str]]:
        """{kind: device names} over every readable spec file."""
        with self._lock:
            out: dict[str, set[str]] = {}
            seen: set[str] = set()
            for path in self._scan():
                entry = self._entry(path)
                if entry is None:
                    continue
                seen.add(path)
                if entry.kind is not None:
                    out.setdefault(entry.kind, set()).update(entry.names)
            for gone in set(self._files) - seen:
                del self._files[gone]
            return {k: frozenset(v) for k, v in out.items()}

    def missing(self, names: Iterable[str]) -> list[str]:
        """The fully qualified names (`<kind>=<device>`) no spec defines, in the order given."""
        defined = self.devices()
        out: list[str] = []
        for qualified in names:
            kind, _, device = qualified.partition("=")
            if device not in defined.get(kind, frozenset()):
                out.append(qualified)
        return out


# --- regeneration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateSettings:
    nvidia_ctk: str = DEFAULT_NVIDIA_CTK
    spec_file: str = DEFAULT_SPEC_FILE
    kind: str = DEFAULT_CDI_KIND
    id_strategy: str = "uuid"
    extra_args: tuple[str, ...] = ()
    timeout_s: float = 60.0

    def command(self, output: str) -> list[str]:
        vendor, _, klass = self.kind.partition("/")
        fmt = "json" if self.spec_file.endswith(".json") else "yaml"
        return [
            self.nvidia_ctk,
            "cdi",
            "generate",
            f"--output={output}",
            f"--format={fmt}",
            f"--vendor={vendor}",
            f"--class={klass}",
            f"--device-name-strategy={self.id_strategy}",
            *self.extra_args,
        ]


def check_nvidia_ctk(path: str) -> str:
    """The executable to run; ValueError (a start-up error) when it is not there."""
    found = shutil.which(path) if os.sep not in path else (path if os.access(path, os.X_OK) else None)
    if not found or not os.path.isfile(found):
        raise ValueError(
            f"nvidia-ctk not found or not executable at {path!r}: a CDI --device-list-strategy needs it to "
            "generate the CDI spec (mount the host's /usr/bin/nvidia-ctk, set --nvidia-ctk-path, or set "
            "--nvidia-ctk-path='' when another component keeps the spec in --cdi-spec-dirs current)"
        )
    return found


class SpecGenerator:
    """Runs `nvidia-ctk cdi generate` on its own thread whenever `request()` is called.

    Requests while a run is in progress coalesce into one more run. `wait(generation)` lets callers
    (tests, start-up) wait for a run that started after they asked.
    """

    def __init__(self, settings: GenerateSettings) -> None:
        self.settings = settings
        self._cond = threading.Condition()
        self._pending = False
        self._requested = 0  # requests made
        self._done = 0  # requests covered by a finished run
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.runs = 0

    def request(self) -> int:
        """Ask for a regeneration; returns a ticket for `wait`. Never blocks on the run."""
        with self._cond:
            self._requested += 1
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="cdi-generate", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return self._requested

    def wait(self, ticket: int, timeout: float) -> bool:
        """True once a run that started after request `ticket` finished."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= ticket, timeout)

    def _loop(self) -> None:
        failures = 0
        while True:
            with self._cond:
                # After a failure, try again on a backoff even without a new request: a spec that failed
                # at start (driver not ready yet) would otherwise stay missing until the next change.
                delay = None if failures == 0 else min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
                self._cond.wait_for(lambda: self._pending, delay)
                self._pending = False
                covers = self._requested
            try:
                self.last_error = self.run_once()
            except Exception as exc:  # a bug of ours must not end the thread
                self.last_error = f"CDI spec generation failed: {exc}"
                log.exception("CDI spec generation failed")
            failures = failures + 1 if self.last_error else 0
            with self._cond:
                self.runs += 1
                self._done = covers
                self._cond.notify_all()

    def run_once(self) -> str | None:
        """One generation; returns None or the error (also logged). The old spec survives a failure."""
        s = self.settings
        spec_dir = os.path.dirname(s.spec_file)
        tmp_dir = os.path.join(spec_dir, _TMP_DIR)
        tmp = os.path.join(tmp_dir, os.path.basename(s.spec_file))
        try:
            os.makedirs(tmp_dir, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            cmd = s.command(tmp)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=s.timeout_s, check=False)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip()[-500:]
                return self._fail(f"{s.nvidia_ctk} exited with {proc.returncode}: {tail}")
            with open(tmp, encoding="utf-8", errors="replace") as f:
                kind, names = parse_spec(f.read(), tmp)
            if kind != s.kind:
                return self._fail(f"{s.nvidia_ctk} wrote kind {kind!r}, expected {s.kind!r}")
            os.replace(tmp, s.spec_file)
        except subprocess.TimeoutExpired:
            return self._fail(f"{s.nvidia_ctk} did not finish within {s.timeout_s:g} s")
        except (OSError, SpecError) as exc:
            return self._fail(str(exc))
        log.info("CDI spec generated", path=s.spec_file, kind=kind, devices=len(names))
        return None

    @staticmethod
    def _fail(message: str) -> str:
        log.error("CDI spec generation failed; keeping the previous spec", error=message)
        return message


# One generator and one index per configuration: the manager and every server generation share them.
_lock = threading.Lock()
_generators: dict[GenerateSettings, SpecGenerator] = {}
_indexes: dict[tuple[str, ...], SpecIndex] = {}


def spec_index(dirs: Sequence[str]) -> SpecIndex:
    with _lock:
        return _indexes.setdefault(tuple(dirs), SpecIndex(dirs))


def generator(settings: GenerateSettings) -> SpecGenerator:
    with _lock:
        return _generators.setdefault(settings, SpecGenerator(settings))


class _CdiConfig(Protocol):
    @property
    def generates_cdi_spec(self) -> bool: ...

    def generate_settings(self) -> GenerateSettings: ...


def regenerate(config: _CdiConfig) -> int | None:
    """Ask for a new spec when `config` generates one (the inventory changed); never blocks.

    Returns the generator's ticket (for `generator(...).wait`), None when no spec is generated.
    """
    if not config.generates_cdi_spec:
        return None
    return generator(config.generate_settings()).request()
