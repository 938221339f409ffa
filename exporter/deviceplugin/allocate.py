"""What Allocate tells the kubelet for one container: pure functions, no gRPC server, no NVML.

The semantics follow NVIDIA's k8s-device-plugin (internal/plugin/server.go getAllocateResponse):

- `envvar`: `NVIDIA_VISIBLE_DEVICES=<id>,<id>` for the NVIDIA container runtime hook.
- `volume-mounts`: one mount of `/dev/null` at `/var/run/nvidia-container-devices/<id>` per device and
  `NVIDIA_VISIBLE_DEVICES=/var/run/nvidia-container-devices`, for runtimes configured with
  `accept-nvidia-visible-devices-envvar-when-unprivileged = false` (an unprivileged pod can then not
  pick GPUs by setting the variable itself). With `envvar` too, the mount root wins, as upstream.
- `cdi-annotations`: one annotation `<prefix>nvidia-device-plugin_<response id>` whose value is the
  comma list of CDI device names (the CDI library's annotation key, NVIDIA's plugin name).
- `cdi-cri`: the CRI `cdi_devices` field (containerd >= 1.7, CRI-O).
- `cdi` (our historical name) is an alias of `cdi-cri`.

IDs are UUIDs (`--device-id-strategy uuid`) or indices (`index`: `<gpu index>` and, for MIG,
`<parent index>:<MIG slot>`), as upstream and as `nvidia-ctk cdi generate --device-name-strategy`.

When every strategy is a CDI one, upstream sets no device environment variable at all and relies on
the spec nvidia-ctk generates, whose common `containerEdits.env` carries `NVIDIA_VISIBLE_DEVICES=void`.
We also set `void` in the response: the CRI environment overrides an image's own
`NVIDIA_VISIBLE_DEVICES=all` (every CUDA base image sets it), so a legacy-mode NVIDIA runtime hook
cannot add every GPU of the node next to the CDI devices even when the spec in use lacks that edit.

Device specs (`--pass-device-specs`) are passed only when a non-CDI strategy is in use (with CDI the
spec carries the device nodes), like upstream: the control nodes (`/dev/nvidiactl`, `/dev/nvidia-uvm`,
`/dev/nvidia-uvm-tools`, `/dev/nvidia-modeset`, each only if it exists), `/dev/nvidia<minor>` of each
GPU, and for a MIG device its parent's node plus the `/dev/nvidia-caps/nvidia-cap<N>` of its GPU
instance and compute instance, N read from `/proc/driver/nvidia-caps/mig-minors` (internal/mig).
"""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from exporter.deviceplugin.api.v1beta1 import deviceplugin_pb2 as pb
from exporter.model import Inventory

ENV_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
VISIBLE_DEVICES_VOID = "void"
VOLUME_MOUNTS_HOST_PATH = "/dev/null"
VOLUME_MOUNTS_ROOT = "/var/run/nvidia-container-devices"
DEFAULT_CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"
# The plugin part of the annotation key: NVIDIA's, so tooling that looks for it finds ours too.
CDI_ANNOTATION_PLUGIN = "nvidia-device-plugin"
DEFAULT_MIG_MINORS = "/proc/driver/nvidia-caps/mig-minors"
CAPS_DEVICE_DIR = "/dev/nvidia-caps"

ENVVAR, VOLUME_MOUNTS, CDI_ANNOTATIONS, CDI_CRI = "envvar", "volume-mounts", "cdi-annotations", "cdi-cri"
STRATEGIES = (ENVVAR, VOLUME_MOUNTS, CDI_ANNOTATIONS, CDI_CRI)
STRATEGY_ALIASES = {"cdi": CDI_CRI}
ID_UUID, ID_INDEX = "uuid", "index"
ID_STRATEGIES = (ID_UUID, ID_INDEX)

# Created only if present on the node (upstream's "optional" nodes): uvm appears once a CUDA context
# was created, modeset only with the modeset module loaded.
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


class AllocateError(Exception):
    """The response cannot be built; the message says which device and what is missing."""


def normalise_strategies(raw: str | Iterable[str]) -> tuple[str, ...]:
    """`"envvar, cdi"` -> `("envvar", "cdi-cri")`: aliases resolved, order kept, duplicates dropped.

    Raises ValueError naming the bad entry.
    """
    parts = raw.split(",") if isinstance(raw, str) else list(raw)
    out: list[str] = []
    for part in parts:
        name = part.strip()
        if not name:
            continue
        name = STRATEGY_ALIASES.get(name, name)
        if name not in STRATEGIES:
            choices = ", ".join((*STRATEGIES, *STRATEGY_ALIASES))
            raise ValueError(f"device list strategy {part.strip()!r} is not one of {choices}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("device list strategy is empty: give at least one of " + ", ".join(STRATEGIES))
    return tuple(out)


def is_cdi(strategy: str) -> bool:
    return strategy.startswith("cdi-")


@dataclass(frozen=True)
class AllocateOptions:
    """The flags that shape a ContainerAllocateResponse."""

    strategies: tuple[str, ...] = (ENVVAR,)
    id_strategy: str = ID_UUID
    cdi_kind: str = "k8s.device-plugin.nvidia.com/gpu"
    cdi_annotation_prefix: str = DEFAULT_CDI_ANNOTATION_PREFIX
    pass_device_specs: bool = False
    dev_root: str = "/"

    @property
    def any_cdi(self) -> bool:
        return any(is_cdi(s) for s in self.strategies)

    @property
    def all_cdi(self) -> bool:
        return all(is_cdi(s) for s in self.strategies)


@dataclass(frozen=True)
class Target:
    """One device a container gets, with what its names and device nodes are made of."""

    uuid: str  # GPU-... or MIG-...
    index_id: str  # "<gpu index>" or "<parent index>:<MIG slot>"
    gpu_minor: int  # /dev/nvidia<minor> (the parent's for MIG)
    gi: int | None = None  # MIG: GPU instance and compute instance ids
    ci: int | None = None

    @property
    def is_mig(self) -> bool:
        return self.gi is not None


def targets_for(inventory: Inventory, uuids: Sequence[str]) -> list[Target]:
    """The inventory facts of each UUID (GPU or MIG); AllocateError names a UUID it does not have."""
    out: list[Target] = []
    for u in uuids:
        gpu = inventory.gpu_by_uuid(u)
        if gpu is not None:
            out.append(Target(u, str(gpu.index), gpu.minor))
            continue
        mig = inventory.mig_by_uuid(u)
        parent = inventory.gpu_by_uuid(mig.parent_uuid) if mig is not None else None
        if mig is None or parent is None:
            raise AllocateError(f"device {u} is no longer in the GPU inventory (GPU or MIG layout just changed?)")
        out.append(Target(u, f"{parent.index}:{mig.slot}", parent.minor, mig.gpu_instance_id, mig.compute_instance_id))
    return out


def runtime_ids(targets: Sequence[Target], id_strategy: str) -> list[str]:
    """What goes into the variable, the mount names and the CDI device names."""
    return [t.index_id if id_strategy == ID_INDEX else t.uuid for t in targets]


def cdi_names(ids: Sequence[str], kind: str) -> list[str]:
    return [f"{kind}={i}" for i in ids]


# --- MIG capability minors -----------------------------------------------------------------------

_GI_LINE = re.compile(r"gpu(\d+)/gi(\d+)/access\s+(\d+)")
_CI_LINE = re.compile(r"gpu(\d+)/gi(\d+)/ci(\d+)/access\s+(\d+)")
_GLOBAL_LINE = re.compile(r"(config|monitor)\s+(\d+)")


@dataclass(frozen=True)
class MigMinors:
    """`/proc/driver/nvidia-caps/mig-minors`: capability -> device minor of `/dev/nvidia-caps/nvidia-cap<N>`.

    Keys: `(0, gpu minor, gi)` (GPU instance) and `(1, gpu minor, gi, ci)` (compute instance). The
    driver names the GPU by its minor number, not its NVML index. Lines that do not parse are skipped
    and listed in `problems` ("<file>:<line>: ..."), as upstream skips them with a log line.
    """

    source: str
    caps: dict[tuple[int, ...], int] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    missing: bool = False  # the file does not exist (no MIG-capable driver)

    def gi_minor(self, gpu_minor: int, gi: int) -> int | None:
        return self.caps.get((0, gpu_minor, gi))

    def ci_minor(self, gpu_minor: int, gi: int, ci: int) -> int | None:
        return self.caps.get((1, gpu_minor, gi, ci))


def parse_mig_minors(text: str, source: str = DEFAULT_MIG_MINORS) -> MigMinors:
    caps: dict[tuple[int, ...], int] = {}
    problems: list[str] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if m := _CI_LINE.fullmatch(line):
            caps[(1, int(m[1]), int(m[2]), int(m[3]))] = int(m[4])
        elif m := _GI_LINE.fullmatch(line):
            caps[(0, int(m[1]), int(m[2]))] = int(m[3])
        elif not _GLOBAL_LINE.fullmatch(line):
            # config/monitor are valid lines we have no use for; anything else is reported.
            problems.append(f"{source}:{n}: unparsable line {line[:80]!r}")
    return MigMinors(source, caps, tuple(problems))


def read_mig_minors(path: str) -> MigMinors:
    """Read and parse the file; a missing file is an empty table (no MIG on this driver)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)  # a proc file of a few hundred lines; bound it anyway
    except FileNotFoundError:
        return MigMinors(path, missing=True)
    except OSError as exc:
        return MigMinors(path, problems=(f"{path}: cannot read: {exc.strerror or exc}",), missing=True)
    return parse_mig_minors(text, path)


# --- device specs --------------------------------------------------------------------------------


def _host_path(dev_root: str, path: str) -> str:
    return os.path.join(dev_root, path.lstrip("/"))


def device_paths(targets: Sequence[Target], mig_minors: Callable[[], MigMinors]) -> list[str]:
    """Container paths of the device nodes for `targets` (each once, in order); MIG caps need the table."""
    paths: list[str] = []
    table: MigMinors | None = None
    for t in targets:
        paths.append(f"/dev/nvidia{t.gpu_minor}")
        if t.gi is None or t.ci is None:
            continue
        if table is None:
            table = mig_minors()
        gi = table.gi_minor(t.gpu_minor, t.gi)
        ci = table.ci_minor(t.gpu_minor, t.gi, t.ci)
        if gi is None or ci is None:
            what = f"gpu{t.gpu_minor}/gi{t.gi}/access" if gi is None else f"gpu{t.gpu_minor}/gi{t.gi}/ci{t.ci}/access"
            why = "does not exist" if table.missing else f"has no line {what!r}"
            raise AllocateError(f"MIG device {t.uuid}: {table.source} {why}; cannot pass its capability device nodes")
        paths += [f"{CAPS_DEVICE_DIR}/nvidia-cap{gi}", f"{CAPS_DEVICE_DIR}/nvidia-cap{ci}"]
    return list(dict.fromkeys(paths))


def device_specs(
    targets: Sequence[Target],
    dev_root: str,
    mig_minors: Callable[[], MigMinors],
    exists: Callable[[str], bool] = os.path.exists,
) -> list[pb.DeviceSpec]:
    """DeviceSpec entries: host path under `dev_root`, same container path, `rw`."""
    paths = [p for p in CONTROL_NODES if exists(_host_path(dev_root, p))]
    paths += device_paths(targets, mig_minors)
    return [pb.DeviceSpec(container_path=p, host_path=_host_path(dev_root, p), permissions="rw") for p in paths]


# --- the response --------------------------------------------------------------------------------


def annotation_key(prefix: str, response_id: str) -> str:
    return f"{prefix}{CDI_ANNOTATION_PLUGIN}_{response_id.replace('/', '_')}"


def container_response(
    targets: Sequence[Target],
    options: AllocateOptions,
    *,
    response_id: str | None = None,
    mig_minors: Callable[[], MigMinors] = lambda: read_mig_minors(DEFAULT_MIG_MINORS),
    exists: Callable[[str], bool] = os.path.exists,
) -> pb.ContainerAllocateResponse:
    """The ContainerAllocateResponse for `targets` (already de-duplicated, in request order)."""
    ids = runtime_ids(targets, options.id_strategy)
    response = pb.ContainerAllocateResponse()
    if options.any_cdi and ids:
        names = cdi_names(ids, options.cdi_kind)
        if CDI_ANNOTATIONS in options.strategies:
            key = annotation_key(options.cdi_annotation_prefix, response_id or str(uuidlib.uuid4()))
            response.annotations[key] = ",".join(names)
        if CDI_CRI in options.strategies:
            response.cdi_devices.extend(pb.CDIDevice(name=n) for n in names)
    if options.all_cdi:
        response.envs[ENV_VISIBLE_DEVICES] = VISIBLE_DEVICES_VOID
        return response
    if ENVVAR in options.strategies:
        response.envs[ENV_VISIBLE_DEVICES] = ",".join(ids)
    if VOLUME_MOUNTS in options.strategies:
        response.envs[ENV_VISIBLE_DEVICES] = VOLUME_MOUNTS_ROOT
        response.mounts.extend(
            pb.Mount(container_path=f"{VOLUME_MOUNTS_ROOT}/{i}", host_path=VOLUME_MOUNTS_HOST_PATH, read_only=False)
            for i in ids
        )
    if options.pass_device_specs:
        response.devices.extend(device_specs(targets, options.dev_root, mig_minors, exists))
    return response
