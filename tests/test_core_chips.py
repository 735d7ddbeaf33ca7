"""labkit.core.chips: every Apple-silicon fact carries its source, and the GPU budget follows it."""

from __future__ import annotations

import pytest

from labkit.core import chips


def test_every_chip_has_a_bandwidth_and_a_source() -> None:
    assert len(chips.CHIPS) == 13
    for name, chip in chips.CHIPS.items():
        assert chip.name == name and chip.bandwidth_gbs > 0
        assert chip.source.startswith(("https://www.apple.com/newsroom/", "derived: ")), name
    assert chips.CHIPS["M1"].bandwidth_gbs == pytest.approx(4266e6 * 16 / 1e9, abs=0.01)  # 68.256
    assert chips.chip("M4 Max").bandwidth_gbs == 546.0
    with pytest.raises(KeyError, match="unknown chip 'M9'; known: M1, M1 Pro"):
        chips.chip("M9")


def test_mac_memory_sizes_are_sorted_and_distinct() -> None:
    sizes = chips.MAC_MEMORY_GB
    assert list(sizes) == sorted(set(sizes)) and sizes[0] == 8 and sizes[-1] == 192


def test_gpu_budget_follows_metals_measured_working_set() -> None:
    # the measured points: 0.74 of 16 GB, 0.84 of 128 GB (current macOS)
    assert chips.mac_gpu_budget_bytes(16) == 12_713_115_648
    assert chips.mac_gpu_share(16) == pytest.approx(0.74, abs=1e-4)
    assert chips.mac_gpu_share(128) == pytest.approx(0.84)
    assert chips.mac_gpu_budget_bytes(128) == int(107.52 * 2**30)
    # log-linear through them (64 GB is two thirds of the way in log2), on down below 16 GB
    # (8 GB: a third of the step less), held above 128 GB
    assert chips.mac_gpu_share(64) == pytest.approx(0.74 + (2 / 3) * 0.10, abs=1e-4)
    assert chips.mac_gpu_share(8) == pytest.approx(0.74 - 0.10 / 3, abs=1e-4)
    assert chips.mac_gpu_share(192) == chips.mac_gpu_share(128)
    shares = [chips.mac_gpu_share(gb) for gb in chips.MAC_MEMORY_GB]
    assert shares == sorted(shares) and all(0.7 < s < 0.85 for s in shares)
    budgets = [chips.mac_gpu_budget_bytes(gb) for gb in chips.MAC_MEMORY_GB]
    assert budgets == sorted(budgets)  # a larger Mac never has a smaller budget
    assert "recommendedMaxWorkingSetSize" in chips.MAC_BUDGET_SOURCE
    assert "antirez/ds4 issue #890" in chips.MAC_BUDGET_SOURCE
    for bad in (0, -8, float("nan")):
        with pytest.raises(ValueError, match="memory_gb must be"):
            chips.mac_gpu_share(bad)
