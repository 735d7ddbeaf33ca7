"""labkit.core.bandwidth: the probe's byte counting (with a fake clock), its storage beside the
fingerprint, and the roofline fraction that refuses to exceed 1 + margin.

Every test writes under tmp_path through LABKIT_ROOT; the real probe runs only on small arrays.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from labkit.core import bandwidth, env, paths, results


@pytest.fixture(autouse=True)
def lab_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)
    return tmp_path


class FakeClock:
    """A clock that only the fake kernels move: each kernel call adds its scheduled seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def kernel(self, durations: list[float]):
        schedule = iter(durations)

        def run() -> None:
            self.now += next(schedule)

        return run


def test_time_kernels_counts_bytes_the_stream_way() -> None:
    clock, mib = FakeClock(), 2**20
    kernels = {  # first call of each is the warm-up round: huge, and must not count
        "sum": clock.kernel([100.0, 0.004, 0.002, 0.003]),
        "copy": clock.kernel([100.0, 0.010, 0.008, 0.009]),
        "triad": clock.kernel([100.0, 0.012, 0.012, 0.015]),
    }
    timed = bandwidth.time_kernels(kernels, 64 * mib, repeats=3, warmup=1, clock=clock)
    assert timed["sum"].bytes_per_pass == 64 * mib
    assert timed["copy"].bytes_per_pass == 2 * 64 * mib
    assert timed["triad"].bytes_per_pass == 3 * 64 * mib
    assert timed["sum"].seconds == pytest.approx((0.004, 0.002, 0.003))
    assert timed["sum"].best_gbs == pytest.approx(64 * mib / 0.002 / 1e9)
    assert timed["sum"].median_gbs == pytest.approx(64 * mib / 0.003 / 1e9)
    assert timed["copy"].best_gbs == pytest.approx(2 * 64 * mib / 0.008 / 1e9)
    assert timed["triad"].best_gbs == pytest.approx(3 * 64 * mib / 0.012 / 1e9)


def test_time_kernels_interleaves_rounds_and_syncs() -> None:
    order: list[str] = []
    kernels = {name: (lambda name=name: order.append(name)) for name in ("sum", "copy")}
    syncs = []
    bandwidth.time_kernels(kernels, 1024, repeats=2, warmup=1, sync=lambda: syncs.append(1))
    assert order == ["sum", "copy"] * 3
    assert len(syncs) == 2 * len(order)  # before and after every pass
    with pytest.raises(ValueError, match="repeats"):
        bandwidth.time_kernels(kernels, 1024, repeats=0)


def test_measure_runs_the_real_kernels_on_small_arrays() -> None:
    entry = bandwidth.measure(1, array_bytes=2**20, repeats=2)
    for kernel in bandwidth.KERNEL_ARRAYS:
        assert entry[f"{kernel}_gbs"] > 0 and entry[f"{kernel}_gbs"] >= entry[f"{kernel}_median_gbs"]
    assert entry["threads"] == 1 and entry["device"] == "cpu" and entry["array_bytes"] == 2**20
    assert entry["run_id"] == results.current_run()[0]
    assert "STREAM" in entry["counting"] and entry["kernels"] == bandwidth.KERNEL_CODE


def test_torch_threads_is_restored() -> None:
    import torch

    before = torch.get_num_threads()
    with bandwidth.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def fake_entry(threads: int, read: float) -> dict:
    return {"device": "cpu", "threads": threads, "read_gbs": read, "copy_gbs": read / 2,
            "triad_gbs": read / 2}


def test_probe_is_stored_beside_the_fingerprint_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_measure(threads: int, device: str = "cpu", **kw: object) -> dict:
        calls.append(threads)
        return fake_entry(threads, 30.0 + threads)

    monkeypatch.setattr(bandwidth, "measure", fake_measure)
    results.record("s1", "m", 1.0, "ms")  # writes the fingerprint file
    assert bandwidth.read_bandwidth_gbs(1) == 31.0
    assert bandwidth.read_bandwidth_gbs(2) == 32.0
    assert bandwidth.read_bandwidth_gbs(1) == 31.0  # stored: not measured again
    assert calls == [1, 2]
    path = paths.results_dir() / "machines" / f"{env.machine_id()}.bandwidth.json"
    saved = json.loads(path.read_text())
    assert saved["machine_id"] == env.machine_id() and set(saved["probes"]) == {"cpu/1", "cpu/2"}
    fingerprint = path.parent / f"{env.machine_id()}.json"  # untouched: same machine id
    assert json.loads(fingerprint.read_text()) == env.fingerprint()
    bandwidth.probe(1, refresh=True)
    assert calls == [1, 2, 1]


def test_lookup_finds_each_rows_machine_and_threads() -> None:
    bandwidth.store(fake_entry(2, 40.0))
    df = pd.DataFrame({"machine": [env.machine_id()] * 3, "device": ["cpu"] * 3,
                       "threads": [2.0, 1.0, math.nan]})
    found = bandwidth.lookup(df).tolist()
    assert found[0] == 40.0 and math.isnan(found[1]) and math.isnan(found[2])
    assert bandwidth.lookup(df, "copy").iloc[0] == 20.0
    assert bandwidth.lookup(df.iloc[:0]).empty


def test_default_array_bytes_dwarfs_the_cache_and_fits_ram() -> None:
    gib, mib = 2**30, 2**20
    assert bandwidth.default_array_bytes(32 * mib, 24 * gib) == gib
    assert bandwidth.default_array_bytes(300 * mib, 126 * gib) == 4 * gib
    assert bandwidth.default_array_bytes(0, 8 * gib) == gib // 2  # three arrays: RAM / 16 each


def test_roofline_arithmetic() -> None:
    assert bandwidth.roofline_seconds(2e9, 10.0) == pytest.approx(0.2)
    assert bandwidth.roofline_fraction(1e9, 0.2, 10.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bandwidth_gbs"):
        bandwidth.roofline_seconds(1.0, 0.0)
    with pytest.raises(ValueError, match="seconds_per_token"):
        bandwidth.roofline_fraction(1.0, 0.0, 1.0)


def test_a_fraction_above_one_plus_margin_means_the_instrument_failed() -> None:
    # 1 GB in 0.08 s at 10 GB/s: 1.25x the limit, impossible
    assert bandwidth.roofline_fraction(1e9, 0.08, 10.0) == pytest.approx(1.25)  # old default
    assert bandwidth.roofline_fraction(1e9, 0.095, 10.0, margin=0.1) == pytest.approx(1 / 0.95)
    with pytest.raises(bandwidth.InstrumentFailed, match="instrument failed"):
        bandwidth.roofline_fraction(1e9, 0.08, 10.0, margin=0.1)
    with pytest.raises(ValueError, match="margin"):
        bandwidth.roofline_fraction(1e9, 0.2, 10.0, margin=-0.1)


def test_the_kv_cache_study_uses_the_core_roofline() -> None:
    from labkit.studies import kv_cache

    assert kv_cache.roofline_fraction is bandwidth.roofline_fraction
    assert kv_cache.roofline_seconds is bandwidth.roofline_seconds


def test_read_bandwidth_is_the_better_reader() -> None:
    entry = bandwidth.measure(1, array_bytes=2**20, repeats=2)
    assert entry["reader"] in bandwidth.READERS
    assert entry["read_gbs"] == max(entry["sum_gbs"], entry["gemv_gbs"])
    assert entry["read_median_gbs"] == entry[f"{entry['reader']}_median_gbs"]
    with pytest.raises(ValueError, match="multiple of 4096"):
        bandwidth.stream_kernels(4096 + 4)


def test_a_probe_of_an_older_version_is_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bandwidth, "measure", lambda threads, device="cpu", **kw: fake_entry(threads, 50.0)
                        | {"probe": bandwidth._PROBE_VERSION})
    results.record("s1", "m", 1.0, "ms")
    bandwidth.store(fake_entry(1, 10.0) | {"probe": bandwidth._PROBE_VERSION - 1})
    assert bandwidth.read_bandwidth_gbs(1) == 50.0
