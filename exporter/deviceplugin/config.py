"""Device plugin configuration and the names derived from it (resources, sockets)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import get_args

from exporter.config import DEFAULTS, DeviceIdStrategy, DeviceListStrategy, MigStrategy
from exporter.deviceplugin.allocate import AllocateOptions, is_cdi, normalise_strategies
from exporter.deviceplugin.cdi import SPEC_EXTENSIONS, GenerateSettings

MIG_STRATEGIES: tuple[str, ...] = get_args(MigStrategy)
DEVICE_LIST_STRATEGIES: tuple[str, ...] = get_args(DeviceListStrategy)
DEVICE_ID_STRATEGIES: tuple[str, ...] = get_args(DeviceIdStrategy)
DEFAULT_PLUGIN_DIR = DEFAULTS.device_plugin_dir
DEFAULT_RESOURCE_NAME = DEFAULTS.resource_name
SOCKET_PREFIX = "gpu-health-exporter-"

# sockaddr_un.sun_path is 108 bytes including the terminating NUL: a longer path cannot be bound at all,
# so reject it at configuration time rather than failing obscurely inside gRPC.
MAX_SOCKET_PATH = 107

# Every replica is a Device in each ListAndWatch message; past this the list (8 GPUs x N) gets large enough to
# slow the kubelet for no scheduling benefit, and a typo such as 10000 should fail loudly.
MAX_REPLICAS = 1024

# Kubernetes extended resource name: "<DNS-1123 subdomain>/<qualified name>", and the domain must not be
# kubernetes.io / requests.* (the API server rejects those for extended resources).
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SOCKET_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PROFILE_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# CDI qualified names (tags.cncf.io/container-device-interface/pkg/parser): vendor is a domain-like
# name, class alphanumerics with - and _, both starting and ending with an alphanumeric.
_CDI_VENDOR = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_CDI_CLASS = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?$")


def validate_resource_name(name: str) -> None:
    """Raise ValueError unless `name` is a valid Kubernetes extended resource name."""
    domain, sep, local = name.partition("/")
    if not sep or "/" in local:
        raise ValueError(f"resource name {name!r} must look like <domain>/<name>, e.g. nvidia.com/gpu")
    if len(domain) > 253 or not _DNS_SUBDOMAIN.match(domain):
        raise ValueError(f"resource name {name!r}: domain {domain!r} is not a lower-case DNS subdomain")
    if domain == "kubernetes.io" or domain.endswith(".kubernetes.io") or domain.startswith("requests."):
        raise ValueError(f"resource name {name!r}: domain {domain!r} is reserved by Kubernetes")
    if len(local) > 63 or not _QUALIFIED_NAME.match(local):
        raise ValueError(
            f"resource name {name!r}: {local!r} must be 1-63 characters of [A-Za-z0-9._-], "
            "starting and ending with an alphanumeric"
        )


def resource_domain(resource_name: str) -> str:
    return resource_name.partition("/")[0]


def mig_resource_name(resource_name: str, profile: str) -> str:
    """`nvidia.com/mig-1g.10gb` for the mixed strategy, in the domain of the configured resource.

    Profiles such as "1g.10gb+me" contain characters a resource name may not; like NVIDIA's plugin
    we map them to "." ("nvidia.com/mig-1g.10gb.me").
    """
    return f"{resource_domain(resource_name)}/mig-{_PROFILE_UNSAFE.sub('.', profile)}"


def socket_name(resource_name: str) -> str:
    """`gpu-health-exporter-nvidia.com-gpu.sock`: one socket per resource, our prefix so we never clash
    with NVIDIA's `nvidia-*.sock` (which may still be present while migrating)."""
    return f"{SOCKET_PREFIX}{_SOCKET_UNSAFE.sub('-', resource_name)}.sock"


def check_socket_path(plugin_dir: str, resource_name: str) -> str:
    path = os.path.join(plugin_dir, socket_name(resource_name))
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(
            f"device plugin socket path {path!r} is {len(path.encode())} bytes; unix sockets allow at most "
            f"{MAX_SOCKET_PATH}: use a shorter --device-plugin-dir"
        )
    return path


@dataclass(frozen=True)
class DevicePluginConfig:
    """What the `--device-plugin*`, `--resource-name`, `--mig-strategy`, `--replicas`, Allocate
    (`--device-list-strategy`, `--device-id-strategy`, `--pass-device-specs`, ...) and CDI flags
    configure. Validated on construction: an invalid config cannot exist."""

    resource_name: str = DEFAULT_RESOURCE_NAME
    plugin_dir: str = DEFAULT_PLUGIN_DIR
    mig_strategy: MigStrategy = DEFAULTS.mig_strategy
    replicas: int = DEFAULTS.replicas
    device_list_strategy: str = DEFAULTS.device_list_strategy  # comma list as typed; see `strategies`
    device_id_strategy: DeviceIdStrategy = DEFAULTS.device_id_strategy
    pass_device_specs: bool = DEFAULTS.pass_device_specs
    dev_root: str = DEFAULTS.dev_root
    mig_minors_file: str = DEFAULTS.mig_minors_file
    cdi_annotation_prefix: str = DEFAULTS.cdi_annotation_prefix
    cdi_kind: str = DEFAULTS.cdi_kind
    nvidia_ctk_path: str = DEFAULTS.nvidia_ctk_path  # "": the spec is kept current by something else
    cdi_generate_args: tuple[str, ...] = DEFAULTS.cdi_generate_args
    cdi_spec_file: str = DEFAULTS.cdi_spec_file
    cdi_spec_dirs: tuple[str, ...] = DEFAULTS.cdi_spec_dirs
    cdi_generate_timeout_s: float = DEFAULTS.cdi_generate_timeout_s

    def __post_init__(self) -> None:
        self.validate()

    @property
    def strategies(self) -> tuple[str, ...]:
        """The device list strategies, aliases resolved (`cdi` -> `cdi-cri`), order kept."""
        return normalise_strategies(self.device_list_strategy)

    @property
    def uses_cdi(self) -> bool:
        return any(is_cdi(s) for s in self.strategies)

    @property
    def generates_cdi_spec(self) -> bool:
        return self.uses_cdi and bool(self.nvidia_ctk_path)

    def allocate_options(self) -> AllocateOptions:
        return AllocateOptions(
            strategies=self.strategies,
            id_strategy=self.device_id_strategy,
            cdi_kind=self.cdi_kind,
            cdi_annotation_prefix=self.cdi_annotation_prefix,
            pass_device_specs=self.pass_device_specs,
            dev_root=self.dev_root,
        )

    def generate_settings(self) -> GenerateSettings:
        return GenerateSettings(
            nvidia_ctk=self.nvidia_ctk_path,
            spec_file=self.cdi_spec_file,
            kind=self.cdi_kind,
            id_strategy=self.device_id_strategy,
            extra_args=tuple(self.cdi_generate_args),
            timeout_s=float(self.cdi_generate_timeout_s),
        )

    def validate(self) -> None:
        validate_resource_name(self.resource_name)
        if not self.plugin_dir or not os.path.isabs(self.plugin_dir):
            raise ValueError(f"device plugin dir {self.plugin_dir!r} must be an absolute path")
        if self.mig_strategy not in MIG_STRATEGIES:
            raise ValueError(f"mig strategy {self.mig_strategy!r} is not one of {', '.join(MIG_STRATEGIES)}")
        # bool is an int subclass; --replicas true is a config mistake, not 1 replica.
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be an integer >= 1, got {self.replicas!r}")
        if self.replicas > MAX_REPLICAS:
            raise ValueError(f"replicas {self.replicas} is above the supported maximum of {MAX_REPLICAS}")
        if not isinstance(self.device_list_strategy, str):
            raise ValueError(f"device list strategy must be a comma list, got {self.device_list_strategy!r}")
        self.strategies  # noqa: B018 -- raises ValueError naming a bad entry
        if self.device_id_strategy not in DEVICE_ID_STRATEGIES:
            raise ValueError(
                f"device id strategy {self.device_id_strategy!r} is not one of {', '.join(DEVICE_ID_STRATEGIES)}"
            )
        for what, path in (("--dev-root", self.dev_root), ("--mig-minors-file", self.mig_minors_file)):
            if not path or not os.path.isabs(path):
                raise ValueError(f"{what} {path!r} must be an absolute path")
        self._validate_cdi()
        check_socket_path(self.plugin_dir, self.resource_name)

    def _validate_cdi(self) -> None:
        vendor, sep, klass = self.cdi_kind.partition("/")
        if not sep or not _CDI_VENDOR.match(vendor) or not _CDI_CLASS.match(klass):
            raise ValueError(
                f"--cdi-kind {self.cdi_kind!r} must be <vendor>/<class>, e.g. k8s.device-plugin.nvidia.com/gpu"
            )
        prefix = self.cdi_annotation_prefix
        if not prefix.endswith("/") or not _DNS_SUBDOMAIN.match(prefix[:-1]) or len(prefix) > 254:
            raise ValueError(
                f"--cdi-annotation-prefix {prefix!r} must be a DNS subdomain followed by '/', e.g. cdi.k8s.io/"
            )
        dirs = tuple(self.cdi_spec_dirs)
        if not dirs or any(not d or not os.path.isabs(d) for d in dirs):
            raise ValueError(f"--cdi-spec-dirs {','.join(dirs)!r} must be a comma list of absolute paths")
        spec = self.cdi_spec_file
        if not os.path.isabs(spec) or not spec.endswith(SPEC_EXTENSIONS):
            raise ValueError(f"--cdi-spec-file {spec!r} must be an absolute path ending in .json or .yaml")
        if self.generates_cdi_spec and os.path.normpath(os.path.dirname(spec)) not in {
            os.path.normpath(d) for d in dirs
        }:
            raise ValueError(
                f"--cdi-spec-file {spec!r} is not in one of --cdi-spec-dirs ({', '.join(dirs)}): "
                "the runtime would never read it"
            )
        if not (self.cdi_generate_timeout_s > 0):
            raise ValueError(f"--cdi-generate-timeout must be > 0, got {self.cdi_generate_timeout_s}")
