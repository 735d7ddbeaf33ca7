"""labkit.studies.tour (notebook 00): the copy staircase and the read probes it records, and
its figures pass the figure check. Records go to tmp_path through LABKIT_ROOT."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from labkit.core import bandwidth, env, plotting, results
from labkit.studies import tour


@pytest.fixture(autouse=True)
def lab_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    plt.switch_backend("Agg")
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)
    yield tmp_path
    plt.close("all")


def fake_measure(threads: int, device: str = "cpu", **kw: object) -> dict:
    return {"device": device, "threads": threads, "read_gbs": 30.0 + threads,
            "copy_gbs": 20.0, "triad_gbs": 22.0, "read_median_gbs": 29.0, "array_bytes": 2**30,
            "loadavg_start": 0.5, "loadavg_end": 0.6}


@pytest.mark.parametrize(("cores", "counts"), [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]),
                                                (16, [1, 2, 4, 8, 16]), (None, [1])])
def test_probe_threads(cores: int | None, counts: list[int]) -> None:
    assert tour.probe_threads(cores) == counts


def test_sweep_probes_and_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bandwidth, "measure", fake_measure)
    caches = {"L1d": 32 * 1024, "L2": 2**18}
    monkeypatch.setattr(env, "cpu_cache_sizes", lambda: caches)
    bw, dram, recs = tour.bandwidth_sweep([2**14, 2**16, 2**20], 2, 1)
    assert [r["metric"] for r in recs].count("copy_bandwidth_best") == 3
    assert recs[-1]["metric"] == "dram_copy_bandwidth" and recs[-1]["value"] == dram
    assert all(r["threads"] == 1 for r in recs)
    probes, precs = tour.read_probes([1, 2], None, 3)
    assert probes["read_gbs"].tolist() == [31.0, 32.0]
    assert bandwidth.read_bandwidth_gbs(2) == 32.0  # stored for every roofline
    read = [r for r in precs if r["metric"] == "read_bandwidth"]
    assert [(r["threads"], r["value"]) for r in read] == [(1, 31.0), (2, 32.0)]
    plotting.check_figure(tour.plot_bandwidth(bw, dram, caches, "Test CPU", probes, 2))
    table, fig = tour.machines_figure()
    assert table["read GB/s"].tolist() == [31.0, 32.0]
    assert set(table["run_id"]) == {results.current_run()[0]}
    plotting.check_figure(fig)


def test_load_note_says_when_the_machine_was_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(results.RUN_ID_ENV, "r")
    monkeypatch.setenv(results.RUN_LOADAVG_ENV, "99.0")
    assert tour.load_note().endswith(": noisy")
    monkeypatch.setenv(results.RUN_LOADAVG_ENV, "0.0")
    assert "noisy" not in tour.load_note()
