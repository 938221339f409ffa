"""Every command-line flag in one table, each also settable through the environment.

The table drives argparse, the environment fallback, validation messages and
the generated configuration reference (docs/configuration.md), so they can
never disagree.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

ENV_PREFIX = "GPU_HEALTH_EXPORTER_"

Kind = Literal["str", "int", "bool", "choice", "optional"]


class ConfigError(Exception):
    """A bad flag or environment value; the message names which one."""


@dataclass(frozen=True)
class Flag:
    dest: str
    names: tuple[str, ...]
    kind: Kind
    default: Any
    help: str
    section: str
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def long_name(self) -> str:
        return next(n for n in self.names if n.startswith("--"))

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.long_name[2:].upper().replace("-", "_")


CORE, PODS, HEALTH, PLUGIN = "Core", "Pod attribution", "Health", "Device plugin"

FLAGS: tuple[Flag, ...] = (
    Flag("address", ("-a", "--address"), "str", ":9400", "Address to listen on for HTTP ([host]:port).", CORE),
    Flag(
        "collect_interval_ms", ("-c", "--collect-interval"), "int", 5000,
        "Collection interval in milliseconds. Scrapes are served from the last collection.", CORE, metavar="MS",
    ),
    Flag(
        "collectors", ("-f", "--collectors"), "optional", None,
        "dcgm-exporter counters CSV (field, type, help). Default: dcgm-exporter's default set plus health fields.",
        CORE, metavar="PATH",
    ),
    Flag(
        "devices", ("-d", "--devices"), "str", "f",
        "Devices to monitor, dcgm-exporter syntax: f (GPUs, or their MIG instances when MIG is on), "
        "g[:ids] (GPUs), i[:ids] (MIG GPU instances). ids: comma list with ranges, e.g. 0,2-4.",
        CORE,
    ),
    Flag(
        "device_timeout_ms", ("--device-timeout",), "int", 2000,
        "Deadline for reading one device per cycle, in ms. A device past it is served stale and flagged.",
        CORE, metavar="MS",
    ),
    Flag(
        "nvml_library", ("--nvml-library",), "optional", None,
        "Load this libnvidia-ml.so.1 instead of the system's (a driver in an unusual place, or the test fake).",
        CORE, metavar="PATH",
    ),
    Flag(
        "simulate", ("--simulate",), "optional", None,
        "Run on simulated GPUs instead of NVML (default node: 8x H100). SPEC: see docs/simulate.md.",
        CORE, metavar="SPEC",
    ),
    Flag(
        "hostname_label", ("--hostname-label",), "choice", "Hostname",
        "Name of the host label: Hostname (dcgm-exporter 4.8) or hostname (newer upstream).",
        CORE, choices=("Hostname", "hostname"),
    ),
    Flag("no_hostname", ("-n", "--no-hostname"), "bool", False, "Do not add the host label.", CORE),
    Flag(
        "log_format", ("--log-format",), "choice", "auto",
        "Log format: json, console, or auto (console on a terminal, JSON otherwise).",
        CORE, choices=("auto", "json", "console"),
    ),
    Flag(
        "log_level", ("--log-level",), "choice", "info", "Log level.", CORE,
        choices=("debug", "info", "warning", "error"),
    ),
    Flag(
        "xid_count_window_ms", ("--xid-count-window-size",), "int", 300000,
        "Window of DCGM_EXP_XID_ERRORS_COUNT, in ms.", CORE, metavar="MS",
    ),
    # --- pod attribution ---
    Flag("kubernetes", ("-k", "--kubernetes"), "bool", False, "Map GPUs to pods through the kubelet.", PODS),
    Flag(
        "pod_resources_socket", ("--pod-resources-kubelet-socket",), "str",
        "/var/lib/kubelet/pod-resources/kubelet.sock", "Kubelet PodResources socket.", PODS, metavar="PATH",
    ),
    Flag(
        "kubernetes_gpu_id_type", ("--kubernetes-gpu-id-type",), "choice", "uid",
        "dcgm-exporter's switch between UUID ids (GPU-/MIG-) and GKE device names (nvidia<N>[/gi<M>]). "
        "Accepted for compatibility: both forms are always recognised, so a wrong setting cannot lose labels.",
        PODS, choices=("uid", "device-name"),
    ),
    Flag(
        "nvidia_resource_names", ("--nvidia-resource-names",), "str", "",
        "Extra resource names (comma list) that carry NVIDIA GPUs.", PODS, metavar="LIST",
    ),
    Flag(
        "kubernetes_shared_gpus", ("--kubernetes-shared-gpus",), "choice", "per-pod",
        "Shared GPUs: per-pod (one series per container, with a vgpu label) or first-pod (one series per device).",
        PODS, choices=("per-pod", "first-pod"),
    ),
    Flag("kubernetes_enable_pod_uid", ("--kubernetes-enable-pod-uid",), "bool", False, "Add a pod_uid label.", PODS),
    Flag(
        "kubernetes_enable_pod_labels", ("--kubernetes-enable-pod-labels",), "bool", False,
        "Add sanitised pod labels (watched from the API server, this node only).", PODS,
    ),
    Flag(
        "kubernetes_pod_labels_allowlist", ("--kubernetes-pod-labels-allowlist",), "str", ".*",
        "Regex of pod label names to add.", PODS, metavar="REGEX",
    ),
    Flag(
        "kubernetes_dra", ("--kubernetes-dra",), "bool", False,
        "Map DRA claims (driver gpu.nvidia.com) through ResourceSlices from the API server.", PODS,
    ),
    Flag(
        "kubeconfig", ("--kubeconfig",), "optional", None,
        "Kubeconfig for API server features (default: in-cluster).", PODS, metavar="PATH",
    ),
    # --- health ---
    Flag(
        "state_dir", ("--state-dir",), "str", "/var/lib/gpu-health-exporter",
        "Directory for the persisted health state and the control socket.", HEALTH, metavar="DIR",
    ),
    Flag(
        "health_fence_xids", ("--health-fence-xids",), "str", "", "Extra XIDs that fence a GPU.", HEALTH,
        metavar="LIST",
    ),
    Flag(
        "health_warn_xids", ("--health-warn-xids",), "str", "", "XIDs that only degrade a GPU.", HEALTH, metavar="LIST",
    ),
    Flag(
        "health_ignore_xids", ("--health-ignore-xids",), "str", "", "XIDs counted but never acted on.", HEALTH,
        metavar="LIST",
    ),
    Flag(
        "health_nvml_timeout_grace_s", ("--health-nvml-timeout-grace",), "int", 30,
        "Seconds a device's NVML reads may time out before it is fenced.", HEALTH, metavar="S",
    ),
    Flag(
        "health_slowdown_s", ("--health-slowdown-seconds",), "int", 300,
        "Seconds of sustained HW thermal or power-brake slowdown before a GPU is degraded.", HEALTH, metavar="S",
    ),
    Flag(
        "health_auto_recover", ("--health-auto-recover",), "bool", False,
        "Clear a fenced GPU automatically after a detected GPU reset.", HEALTH,
    ),
    Flag(
        "kubernetes_node_status", ("--kubernetes-node-status",), "bool", False,
        "Publish a Node condition and Events for GPU health (needs the API server).", HEALTH,
    ),
    # --- device plugin ---
    Flag("device_plugin", ("--device-plugin",), "bool", False, "Run the kubelet device plugin.", PLUGIN),
    Flag("resource_name", ("--resource-name",), "str", "nvidia.com/gpu", "Resource name to advertise.", PLUGIN),
    Flag(
        "device_plugin_dir", ("--device-plugin-dir",), "str", "/var/lib/kubelet/device-plugins",
        "Kubelet device plugin directory.", PLUGIN, metavar="DIR",
    ),
    Flag(
        "mig_strategy", ("--mig-strategy",), "choice", "none", "MIG strategy.", PLUGIN,
        choices=("none", "single", "mixed"),
    ),
    Flag("replicas", ("--replicas",), "int", 1, "Time-slicing replicas per GPU.", PLUGIN, metavar="N"),
    Flag(
        "device_list_strategy", ("--device-list-strategy",), "choice", "envvar",
        "How Allocate passes devices: envvar (NVIDIA_VISIBLE_DEVICES) or cdi (cdi_devices).", PLUGIN,
        choices=("envvar", "cdi"),
    ),
)


@dataclass(frozen=True)
class Config:
    address: str = ":9400"
    collect_interval_ms: int = 5000
    collectors: str | None = None
    devices: str = "f"
    device_timeout_ms: int = 2000
    nvml_library: str | None = None
    simulate: str | None = None
    hostname_label: str = "Hostname"
    no_hostname: bool = False
    log_format: str = "auto"
    log_level: str = "info"
    xid_count_window_ms: int = 300000
    kubernetes: bool = False
    pod_resources_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    kubernetes_gpu_id_type: str = "uid"
    nvidia_resource_names: str = ""
    kubernetes_shared_gpus: str = "per-pod"
    kubernetes_enable_pod_uid: bool = False
    kubernetes_enable_pod_labels: bool = False
    kubernetes_pod_labels_allowlist: str = ".*"
    kubernetes_dra: bool = False
    kubeconfig: str | None = None
    state_dir: str = "/var/lib/gpu-health-exporter"
    health_fence_xids: str = ""
    health_warn_xids: str = ""
    health_ignore_xids: str = ""
    health_nvml_timeout_grace_s: int = 30
    health_slowdown_s: int = 300
    health_auto_recover: bool = False
    kubernetes_node_status: bool = False
    device_plugin: bool = False
    resource_name: str = "nvidia.com/gpu"
    device_plugin_dir: str = "/var/lib/kubelet/device-plugins"
    mig_strategy: str = "none"
    replicas: int = 1
    device_list_strategy: str = "envvar"

    @property
    def listen(self) -> tuple[str, int]:
        return parse_address(self.address)

    @property
    def host_label(self) -> str | None:
        return None if self.no_hostname else self.hostname_label


def parse_address(address: str) -> tuple[str, int]:
    """':9400' -> ('', 9400); '127.0.0.1:9400'; '[::1]:9400'."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(\d{1,5})", address)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"--address {address!r}: expected [host]:port, e.g. :9400 or 127.0.0.1:9400")
    return m.group(1).strip("[]"), int(m.group(2))


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(flag: Flag, raw: str, where: str) -> Any:
    if flag.kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{where}: {raw!r} is not a whole number") from None
    if flag.kind == "bool":
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{where}: {raw!r} is not a boolean (true/false)")
    if flag.kind == "choice" and raw not in flag.choices:
        raise ConfigError(f"{where}: {raw!r} is not one of {', '.join(flag.choices)}")
    return raw


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
    from exporter import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in FLAGS:
        group = groups.setdefault(flag.section, parser.add_argument_group(flag.section))
        help_text = f"{flag.help} [env {flag.env}]"
        if flag.kind == "bool":
            group.add_argument(*flag.names, dest=flag.dest, action="store_true", default=None, help=help_text)
        elif flag.dest == "simulate":
            group.add_argument(
                *flag.names, dest=flag.dest, nargs="?", const="", default=None, metavar=flag.metavar, help=help_text
            )
        else:
            group.add_argument(
                *flag.names, dest=flag.dest, default=None, metavar=flag.metavar or flag.dest.upper(), help=help_text,
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
            values[flag.dest] = given if flag.kind == "bool" else _convert(flag, given, flag.long_name)
        elif flag.env in env:
            values[flag.dest] = _convert(flag, env[flag.env], f"environment variable {flag.env}")
        else:
            values[flag.dest] = flag.default
    cfg = Config(**values)
    validate(cfg)
    return cfg


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")


def validate(cfg: Config) -> None:
    from exporter.devices import parse_device_selector

    parse_address(cfg.address)
    _positive("--collect-interval", cfg.collect_interval_ms, 100)
    _positive("--device-timeout", cfg.device_timeout_ms, 10)
    _positive("--xid-count-window-size", cfg.xid_count_window_ms, 1000)
    _positive("--replicas", cfg.replicas)
    _positive("--health-nvml-timeout-grace", cfg.health_nvml_timeout_grace_s, 0)
    _positive("--health-slowdown-seconds", cfg.health_slowdown_s, 0)
    parse_device_selector(cfg.devices)
    if cfg.nvml_library is not None and cfg.simulate is not None:
        raise ConfigError("--nvml-library and --simulate exclude each other")
    try:
        re.compile(cfg.kubernetes_pod_labels_allowlist)
    except re.error as exc:
        raise ConfigError(f"--kubernetes-pod-labels-allowlist: invalid regex: {exc}") from None


def config_fields_match_flags() -> bool:
    """Used by a test: the Config dataclass and the FLAGS table must agree."""
    return [f.name for f in fields(Config)] == [f.dest for f in FLAGS] and all(
        getattr(Config(), f.dest) == f.default for f in FLAGS
    )

