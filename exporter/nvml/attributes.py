"""Static device facts for label-type fields, and DCGM's GPU instance profile names.

Read once per GPU at discovery (they never change while the GPU stays), each with the NVML
call DCGM uses for the field, so `DCGM_FI_DEV_SERIAL`, `DCGM_FI_DEV_VBIOS_VERSION`, ... carry
the same text as under dcgm-exporter. A fact NVML cannot give is left out: dcgm-exporter
then puts no label either (the value is blank).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pynvml

from exporter.model import dcgm_profile_name
from exporter.nvml.compat import text
from exporter.nvml.errors import GPU_IS_LOST, code

# nvmlBrandType_t -> the text DCGM stores for DCGM_FI_DEV_BRAND (DcgmCacheManager, DCGM_FI_DEV_GPU_BRAND).
BRANDS: dict[int, str] = {
    1: "Quadro",
    2: "Tesla",
    3: "NVS",
    4: "Grid",
    5: "GeForce",
    6: "Titan",
    7: "NVIDIA Virtual Applications",
    8: "NVIDIA Virtual PC",
    9: "NVIDIA Virtual Compute Server",
    10: "NVIDIA RTX Virtual Workstation",
    11: "NVIDIA vGaming",
    12: "Quadro RTX",
    13: "NVIDIA RTX",
    14: "NVIDIA",
    15: "GeForce RTX",
    16: "Titan RTX",
}
_INFOROM_OEM, _INFOROM_ECC, _INFOROM_POWER = 0, 1, 2

_READERS: dict[str, Callable[[Any], str]] = {
    "name": lambda h: text(pynvml.nvmlDeviceGetName(h)),
    "brand": lambda h: BRANDS.get(int(pynvml.nvmlDeviceGetBrand(h)), "Unknown"),
    "serial": lambda h: text(pynvml.nvmlDeviceGetSerial(h)),
    "vbios": lambda h: text(pynvml.nvmlDeviceGetVbiosVersion(h)),
    "inforom_oem": lambda h: text(pynvml.nvmlDeviceGetInforomVersion(h, _INFOROM_OEM)),
    "inforom_ecc": lambda h: text(pynvml.nvmlDeviceGetInforomVersion(h, _INFOROM_ECC)),
    "inforom_power": lambda h: text(pynvml.nvmlDeviceGetInforomVersion(h, _INFOROM_POWER)),
    "inforom_image": lambda h: text(pynvml.nvmlDeviceGetInforomImageVersion(h)),
}


def read_attributes(handle: Any) -> tuple[tuple[str, str], ...]:
    """The facts this GPU gives, as (Label source, value); a lost GPU raises, other errors leave a fact out."""
    facts: list[tuple[str, str]] = []
    for source, read in _READERS.items():
        try:
            value = read(handle)
        except pynvml.NVMLError as err:
            if code(err) == GPU_IS_LOST:
                raise
            continue
        if value:
            facts.append((source, value))
    return tuple(facts)


_MIG_NAME_PROFILE = re.compile(r"MIG\s+(\S+)\s*$")


def mig_profile(mig_handle: Any) -> str:
    """The MIG device's profile in DCGM's form, from its attributes (slice count, memory); when the
    driver cannot give them, the profile in its NVML name without the "+me"-style suffixes."""
    try:
        attrs = pynvml.nvmlDeviceGetAttributes_v2(mig_handle)
        slices, memory_mib = int(attrs.gpuInstanceSliceCount), int(attrs.memorySizeMB)
    except pynvml.NVMLError as err:
        if code(err) == GPU_IS_LOST:
            raise
    else:
        if slices > 0 and memory_mib > 0:
            return dcgm_profile_name(slices, memory_mib)
    match = _MIG_NAME_PROFILE.search(text(pynvml.nvmlDeviceGetName(mig_handle)))
    return match.group(1).split("+", 1)[0] if match else ""
