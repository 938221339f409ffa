"""Every command-line flag, declared once, each also settable through the environment.

Each field of `Config` is one flag: its declaration carries the names, help, section, default
(as a user would type it), choices and the parser that turns text into the field's typed value.
From it come argparse, the environment fallback, validation messages, the typed defaults other
modules import (`DEFAULTS`) and the generated configuration reference (docs/configuration.md),
so they can never disagree.
"""

# Config's fields are declared by calls to _flag(), which return dataclasses.field(...) objects.
# ruff: noqa: RUF009

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from exporter import __version__
from exporter.devices import DeviceSelector, DeviceSelectorError, parse_device_selector

ENV_PREFIX = "GPU_HEALTH_EXPORTER_"

HostnameLabel = Literal["Hostname", "hostname"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
GpuIdType = Literal["uid", "device-name"]
SharedGpus = Literal["per-pod", "first-pod"]
MigStrategy = Literal["none", "single", "mixed"]
DeviceListStrategy = Literal["envvar", "cdi"]


class ConfigError(Exception):
    """A bad flag or environment value; the message names which one."""


class ListenAddress(NamedTuple):
    """`-a/--address`: host ('' for every interface) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Where(NamedTuple):
    """Where a value came from, for error messages."""

    flag: str  # the long flag name: messages about what the value means name it
    origin: str  # the flag, or "environment variable X": messages about how the text reads name it


# A parser turns a flag's text into its typed value or raises ConfigError naming the flag.
Parser = Callable[[str, Where], Any]


# --- parsers ---------------------------------------------------------------------------------


def _text(raw: str, at: Where) -> str:
    return raw


def _path(raw: str, at: Where) -> Path:
    return Path(raw)


def _whole_number(raw: str, at: Where) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{at.origin}: {raw!r} is not a whole number") from None


def _at_least(value: int, minimum: int, at: Where) -> int:
    if value < minimum:
        raise ConfigError(f"{at.flag}: must be at least {minimum}, got {value}")
    return value


def integer(minimum: int) -> Parser:
    """A whole number >= minimum."""

    def parse(raw: str, at: Where) -> int:
        return _at_least(_whole_number(raw, at), minimum, at)

    return parse


def millis_as_seconds(minimum_ms: int) -> Parser:
    """Whole milliseconds on the command line (like dcgm-exporter), float seconds in Config."""

    def parse(raw: str, at: Where) -> float:
        return _at_least(_whole_number(raw, at), minimum_ms, at) / 1000

    return parse


def seconds(minimum: int) -> Parser:
    """Whole seconds on the command line, float seconds in Config."""

    def parse(raw: str, at: Where) -> float:
        return float(_at_least(_whole_number(raw, at), minimum, at))

    return parse


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _boolean(raw: str, at: Where) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{at.origin}: {raw!r} is not a boolean (true/false)")


def one_of(choices: tuple[str, ...]) -> Parser:
    def parse(raw: str, at: Where) -> str:
        if raw not in choices:
            raise ConfigError(f"{at.origin}: {raw!r} is not one of {', '.join(choices)}")
        return raw

    return parse


def parse_address(address: str) -> ListenAddress:
    """':9400' -> ('', 9400); '127.0.0.1:9400'; '[::1]:9400'."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(\d{1,5})", address)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"--address {address!r}: expected [host]:port, e.g. :9400 or 127.0.0.1:9400")
    return ListenAddress(m.group(1).strip("[]"), int(m.group(2)))


def _address(raw: str, at: Where) -> ListenAddress:
    return parse_address(raw)


def _devices(raw: str, at: Where) -> DeviceSelector:
    try:
        return parse_device_selector(raw)
    except DeviceSelectorError as exc:
        raise ConfigError(f"{at.flag} {raw!r}: {exc}") from None


def _xids(raw: str, at: Where) -> tuple[int, ...]:
    """Comma list of XID numbers; the range is checked by the health policy."""
    out: list[int] = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise ConfigError(f"{at.flag}: {part!r} is not an XID number") from None
    return tuple(out)


def _names(raw: str, at: Where) -> tuple[str, ...]:
    """Comma list of names, blanks dropped."""
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def _regex(raw: str, at: Where) -> str:
    try:
        re.compile(raw)
    except re.error as exc:
        raise ConfigError(f"{at.flag}: invalid regex: {exc}") from None
    return raw


# --- the declaration -------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One flag's metadata; `Config`'s fields carry one each (see `_flag`)."""

    dest: str  # the Config field
    names: tuple[str, ...]
    default: str | None  # as typed on the command line; None: unset
    parse: Parser
    help: str
    section: str
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    switch: bool = False  # a boolean: `--flag` on the command line, true/false in the environment
    const: str | None = None  # the value of the bare flag when its value is optional (`--simulate`)

    @property
    def long_name(self) -> str:
        return next(n for n in self.names if n.startswith("--"))

    @property
    def short_name(self) -> str | None:
        return next((n for n in self.names if not n.startswith("--")), None)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.long_name[2:].upper().replace("-", "_")

    def value(self, raw: str | None, origin: str | None = None) -> Any:
        """The typed value of `raw` (None stays None); ConfigError names the flag."""
        if raw is None:
            return None
        return self.parse(raw, Where(self.long_name, origin or self.long_name))


def _flag(
    *names: str,
    default: str | None,
    help: str,
    section: str,
    parse: Parser = _text,
    choices: tuple[str, ...] = (),
    metavar: str | None = None,
    switch: bool = False,
    const: str | None = None,
) -> Any:
    """A Config field whose default is `default` parsed like a user's value."""
    if choices:
        parse = one_of(choices)
    if switch:
        parse = _boolean
    spec = Flag("", names, default, parse, help, section, choices, metavar, switch, const)
    return field(default=spec.value(default), metadata={"flag": spec})


CORE, PODS, HEALTH, PLUGIN = "Core", "Pod attribution", "Health", "Device plugin"


@dataclass(frozen=True)
class Config:
    """The typed configuration; every field is one flag (declared with `_flag`)."""

    # --- core ---
    address: ListenAddress = _flag(
        "-a",
        "--address",
        default=":9400",
        parse=_address,
        section=CORE,
        help="Address to listen on for HTTP ([host]:port).",
    )
    collect_interval_s: float = _flag(
        "-c",
        "--collect-interval",
        default="5000",
        parse=millis_as_seconds(100),
        section=CORE,
        metavar="MS",
        help="Collection interval in milliseconds. Scrapes are served from the last collection.",
    )
    collectors: str | None = _flag(
        "-f",
        "--collectors",
        default=None,
        section=CORE,
        metavar="PATH",
        help="dcgm-exporter counters CSV (field, type, help). Default: dcgm-exporter's default set plus health fields.",
    )
    devices: DeviceSelector = _flag(
        "-d",
        "--devices",
        default="f",
        parse=_devices,
        section=CORE,
        help="Devices to monitor, dcgm-exporter syntax: f (GPUs, or their MIG instances when MIG is on), "
        "g[:ids] (GPUs), i[:ids] (MIG GPU instances). ids: comma list with ranges, e.g. 0,2-4.",
    )
    device_timeout_s: float = _flag(
        "--device-timeout",
        default="2000",
        parse=millis_as_seconds(10),
        section=CORE,
        metavar="MS",
        help="Deadline for reading one device per cycle, in ms. A device past it is served stale and flagged.",
    )
    nvml_library: str | None = _flag(
        "--nvml-library",
        default=None,
        section=CORE,
        metavar="PATH",
        help="Load this libnvidia-ml.so.1 instead of the system's (a driver in an unusual place, or the test fake).",
    )
    simulate: str | None = _flag(
        "--simulate",
        default=None,
        const="",
        section=CORE,
        metavar="SPEC",
        help="Run on simulated GPUs instead of NVML (default node: 8x H100). SPEC: see docs/simulate.md.",
    )
    hostname_label: HostnameLabel = _flag(
        "--hostname-label",
        default="Hostname",
        choices=get_args(HostnameLabel),
        section=CORE,
        help="Name of the host label: Hostname (dcgm-exporter 4.8) or hostname (newer upstream).",
    )
    no_hostname: bool = _flag(
        "-n", "--no-hostname", default="false", switch=True, section=CORE, help="Do not add the host label."
    )
    log_format: LogFormat = _flag(
        "--log-format",
        default="auto",
        choices=get_args(LogFormat),
        section=CORE,
        help="Log format: json, console, or auto (console on a terminal, JSON otherwise).",
    )
    log_level: LogLevel = _flag(
        "--log-level", default="info", choices=get_args(LogLevel), section=CORE, help="Log level."
    )
    xid_count_window_s: float = _flag(
        "--xid-count-window-size",
        default="300000",
        parse=millis_as_seconds(1000),
        section=CORE,
        metavar="MS",
        help="Window of DCGM_EXP_XID_ERRORS_COUNT, in ms.",
    )
    # --- pod attribution ---
    kubernetes: bool = _flag(
        "-k",
        "--kubernetes",
        default="false",
        switch=True,
        section=PODS,
        help="Map GPUs to pods through the kubelet.",
    )
    pod_resources_socket: str = _flag(
        "--pod-resources-kubelet-socket",
        default="/var/lib/kubelet/pod-resources/kubelet.sock",
        section=PODS,
        metavar="PATH",
        help="Kubelet PodResources socket.",
    )
    kubernetes_gpu_id_type: GpuIdType = _flag(
        "--kubernetes-gpu-id-type",
        default="uid",
        choices=get_args(GpuIdType),
        section=PODS,
        help="dcgm-exporter's switch between UUID ids (GPU-/MIG-) and GKE device names (nvidia<N>[/gi<M>]). "
        "Accepted for compatibility: both forms are always recognised, so a wrong setting cannot lose labels.",
    )
    nvidia_resource_names: tuple[str, ...] = _flag(
        "--nvidia-resource-names",
        default="",
        parse=_names,
        section=PODS,
        metavar="LIST",
        help="Extra resource names (comma list) that carry NVIDIA GPUs.",
    )
    kubernetes_shared_gpus: SharedGpus = _flag(
        "--kubernetes-shared-gpus",
        default="per-pod",
        choices=get_args(SharedGpus),
        section=PODS,
        help="Shared GPUs: per-pod (one series per container, with a vgpu label) or first-pod (one series per device).",
    )
    kubernetes_enable_pod_uid: bool = _flag(
        "--kubernetes-enable-pod-uid", default="false", switch=True, section=PODS, help="Add a pod_uid label."
    )
    kubernetes_enable_pod_labels: bool = _flag(
        "--kubernetes-enable-pod-labels",
        default="false",
        switch=True,
        section=PODS,
        help="Add sanitised pod labels (watched from the API server, this node only).",
    )
    kubernetes_pod_labels_allowlist: str = _flag(
        "--kubernetes-pod-labels-allowlist",
        default=".*",
        parse=_regex,
        section=PODS,
        metavar="REGEX",
        help="Regex of pod label names to add.",
    )
    kubernetes_dra: bool = _flag(
        "--kubernetes-dra",
        default="false",
        switch=True,
        section=PODS,
        help="Map DRA claims (driver gpu.nvidia.com) through ResourceSlices from the API server.",
    )
    kubeconfig: str | None = _flag(
        "--kubeconfig",
        default=None,
        section=PODS,
        metavar="PATH",
        help="Kubeconfig for API server features (default: in-cluster).",
    )
    # --- health ---
    state_dir: Path = _flag(
        "--state-dir",
        default="/var/lib/gpu-health-exporter",
        parse=_path,
        section=HEALTH,
        metavar="DIR",
        help="Directory for the persisted health state and the control socket.",
    )
    health_fence_xids: tuple[int, ...] = _flag(
        "--health-fence-xids",
        default="",
        parse=_xids,
        section=HEALTH,
        metavar="LIST",
        help="Extra XIDs that fence a GPU.",
    )
    health_warn_xids: tuple[int, ...] = _flag(
        "--health-warn-xids",
        default="",
        parse=_xids,
        section=HEALTH,
        metavar="LIST",
        help="XIDs that only degrade a GPU.",
    )
    health_ignore_xids: tuple[int, ...] = _flag(
        "--health-ignore-xids",
        default="",
        parse=_xids,
        section=HEALTH,
        metavar="LIST",
        help="XIDs counted but never acted on.",
    )
    health_nvml_timeout_grace_s: float = _flag(
        "--health-nvml-timeout-grace",
        default="30",
        parse=seconds(0),
        section=HEALTH,
        metavar="S",
        help="Seconds a device's NVML reads may time out before it is fenced.",
    )
    health_slowdown_s: float = _flag(
        "--health-slowdown-seconds",
        default="300",
        parse=seconds(0),
        section=HEALTH,
        metavar="S",
        help="Seconds of sustained HW thermal or power-brake slowdown before a GPU is degraded.",
    )
    health_auto_recover: bool = _flag(
        "--health-auto-recover",
        default="false",
        switch=True,
        section=HEALTH,
        help="Clear a fenced GPU automatically after a detected GPU reset.",
    )
    kubernetes_node_status: bool = _flag(
        "--kubernetes-node-status",
        default="false",
        switch=True,
        section=HEALTH,
        help="Publish a Node condition and Events for GPU health (needs the API server).",
    )
    # --- device plugin ---
    device_plugin: bool = _flag(
        "--device-plugin", default="false", switch=True, section=PLUGIN, help="Run the kubelet device plugin."
    )
    resource_name: str = _flag(
        "--resource-name", default="nvidia.com/gpu", section=PLUGIN, help="Resource name to advertise."
    )
    device_plugin_dir: str = _flag(
        "--device-plugin-dir",
        default="/var/lib/kubelet/device-plugins",
        section=PLUGIN,
        metavar="DIR",
        help="Kubelet device plugin directory.",
    )
    mig_strategy: MigStrategy = _flag(
        "--mig-strategy", default="none", choices=get_args(MigStrategy), section=PLUGIN, help="MIG strategy."
    )
    replicas: int = _flag(
        "--replicas", default="1", parse=integer(1), section=PLUGIN, metavar="N", help="Time-slicing replicas per GPU."
    )
    device_list_strategy: DeviceListStrategy = _flag(
        "--device-list-strategy",
        default="envvar",
        choices=get_args(DeviceListStrategy),
        section=PLUGIN,
        help="How Allocate passes devices: envvar (NVIDIA_VISIBLE_DEVICES) or cdi (cdi_devices).",
    )

    @property
    def host_label(self) -> str | None:
        return None if self.no_hostname else self.hostname_label


# The flags in declaration order, each with its Config field as `dest`.
FLAGS: tuple[Flag, ...] = tuple(replace(f.metadata["flag"], dest=f.name) for f in fields(Config))

# Every default, typed: what other modules import instead of repeating a literal.
DEFAULTS = Config()


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 itself; we want one error path
        raise ConfigError(message)


def build_parser(prog: str = "gpu-health-exporter") -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=prog,
        description="GPU health and metrics exporter (DCGM-compatible) with a kubelet device plugin.",
        epilog=f"Every flag can also be set through the environment: {ENV_PREFIX}<FLAG> "
        f"(e.g. {ENV_PREFIX}COLLECT_INTERVAL=1000). Subcommand: 'health list|clear'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in FLAGS:
        group = groups.setdefault(flag.section, parser.add_argument_group(flag.section))
        help_text = f"{flag.help} [env {flag.env}]"
        if flag.switch:
            group.add_argument(*flag.names, dest=flag.dest, action="store_true", default=None, help=help_text)
        elif flag.const is not None:
            group.add_argument(
                *flag.names,
                dest=flag.dest,
                nargs="?",
                const=flag.const,
                default=None,
                metavar=flag.metavar,
                help=help_text,
            )
        else:
            group.add_argument(
                *flag.names,
                dest=flag.dest,
                default=None,
                metavar=flag.metavar or flag.dest.upper(),
                help=help_text,
                choices=flag.choices or None,
            )
    return parser


def parse_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    for flag in FLAGS:
        given = getattr(ns, flag.dest)
        if given is not None:
            values[flag.dest] = True if flag.switch else flag.value(given)
        elif flag.env in env:
            values[flag.dest] = flag.value(env[flag.env], f"environment variable {flag.env}")
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """What no single flag can check: each flag's own value was checked when it was parsed."""
    if cfg.nvml_library is not None and cfg.simulate is not None:
        raise ConfigError("--nvml-library and --simulate exclude each other")
