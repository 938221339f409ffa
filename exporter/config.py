"""Every command-line flag, declared once, each also settable through the environment.

Each field of `Config` is one flag: its declaration carries the names, help, section, default
(as a user would type it), choices and the parser that turns text into the field's typed value.
From it come argparse, the environment fallback, validation messages, the typed defaults other
modules import (`DEFAULTS`) and the generated configuration reference (docs/configuration.md),
so they can never disagree. The machinery (parsers, `flag`, argv and the environment) is
exporter/flags.py's.
"""

# Config's fields are declared by calls to flag() (exporter/flags.py), which return dataclasses.field(...) objects.
# ruff: noqa: RUF009

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, NamedTuple, get_args

from exporter import __version__
from exporter.devices import DeviceSelector
from exporter.flags import (
    ENV_PREFIX,
    ArgumentParser,
    Flag,
    ListenAddress,
    Where,
    add_flags,
    device_selector,
    filesystem_path,
    flag,
    given_values,
    integer,
    listen_address,
    millis_as_seconds,
    name_list,
    regex,
    seconds,
    xid_list,
)
from exporter.flags import ConfigError as ConfigError  # the error parse_config raises
from exporter.labels import MigLayout
from podresources import DEFAULT_SOCKET

HostnameLabel = Literal["Hostname", "hostname"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
GpuIdType = Literal["uid", "device-name"]
SharedGpus = Literal["per-pod", "first-pod"]
ProcessMetrics = Literal["off", "per-pod", "per-pid"]
MigStrategy = Literal["none", "single", "mixed"]
# One entry of --device-list-strategy (a comma list, as NVIDIA's); "cdi" is our old name of "cdi-cri".
DeviceListStrategy = Literal["envvar", "volume-mounts", "cdi-annotations", "cdi-cri", "cdi"]
DeviceIdStrategy = Literal["uuid", "index"]


CORE, PODS, HEALTH, PLUGIN = "Core", "Pod attribution", "Health", "Device plugin"
SCHEDULER, PROXY, WEB = "Reaching the scheduler", "Device plugin proxy", "HTTP and TLS"

DRA_TAINT_EFFECTS = ("NoSchedule", "NoExecute")
NODE_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# A qualified name (optional DNS-subdomain prefix and "/"), as Kubernetes checks a taint key.
_TAINT_KEY = re.compile(
    r"^(?:[a-z0-9]([-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_TAINT_VALUE = re.compile(r"^(?:[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class NodeTaint(NamedTuple):
    """--health-node-taint KEY[=VALUE]:EFFECT, as kubectl taint writes one."""

    key: str
    value: str
    effect: str

    def __str__(self) -> str:
        return f"{self.key}={self.value}:{self.effect}" if self.value else f"{self.key}:{self.effect}"


def node_taint(raw: str, at: Where) -> NodeTaint:
    spec, sep, effect = raw.strip().rpartition(":")
    if not sep:
        raise ConfigError(
            f"{at.origin}: {raw!r} is not KEY[=VALUE]:EFFECT (e.g. gpu-health-exporter/unhealthy:NoSchedule)"
        )
    key, _, value = spec.partition("=")
    if effect not in NODE_TAINT_EFFECTS:
        raise ConfigError(f"{at.origin}: effect {effect!r} is not one of {', '.join(NODE_TAINT_EFFECTS)}")
    if len(key) > 316 or not _TAINT_KEY.match(key) or len(key.rpartition("/")[0]) > 253:
        raise ConfigError(f"{at.origin}: taint key {key!r} is not a qualified name ([prefix/]name)")
    if not _TAINT_VALUE.match(value):
        raise ConfigError(f"{at.origin}: taint value {value!r} is not a label value (63 characters, alphanumeric, -_.)")
    return NodeTaint(key, value, effect)


def dra_taint_effect(raw: str, at: Where) -> str | None:
    """--dra-device-taints: the effect of the rules, or None (off)."""
    value = raw.strip()
    if value.lower() in ("", "off", "false"):
        return None
    for effect in DRA_TAINT_EFFECTS:
        if value.lower() == effect.lower():
            return effect
    raise ConfigError(f"{at.origin}: {raw!r} is not one of off, {', '.join(DRA_TAINT_EFFECTS)}")


def device_list_strategies(raw: str, at: Where) -> str:
    """--device-list-strategy: a comma list of known strategies, kept as typed (blanks dropped)."""
    items = [p.strip() for p in raw.split(",") if p.strip()]
    choices = get_args(DeviceListStrategy)
    for item in items:
        if item not in choices:
            raise ConfigError(f"{at.origin}: {item!r} is not one of {', '.join(choices)}")
    if not items:
        raise ConfigError(f"{at.origin}: give at least one of {', '.join(choices)}")
    return ",".join(items)


def shell_words(raw: str, at: Where) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise ConfigError(f"{at.origin}: {raw!r} is not a valid argument list: {exc}") from None


@dataclass(frozen=True)
class Config:
    """The typed configuration; every field is one flag (declared with `flag`)."""

    # --- core ---
    address: ListenAddress = flag(
        "-a",
        "--address",
        default=":9400",
        parse=listen_address,
        section=CORE,
        help="Address to listen on for HTTP ([host]:port).",
    )
    # --- HTTP and TLS ---
    web_config_file: Path | None = flag(
        "--web-config-file",
        "--web.config.file",
        default=None,
        parse=filesystem_path,
        section=WEB,
        metavar="PATH",
        help="exporter-toolkit web configuration (TLS, mTLS, basic auth, headers); re-read for each new "
        "connection. Default: plain HTTP, no auth.",
    )
    web_unauthenticated_probes: bool = flag(
        "--web-unauthenticated-probes",
        default="false",
        switch=True,
        section=WEB,
        help="Serve /health and /ready without basic auth or a client certificate (for kubelet probes); "
        "off: they follow the same rules as /metrics.",
    )
    http_header_timeout_s: float = flag(
        "--http-header-timeout",
        default="10",
        parse=seconds(1, 600),
        section=WEB,
        metavar="S",
        help="Seconds a client has to send a complete request head, from its first byte; then it is closed.",
    )
    http_idle_timeout_s: float = flag(
        "--http-idle-timeout",
        default="60",
        parse=seconds(1, 3600),
        section=WEB,
        metavar="S",
        help="Seconds a keep-alive connection may sit idle between requests.",
    )
    http_max_connections: int = flag(
        "--http-max-connections",
        default="256",
        parse=integer(4, 65536),
        section=WEB,
        metavar="N",
        help="Open connections at most; beyond it the oldest idle ones are closed first.",
    )
    http_max_header_bytes: int = flag(
        "--http-max-header-bytes",
        default="16384",
        parse=integer(1024, 1 << 20),
        section=WEB,
        metavar="BYTES",
        help="Largest request head (request line and headers) accepted; a longer one gets 431 or 414.",
    )
    collect_interval_s: float = flag(
        "-c",
        "--collect-interval",
        default="5000",
        parse=millis_as_seconds(100, 3_600_000),
        section=CORE,
        metavar="MS",
        help="Collection interval in milliseconds. Scrapes are served from the last collection.",
    )
    collectors: str | None = flag(
        "-f",
        "--collectors",
        default=None,
        section=CORE,
        metavar="PATH",
        help="dcgm-exporter counters CSV (field, type, help). Default: dcgm-exporter's default set plus health fields.",
    )
    devices: DeviceSelector = flag(
        "-d",
        "--devices",
        default="f",
        parse=device_selector,
        section=CORE,
        help="Devices to monitor, dcgm-exporter syntax: f (GPUs, or their MIG instances when MIG is on), "
        "g[:ids] (GPUs), i[:ids] (MIG GPU instances). ids: comma list with ranges, e.g. 0,2-4.",
    )
    mig_layout: MigLayout = flag(
        "--mig-layout",
        default="dcgm",
        choices=get_args(MigLayout),
        section=CORE,
        help="DCGM series of a MIG-enabled GPU: dcgm (as dcgm-exporter: one series per GPU instance for every "
        "field, GPU-wide values repeated, none for the GPU itself) or parent (the GPU's own series for GPU-wide "
        "fields, per-instance series only for per-instance fields). Own gpuhealth_* families are the same "
        "under both.",
    )
    device_timeout_s: float = flag(
        "--device-timeout",
        default="2000",
        parse=millis_as_seconds(10, 600_000),
        section=CORE,
        metavar="MS",
        help="Deadline for reading one device per cycle, in ms. A device past it is served stale and flagged.",
    )
    nvml_library: str | None = flag(
        "--nvml-library",
        default=None,
        section=CORE,
        metavar="PATH",
        help="Load this libnvidia-ml.so.1 instead of the system's (a driver in an unusual place, or the test fake).",
    )
    simulate: str | None = flag(
        "--simulate",
        default=None,
        const="",
        section=CORE,
        metavar="SPEC",
        help="Run on simulated GPUs instead of NVML (default node: 8x H100). SPEC: see docs/simulate.md.",
    )
    hostname_label: HostnameLabel = flag(
        "--hostname-label",
        default="Hostname",
        choices=get_args(HostnameLabel),
        section=CORE,
        help="Name of the host label: Hostname (dcgm-exporter 4.8) or hostname (newer upstream).",
    )
    no_hostname: bool = flag(
        "-n", "--no-hostname", default="false", switch=True, section=CORE, help="Do not add the host label."
    )
    log_format: LogFormat = flag(
        "--log-format",
        default="auto",
        choices=get_args(LogFormat),
        section=CORE,
        help="Log format: json, console, or auto (console on a terminal, JSON otherwise).",
    )
    log_level: LogLevel = flag(
        "--log-level", default="info", choices=get_args(LogLevel), section=CORE, help="Log level."
    )
    xid_count_window_s: float = flag(
        "--xid-count-window-size",
        default="300000",
        parse=millis_as_seconds(1000, 30 * 86_400_000),
        section=CORE,
        metavar="MS",
        help="Window of DCGM_EXP_XID_ERRORS_COUNT, in ms.",
    )
    clock_events_count_window_s: float = flag(
        "--clock-events-count-window-size",
        default="300000",  # dcgm-exporter's default: 5 minutes
        parse=millis_as_seconds(1000, 30 * 86_400_000),
        section=CORE,
        metavar="MS",
        help="Window of DCGM_EXP_CLOCK_EVENTS_COUNT, in ms.",
    )
    # --- pod attribution ---
    kubernetes: bool = flag(
        "-k",
        "--kubernetes",
        default="false",
        switch=True,
        section=PODS,
        help="Map GPUs to pods through the kubelet.",
    )
    pod_resources_socket: str = flag(
        "--pod-resources-kubelet-socket",
        default=DEFAULT_SOCKET,
        section=PODS,
        metavar="PATH",
        help="Kubelet PodResources socket.",
    )
    pod_resources_timeout_s: float = flag(
        "--pod-resources-timeout",
        default="10000",
        parse=millis_as_seconds(100, 600_000),
        section=PODS,
        metavar="MS",
        help="Deadline for one kubelet PodResources call, in ms. A call past it fails; the last good mapping "
        "is kept and ages.",
    )
    kubernetes_gpu_id_type: GpuIdType = flag(
        "--kubernetes-gpu-id-type",
        default="uid",
        choices=get_args(GpuIdType),
        section=PODS,
        help="dcgm-exporter's switch between UUID ids (GPU-/MIG-) and GKE device names (nvidia<N>[/gi<M>]). "
        "Accepted for compatibility: both forms are always recognised, so a wrong setting cannot lose labels.",
    )
    nvidia_resource_names: tuple[str, ...] = flag(
        "--nvidia-resource-names",
        default="",
        parse=name_list,
        section=PODS,
        metavar="LIST",
        help="Extra resource names (comma list) that carry NVIDIA GPUs.",
    )
    kubernetes_shared_gpus: SharedGpus = flag(
        "--kubernetes-shared-gpus",
        default="per-pod",
        choices=get_args(SharedGpus),
        section=PODS,
        help="Shared GPUs: per-pod (one series per container, with a vgpu label) or first-pod (one series per device).",
    )
    kubernetes_enable_pod_uid: bool = flag(
        "--kubernetes-enable-pod-uid", default="false", switch=True, section=PODS, help="Add a pod_uid label."
    )
    kubernetes_enable_pod_labels: bool = flag(
        "--kubernetes-enable-pod-labels",
        default="false",
        switch=True,
        section=PODS,
        help="Add sanitised pod labels (watched from the API server, this node only).",
    )
    kubernetes_pod_labels_allowlist: str = flag(
        "--kubernetes-pod-labels-allowlist",
        default=".*",
        parse=regex,
        section=PODS,
        metavar="REGEX",
        help="Regex of pod label names to add.",
    )
    kubernetes_dra: bool = flag(
        "--kubernetes-dra",
        default="false",
        switch=True,
        section=PODS,
        help="Map DRA claims (driver gpu.nvidia.com) through ResourceSlices from the API server.",
    )
    process_metrics: ProcessMetrics = flag(
        "--process-metrics",
        default="off",
        choices=get_args(ProcessMetrics),
        section=PODS,
        help="Who uses how much of each GPU: the processes NVML lists per GPU and MIG instance, mapped to "
        "pod and container (per-pod: one series per pod and container; per-pid: also per process, for debugging).",
    )
    process_interval: int = flag(
        "--process-interval",
        default="1",
        parse=integer(1, 3600),
        section=PODS,
        metavar="CYCLES",
        help="Read the process lists every N collection cycles (one NVML query per device each time).",
    )
    host_proc: Path = flag(
        "--host-proc",
        default="/proc",
        parse=filesystem_path,
        section=PODS,
        metavar="DIR",
        help="The host's /proc (mounted read-only, or /proc with hostPID) where a GPU process's cgroup names "
        "its pod and container.",
    )
    kubeconfig: str | None = flag(
        "--kubeconfig",
        default=None,
        section=PODS,
        metavar="PATH",
        help="Kubeconfig for API server features (default: in-cluster).",
    )
    # --- health ---
    state_dir: Path = flag(
        "--state-dir",
        default="/var/lib/gpu-health-exporter",
        parse=filesystem_path,
        section=HEALTH,
        metavar="DIR",
        help="Directory for the persisted health state and the control socket.",
    )
    health_fence_xids: tuple[int, ...] = flag(
        "--health-fence-xids",
        default="",
        parse=xid_list,
        section=HEALTH,
        metavar="LIST",
        help="Extra XIDs that fence a GPU.",
    )
    health_warn_xids: tuple[int, ...] = flag(
        "--health-warn-xids",
        default="",
        parse=xid_list,
        section=HEALTH,
        metavar="LIST",
        help="XIDs that only degrade a GPU.",
    )
    health_ignore_xids: tuple[int, ...] = flag(
        "--health-ignore-xids",
        default="",
        parse=xid_list,
        section=HEALTH,
        metavar="LIST",
        help="XIDs counted but never acted on.",
    )
    health_nvml_timeout_grace_s: float = flag(
        "--health-nvml-timeout-grace",
        default="30",
        parse=seconds(0, 86_400),
        section=HEALTH,
        metavar="S",
        help="Seconds a device's NVML reads may time out before it is fenced.",
    )
    health_slowdown_s: float = flag(
        "--health-slowdown-seconds",
        default="300",
        parse=seconds(0, 86_400),
        section=HEALTH,
        metavar="S",
        help="Seconds of sustained HW thermal or power-brake slowdown before a GPU is degraded.",
    )
    health_auto_recover: bool = flag(
        "--health-auto-recover",
        default="false",
        switch=True,
        section=HEALTH,
        help="Clear a fenced GPU automatically after a detected GPU reset.",
    )
    kubernetes_node_status: bool = flag(
        "--kubernetes-node-status",
        default="false",
        switch=True,
        section=HEALTH,
        help="Publish a Node condition and Events for GPU health (needs the API server).",
    )
    # --- reaching the scheduler (the Kubernetes API) ---
    dra_device_taints: str | None = flag(
        "--dra-device-taints",
        default=None,
        const="NoSchedule",
        parse=dra_taint_effect,
        section=SCHEDULER,
        metavar="EFFECT",
        help="Taint each fenced device that a DRA driver publishes in this node's ResourceSlices with a "
        "DeviceTaintRule (effect NoSchedule, the bare flag, or NoExecute; a degraded device gets effect None "
        "where the API has it). Off by default.",
    )
    health_node_taint: NodeTaint | None = flag(
        "--health-node-taint",
        default=None,
        parse=node_taint,
        section=SCHEDULER,
        metavar="KEY[=VALUE]:EFFECT",
        help="Taint this Node while a verdict asks for a node reboot or every GPU of the node is fenced; "
        "removed when that no longer holds. Only this taint is ever touched. Off by default.",
    )
    kubernetes_events: bool = flag(
        "--kubernetes-events",
        default="false",
        switch=True,
        section=SCHEDULER,
        help="Post a Warning Event (reason GpuUnhealthy) on every pod holding a GPU when it is fenced "
        "(also on with --kubernetes-node-status).",
    )
    # --- device plugin proxy (gpu-health-exporter device-plugin-proxy) ---
    upstream_dir: Path | None = flag(
        "--upstream-dir",
        default=None,
        parse=filesystem_path,
        section=PROXY,
        metavar="DIR",
        help="device-plugin-proxy: the host directory NVIDIA's device plugin has mounted as its "
        "/var/lib/kubelet/device-plugins; the proxy serves the Registration API at DIR/kubelet.sock.",
    )
    # --- device plugin ---
    device_plugin: bool = flag(
        "--device-plugin", default="false", switch=True, section=PLUGIN, help="Run the kubelet device plugin."
    )
    resource_name: str = flag(
        "--resource-name", default="nvidia.com/gpu", section=PLUGIN, help="Resource name to advertise."
    )
    device_plugin_dir: str = flag(
        "--device-plugin-dir",
        default="/var/lib/kubelet/device-plugins",
        section=PLUGIN,
        metavar="DIR",
        help="Kubelet device plugin directory.",
    )
    mig_strategy: MigStrategy = flag(
        "--mig-strategy", default="none", choices=get_args(MigStrategy), section=PLUGIN, help="MIG strategy."
    )
    replicas: int = flag(
        "--replicas",
        default="1",
        parse=integer(1, 1024),
        section=PLUGIN,
        metavar="N",
        help="Time-slicing replicas per GPU.",
    )
    device_plugin_take_over: bool = flag(
        "--device-plugin-take-over",
        default="false",
        switch=True,
        section=PLUGIN,
        help="Register a resource even while NVIDIA's device plugin serves it (nvidia-<name>.sock in the plugin "
        "dir). Off: that resource is left to NVIDIA's plugin, and gpuhealth_device_plugin_conflict says so.",
    )
    device_list_strategy: str = flag(
        "--device-list-strategy",
        default="envvar",
        parse=device_list_strategies,
        section=PLUGIN,
        metavar="LIST",
        help="How Allocate passes devices, a comma list of envvar (NVIDIA_VISIBLE_DEVICES), volume-mounts "
        "(/var/run/nvidia-container-devices mounts), cdi-annotations, cdi-cri (cdi_devices); cdi = cdi-cri.",
    )
    device_id_strategy: DeviceIdStrategy = flag(
        "--device-id-strategy",
        default="uuid",
        choices=get_args(DeviceIdStrategy),
        section=PLUGIN,
        help="What names the devices for the runtime (variable, mounts, CDI names): uuid or index.",
    )
    pass_device_specs: bool = flag(
        "--pass-device-specs",
        default="false",
        switch=True,
        section=PLUGIN,
        help="Also pass the device nodes (/dev/nvidia*, MIG capability nodes) in Allocate (non-CDI strategies).",
    )
    dev_root: str = flag(
        "--dev-root",
        default="/",
        section=PLUGIN,
        metavar="DIR",
        help="Root of the NVIDIA device nodes on the host (/ or /run/nvidia/driver), for --pass-device-specs.",
    )
    mig_minors_file: str = flag(
        "--mig-minors-file",
        default="/proc/driver/nvidia-caps/mig-minors",
        section=PLUGIN,
        metavar="FILE",
        help="The driver's MIG capability minors, for --pass-device-specs with MIG devices.",
    )
    cdi_annotation_prefix: str = flag(
        "--cdi-annotation-prefix",
        default="cdi.k8s.io/",
        section=PLUGIN,
        metavar="PREFIX",
        help="Prefix of the CDI annotation keys (cdi-annotations).",
    )
    cdi_kind: str = flag(
        "--cdi-kind",
        default="k8s.device-plugin.nvidia.com/gpu",
        section=PLUGIN,
        metavar="VENDOR/CLASS",
        help="CDI kind of the device names handed out and of the generated spec (NVIDIA's plugin's by default).",
    )
    nvidia_ctk_path: str = flag(
        "--nvidia-ctk-path",
        default="/usr/bin/nvidia-ctk",
        section=PLUGIN,
        metavar="PATH",
        help="nvidia-ctk that generates the CDI spec on every inventory change (CDI strategies); "
        "empty: the spec is kept current by something else.",
    )
    cdi_generate_args: tuple[str, ...] = flag(
        "--cdi-generate-args",
        default="",
        parse=shell_words,
        section=PLUGIN,
        metavar="ARGS",
        help="Extra arguments to 'nvidia-ctk cdi generate' (shell words), e.g. --driver-root=/run/nvidia/driver.",
    )
    cdi_spec_file: str = flag(
        "--cdi-spec-file",
        default="/var/run/cdi/k8s.device-plugin.nvidia.com-gpu.json",
        section=PLUGIN,
        metavar="FILE",
        help="Where the generated CDI spec is written (.json or .yaml, in one of --cdi-spec-dirs).",
    )
    cdi_spec_dirs: tuple[str, ...] = flag(
        "--cdi-spec-dirs",
        default="/etc/cdi,/var/run/cdi",
        parse=name_list,
        section=PLUGIN,
        metavar="DIRS",
        help="The runtime's CDI spec directories: Allocate hands out only CDI names a spec there defines.",
    )
    cdi_generate_timeout_s: float = flag(
        "--cdi-generate-timeout",
        default="60",
        parse=seconds(1, 3600),
        section=PLUGIN,
        metavar="SECONDS",
        help="Time limit of one 'nvidia-ctk cdi generate' run.",
    )

    @property
    def host_label(self) -> str | None:
        return None if self.no_hostname else self.hostname_label


# The flags in declaration order, each with its Config field as `dest`.
FLAGS: tuple[Flag, ...] = tuple(replace(f.metadata["flag"], dest=f.name) for f in fields(Config))

# Every default, typed: what other modules import instead of repeating a literal.
DEFAULTS = Config()


def build_parser(prog: str = "gpu-health-exporter") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="GPU health and metrics exporter (DCGM-compatible) with a kubelet device plugin.",
        epilog=f"Every flag can also be set through the environment: {ENV_PREFIX}<FLAG> "
        f"(e.g. {ENV_PREFIX}COLLECT_INTERVAL=1000). Subcommands: 'health list|clear', 'device-plugin' "
        "(the kubelet device plugin as its own process, fed by the daemon's verdict stream).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_flags(parser, FLAGS)
    return parser


def parse_config(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if environ is None else environ
    ns = build_parser().parse_args(list(argv))
    cfg = Config(**given_values(FLAGS, ns, env))
    validate(cfg)
    return cfg


def api_server_features(cfg: Config) -> list[str]:
    """The flags given that make the daemon talk to the Kubernetes API server (and so read --kubeconfig)."""
    wanted = {
        "--kubernetes-enable-pod-labels": cfg.kubernetes and cfg.kubernetes_enable_pod_labels,
        "--kubernetes-enable-pod-uid": cfg.kubernetes and cfg.kubernetes_enable_pod_uid,
        "--kubernetes-dra": cfg.kubernetes and cfg.kubernetes_dra,
        "--kubernetes-node-status": cfg.kubernetes_node_status,
        "--kubernetes-events": cfg.kubernetes_events,
        "--dra-device-taints": cfg.dra_device_taints is not None,
        "--health-node-taint": cfg.health_node_taint is not None,
    }
    return [name for name, on in wanted.items() if on]


def validate(cfg: Config) -> None:
    """What no single flag can check: each flag's own value was checked when it was parsed."""
    if cfg.nvml_library is not None and cfg.simulate is not None:
        raise ConfigError("--nvml-library and --simulate exclude each other")
    features = api_server_features(cfg)
    if cfg.kubeconfig is not None and features and not os.path.isfile(cfg.kubeconfig):
        # Found out at start-up, not minutes later as a feature that quietly never worked.
        raise ConfigError(f"--kubeconfig {cfg.kubeconfig!r}: no such file (needed by {', '.join(features)})")
