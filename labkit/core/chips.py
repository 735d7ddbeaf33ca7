"""Facts about Apple silicon that several studies read, each stated once with its source.

* :data:`CHIPS`: the unified-memory bandwidth of each M-series chip (the ceiling of a
  memory-bound decode: every generated token reads every weight once).
* :data:`MAC_MEMORY_GB`: the unified-memory sizes Apple-silicon Macs are sold with.
* :func:`mac_gpu_share` / :func:`mac_gpu_budget_bytes`: how much of that memory the GPU may use by
  default (Metal's recommended working set, measured at 16 and 128 GB and interpolated between:
  :data:`MAC_BUDGET_SOURCE` says where the numbers come from).

Notebook 02 draws its roofline from the bandwidths, notebook 09 its "will it fit" verdicts from the
memory sizes; neither keeps a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkit.core.checks import finite_float


@dataclass(frozen=True)
class Chip:
    """One chip's memory bandwidth and the page that states it."""

    name: str
    bandwidth_gbs: float  # unified-memory bandwidth, GB/s (10^9 bytes/s)
    source: str


_NEWS = "https://www.apple.com/newsroom/"
_M1_PRO_MAX = _NEWS + "2021/10/introducing-m1-pro-and-m1-max-the-most-powerful-chips-apple-has-ever-built/"
_M2 = _NEWS + "2022/06/apple-unveils-m2-with-breakthrough-performance-and-capabilities/"
_M2_PRO_MAX = _NEWS + "2023/01/apple-unveils-m2-pro-and-m2-max-next-generation-chips-for-next-level-workflows/"
_M3 = _NEWS + "2023/10/apple-unveils-m3-m3-pro-and-m3-max-the-most-advanced-chips-for-a-personal-computer/"
_M4_PRO_MAX = _NEWS + "2024/10/apple-introduces-m4-pro-and-m4-max/"

#: Apple-silicon memory bandwidth. Apple states GB/s for every chip here except the M1, whose
#: figure is derived from its memory (LPDDR4X-4266 on a 128-bit bus: 4266e6 * 16 B = 68.25 GB/s).
#: The Max figures are the top configuration's (binned M3 Max: 300 GB/s, M4 Max: 410 GB/s).
CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip("M1", 68.25, "derived: LPDDR4X-4266 x 128-bit (Apple states no GB/s for M1)"),
        Chip("M1 Pro", 200.0, _M1_PRO_MAX),
        Chip("M1 Max", 400.0, _M1_PRO_MAX),
        Chip("M2", 100.0, _M2),
        Chip("M2 Pro", 200.0, _M2_PRO_MAX),
        Chip("M2 Max", 400.0, _M2_PRO_MAX),
        Chip("M2 Ultra", 800.0, _NEWS + "2023/06/apple-introduces-m2-ultra/"),
        Chip("M3", 100.0, _M3),
        Chip("M3 Pro", 150.0, _M3),
        Chip("M3 Max", 400.0, _M3),
        Chip("M4", 120.0, _NEWS + "2024/05/apple-introduces-m4-chip/"),
        Chip("M4 Pro", 273.0, _M4_PRO_MAX),
        Chip("M4 Max", 546.0, _M4_PRO_MAX),
    )
}


def chip(name: str) -> Chip:
    """The chip called ``name`` ("M1 Max"); a KeyError lists the known ones."""
    if name not in CHIPS:
        raise KeyError(f"unknown chip {name!r}; known: {', '.join(CHIPS)}")
    return CHIPS[name]


#: Unified-memory sizes of Apple-silicon Macs (M1 to M4 families: MacBook Air/Pro, mini, iMac,
#: Studio, Pro), in Apple's "GB", which are binary: 16 GB is 16 x 2**30 bytes.
MAC_MEMORY_GB = (8, 16, 24, 32, 36, 48, 64, 96, 128, 192)

#: Metal's default ``recommendedMaxWorkingSetSize`` as a share of RAM, measured on current macOS
#: (default ``sysctl iogpu.wired_limit_mb = 0``): unified-memory GB -> share. 16 GB: 12,713,115,648
#: bytes (llama.cpp's Metal log ``recommendedMaxWorkingSetSize = 12713.12 MB``, in MB of 10^6
#: bytes, on 16 GB M1 and M4 Macs); 128 GB: 107.52 GiB (M5 Max, macOS 26; antirez/ds4 issue #890).
MAC_WORKING_SET_SHARE = {16: 12_713_115_648 / (16 * 2**30), 128: 107.52 / 128}

#: Where the usable share comes from (shown in notebook 09 beside the numbers).
MAC_BUDGET_SOURCE = (
    "Metal's MTLDevice.recommendedMaxWorkingSetSize (developer.apple.com/documentation/metal/"
    "mtldevice/recommendedmaxworkingsetsize), which llama.cpp, MLX and Ollama use as the GPU "
    "memory limit, measured with the default sysctl iogpu.wired_limit_mb = 0 on current macOS: "
    "12,713,115,648 bytes of 16 GB (0.74; llama.cpp's Metal log on M1 and M4 Macs) and 107.52 "
    "GiB of 128 GiB (0.84; M5 Max, macOS 26, antirez/ds4 issue #890 and PR #893). The share is "
    "taken linear in log2(RAM) through those two points, extended below 16 GB and held at 0.84 "
    "above 128 GB: an approximation that errs towards 'does not fit'. Older macOS releases gave "
    "less (2/3 of RAM up to 36 GB, 3/4 above: 21845.34 MB of 32 GB in ollama/ollama issue #434, "
    "49152 MiB of 64 GB in ggml-org/llama.cpp issue #1870), and `sudo sysctl iogpu.wired_limit_mb=N` raises the limit until reboot."
)


def mac_gpu_share(memory_gb: float) -> float:
    """The default share of unified memory Metal lets the GPU use (see MAC_BUDGET_SOURCE).

    Linear in log2(memory) through the measured points of :data:`MAC_WORKING_SET_SHARE`; below
    the smallest the same line goes on down (smaller Macs have kept smaller shares), above the
    largest the share stays put. Both ends err towards "does not fit".
    """
    import math

    memory_gb = finite_float(memory_gb, "memory_gb", positive=True)
    (lo, s_lo), (hi, s_hi) = sorted(MAC_WORKING_SET_SHARE.items())
    t = (math.log2(memory_gb) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return s_lo + min(t, 1.0) * (s_hi - s_lo)


def mac_gpu_budget_bytes(memory_gb: float) -> int:
    """Bytes a Mac with ``memory_gb`` of unified memory lets the GPU use by default (approx.)."""
    return int(memory_gb * 2**30 * mac_gpu_share(memory_gb))
