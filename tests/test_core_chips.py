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


def test_gpu_budget_is_two_thirds_up_to_36_gb_then_three_quarters() -> None:
    assert chips.mac_gpu_share(36) == 2 / 3 and chips.mac_gpu_share(48) == 3 / 4
    assert chips.mac_gpu_budget_bytes(24) == int(24 * 2**30 * 2 / 3)
    assert chips.mac_gpu_budget_bytes(64) == int(64 * 2**30 * 3 / 4)
    budgets = [chips.mac_gpu_budget_bytes(gb) for gb in chips.MAC_MEMORY_GB]
    assert budgets == sorted(budgets)  # a larger Mac never has a smaller budget
    assert "recommendedMaxWorkingSetSize" in chips.MAC_BUDGET_SOURCE
    for bad in (0, -8, float("nan")):
        with pytest.raises(ValueError, match="memory_gb must be"):
            chips.mac_gpu_share(bad)
