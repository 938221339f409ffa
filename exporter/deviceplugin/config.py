"""Device plugin configuration and the names derived from it (resources, sockets)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import get_args

from exporter.config import DEFAULTS, DeviceListStrategy, MigStrategy

MIG_STRATEGIES: tuple[str, ...] = get_args(MigStrategy)
DEVICE_LIST_STRATEGIES: tuple[str, ...] = get_args(DeviceListStrategy)
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
    """What the `--device-plugin*`, `--resource-name`, `--mig-strategy`, `--replicas` and
    `--device-list-strategy` flags configure. Validated on construction: an invalid config cannot exist."""

    resource_name: str = DEFAULT_RESOURCE_NAME
    plugin_dir: str = DEFAULT_PLUGIN_DIR
    mig_strategy: MigStrategy = DEFAULTS.mig_strategy
    replicas: int = DEFAULTS.replicas
    device_list_strategy: DeviceListStrategy = DEFAULTS.device_list_strategy

    def __post_init__(self) -> None:
        self.validate()

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
        if self.device_list_strategy not in DEVICE_LIST_STRATEGIES:
            raise ValueError(
                f"device list strategy {self.device_list_strategy!r} is not one of {', '.join(DEVICE_LIST_STRATEGIES)}"
            )
        check_socket_path(self.plugin_dir, self.resource_name)
