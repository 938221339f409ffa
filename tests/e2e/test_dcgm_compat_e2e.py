"""dcgm-exporter fidelity through the real daemon, pynvml and the fake NVML.

What a user switching from dcgm-exporter would diff: GPU_I_PROFILE named as DCGM names it (from the
instance's slices and memory, never the "+me" of the NVML name), label fields from the counters file,
the NVLink throughput as DCGM's rate, and violation counters in ns.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.e2e.nvmlnode import NvmlNode
from tests.fakenvmllib import FakeNvmlBuild, load_scenario

COUNTERS = """\
DCGM_FI_DEV_POWER_USAGE, gauge, Power draw (in W).
DCGM_FI_DEV_FB_USED, gauge, Framebuffer memory used (in MiB).
DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL, counter, Total number of NVLink bandwidth counters for all lanes.
DCGM_FI_DEV_POWER_VIOLATION, counter, Throttling duration due to power constraints (in ns).
DCGM_FI_DRIVER_VERSION, label, Driver Version
DCGM_FI_DEV_SERIAL, label, Device Serial Number
DCGM_FI_DEV_VBIOS_VERSION, label, VBIOS version of the device
DCGM_FI_DEV_BRAND, label, Device Brand
DCGM_FI_DEV_POWER_INFOROM_VER, label, Power management object inforom version
"""


def series(text: str, family: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(family + "{")]


def test_mig_profiles_labels_and_units_as_dcgm(fakenvml_build: FakeNvmlBuild, tmp_path: Path) -> None:
    scenario = load_scenario("mig")
    gpu0 = scenario["devices"][0]
    instances = gpu0["mig"]["instances"]
    # A media-extension profile: NVML names the device "... MIG 1g.10gb+me"; DCGM says "1g.10gb".
    instances[2]["profile"] = "1g.10gb+me"
    # 3 slices with 39.5 GiB: DCGM rounds the memory up to whole GiB ("3g.40gb"), whatever the name says.
    instances[0]["profile"] = "3g.39gb"
    instances[0]["memory"]["total"] = 40448 << 20
    gpu1 = scenario["devices"][1]
    gpu1.setdefault("fields", {})["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] = {"start": 10**9, "rate": 3_000_000}  # KiB/s
    gpu1["fields"]["DCGM_FI_DEV_POWER_VIOLATION"] = 2_500_000_000  # ns
    counters = tmp_path / "counters.csv"
    counters.write_text(COUNTERS)
    node = NvmlNode(fakenvml_build, tmp_path, scenario, ["-c", "200", "-f", str(counters)])
    exp = node.exporter
    try:
        exp.wait_ready()
        text = exp.wait_for(lambda t: (node.value(t, "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", gpu="1") or 0) > 0)
    finally:
        assert exp.stop() == 0
    profiles = {
        line.split('GPU_I_ID="')[1].split('"')[0]: line
        for line in series(text, "DCGM_FI_DEV_FB_USED")
        if "GPU_I_ID" in line
    }
    assert 'GPU_I_PROFILE="3g.40gb"' in profiles["2"]
    assert 'GPU_I_PROFILE="1g.10gb"' in profiles["9"] and "+me" not in text
    # The MIG GPU appears only as its instances (dcgm-exporter's -d f), GPU-wide power included.
    power = series(text, "DCGM_FI_DEV_POWER_USAGE")
    assert sum('gpu="0"' in line for line in power) == 4 and all("GPU_I_ID" in s for s in power if 'gpu="0"' in s)
    # Label fields, sorted by name; a fact the board lacks (power inforom object) is no label at all.
    (gpu1_power,) = [line for line in power if 'gpu="1"' in line]
    assert (
        'Hostname="test-node",DCGM_FI_DEV_BRAND="NVIDIA",DCGM_FI_DEV_SERIAL="1650923001001",'
        'DCGM_FI_DEV_VBIOS_VERSION="96.00.99.00.01",DCGM_FI_DRIVER_VERSION="550.90.07"}'
    ) in gpu1_power
    assert "DCGM_FI_DEV_POWER_INFOROM_VER" not in text
    assert re.fullmatch(r"\d+\.\d{6}", gpu1_power.rsplit(" ", 1)[1])  # a DCGM double: six decimals
    # NVLink: DCGM's throughput, KiB/s / 1000, whole (about 3000 here), not the cumulative KiB count.
    nvlink = node.value(text, "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", gpu="1")
    assert nvlink is not None and 2700 <= nvlink <= 3300 and nvlink.is_integer()
    assert node.value(text, "DCGM_FI_DEV_POWER_VIOLATION", gpu="1") == 2_500_000_000  # ns, unscaled
