"""labkit.studies.flash_attention (notebook 06): the sweeps' rows, the records they become, the
growth-exponent fit, the other-machines table and the figures.

Bounds: errors against SDPA within tolerances.ATTENTION (float32 rounding of a reordered sum);
peak memory is measured by the allocator (labkit.core.memory), and only compared against the
size of one N x N float32 score matrix, never against a wall clock.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from labkit.core import results, tolerances
from labkit.models import attention_mlx
from labkit.studies import flash_attention as fa

MLX_DEVICE = attention_mlx.device_name() if attention_mlx.available() is None else None
SETUP = fa.Setup(batch=1, heads=2, head_dim=16, causal=True, mlx_device=MLX_DEVICE)
MLX_ROWS = 2 if MLX_DEVICE else 0


def test_setup_checks_its_fields_and_fixes_the_inputs():
    with pytest.raises(ValueError, match="heads"):
        fa.Setup(batch=1, heads=0, head_dim=16, causal=True)
    with pytest.raises(ValueError, match="mlx_device"):
        fa.Setup(batch=1, heads=1, head_dim=16, causal=True, mlx_device="tpu")
    q, k, v = SETUP.qkv(5)
    assert q.shape == (1, 2, 5, 16) and not torch.equal(q, k)
    assert torch.equal(SETUP.qkv(5)[2], v)  # seeded by seed + n
    assert SETUP.runtime_device("mlx_tiled") == ("mlx", MLX_DEVICE)
    assert SETUP.runtime_device("naive") == ("torch", "cpu")
    assert SETUP.score_matrix_bytes(8) == 1 * 2 * 8 * 8 * 4
    assert "torch" in fa.describe(SETUP)


def test_block_of_and_block_param():
    assert fa.block_of("tiled", 32) == 32 == fa.block_of("mlx_tiled", 32)
    assert fa.block_of("sdpa", 32) is None
    assert fa.block_param(float("nan")) is None and fa.block_param(None) is None
    assert fa.block_param(64.0) == 64 and isinstance(fa.block_param(np.float64(64)), int)


def test_exactness_rows_and_records(well_drawn):
    exact = fa.exactness(SETUP, [1, 7, 33], block=8)
    per_length = 2 * (2 + MLX_ROWS)  # causal and not; naive, tiled (+ MLX's two)
    assert len(exact) == 3 * per_length
    assert set(exact.impl) == {"naive", "tiled"} | ({"mlx_tiled", "mlx_sdpa"} if MLX_DEVICE else set())
    assert (exact.max_abs_err <= tolerances.ATTENTION.at("cpu")).all()
    recs = fa.exactness_records(exact, SETUP)
    assert len(recs) == len(exact) and {r["metric"] for r in recs} == {"max_abs_err"}
    blocks = {r["params"]["impl"]: r["params"]["block"] for r in recs}
    assert blocks["naive"] is None and blocks["tiled"] == 8
    assert recs[0]["params"] == dict(impl="naive", seq_len=1, block=None, causal=False,
                                     reference="torch_sdpa", dtype="float32", heads=2, head_dim=16)
    well_drawn(fa.plot_exactness(exact))


def test_fitted_exponent_recovers_a_power_law():
    df = pd.DataFrame({"seq_len": [64, 128, 256, 512], "y": [3.0 * n**2 for n in (64, 128, 256, 512)]})
    assert fa.fitted_exponent(df, "y") == pytest.approx(2.0)
    df["y"] = [7.0 * n for n in df.seq_len]
    assert fa.fitted_exponent(df, "y", last=2) == pytest.approx(1.0)


def test_peak_memory_naive_quadratic_tiled_not(well_drawn):
    """The notebook's memory claim on a small shape: naive holds the N x N scores, tiled not."""
    setup = fa.Setup(batch=1, heads=1, head_dim=8, causal=True)
    mem = fa.peak_memory(setup, [128, 256, 512], block=32)
    assert list(mem.columns) == ["impl", "seq_len", "block", "peak_bytes"] and len(mem) == 9
    exponents = fa.growth_exponents(mem)
    assert exponents["naive"] > 1.7 and exponents["tiled"] < 1.3
    n_max, at_max, s_bytes = fa.peaks_at_largest(mem, setup)
    assert n_max == 512 and at_max["naive"] >= s_bytes > at_max["tiled"]
    table = fa.peak_memory_table(mem, setup)
    assert table["S bytes (formula)"].tolist() == [round(setup.score_matrix_bytes(n) / 2**20, 2)
                                                    for n in (128, 256, 512)]
    recs = fa.peak_memory_records(mem, setup)
    assert {type(r["value"]) for r in recs} == {int}
    assert recs[0]["params"] == dict(impl="naive", seq_len=128, block=None, causal=True, batch=1,
                                     heads=1, head_dim=8, dtype="float32")
    well_drawn(fa.plot_peak_memory(mem, exponents, setup))


def test_peak_memory_without_torch_counter_keeps_only_mlx_rows():
    mem = fa.peak_memory(SETUP, [16, 32], block=8, torch_peaks=False)
    assert set(mem.impl) <= {"mlx_tiled", "mlx_sdpa"} and len(mem) == 2 * MLX_ROWS
    assert fa.torch_peak_missing("cpu") is None
    assert "MPS" in fa.torch_peak_missing("mps")


def test_time_sweep_rows_and_records(well_drawn):
    times = fa.time_sweep(SETUP, [16, 32], block=8, warmup=0, repeats=2)
    assert len(times) == 2 * (3 + MLX_ROWS) and (times.n == 2).all()
    assert (times.p10_ms <= times.ms).all() and (times.ms <= times.p90_ms).all()
    recs = fa.time_records(times, SETUP, load_after=0.5)
    assert len(recs) == 3 * len(times) + 1
    assert [r["metric"] for r in recs[:3]] == ["ms", "ms_p10", "ms_p90"]
    assert recs[0]["params"]["torch_threads"] == torch.get_num_threads()
    assert recs[-1]["metric"] == "load_avg_1min" and recs[-1]["params"]["section"] == "time"
    assert len(fa.time_records(times, SETUP)) == 3 * len(times)
    well_drawn(fa.plot_time(times, SETUP, 8))


def test_load_note_with_and_without_a_load_average():
    assert fa.load_note(1.0, 2.0).startswith("1-minute load average: 1.0 before, 2.0 after")
    assert "unknown" in fa.load_note(None, None)
    load = fa.load_average()
    assert load is None or (math.isfinite(load) and load >= 0)


def test_block_sweep_rows_and_records(well_drawn):
    sweep = fa.block_sweep(SETUP, 40, [8, 16, 64], warmup=0, repeats=1)
    assert list(sweep.block) == [8, 16, 64]
    assert (sweep.max_abs_err <= tolerances.ATTENTION.at("cpu")).all()
    assert (sweep.peak_bytes > 0).all()
    recs = fa.block_sweep_records(sweep, SETUP, 40)
    assert [r["metric"] for r in recs[:5]] == ["ms", "ms_p10", "ms_p90", "max_abs_err", "peak_bytes"]
    assert len(recs) == 5 * 3 and all(r["params"]["sweep"] == "block" for r in recs)
    well_drawn(fa.plot_block_sweep(sweep, SETUP, 40))
    no_peaks = fa.block_sweep(SETUP, 40, [8], warmup=0, repeats=1, torch_peaks=False)
    assert no_peaks.peak_bytes.isna().all()
    assert [r["metric"] for r in fa.block_sweep_records(no_peaks, SETUP, 40)][-1] == "max_abs_err"


def _machine_records() -> pd.DataFrame:
    """Records as results.load_results gives them: two machines, an older duplicate, a record of
    another shape and one of the block sweep (both to be left out)."""
    t = pd.Timestamp("2026-01-01", tz="UTC")
    shape = dict(heads=2, head_dim=16, causal=True)
    rows = [
        dict(metric="peak_bytes", value=100.0, device="cpu", machine="a", created=t,
             params=dict(impl="naive", seq_len=64, **shape)),
        dict(metric="peak_bytes", value=110.0, device="cpu", machine="a", created=t + pd.Timedelta(1, "h"),
             params=dict(impl="naive", seq_len=64, **shape)),
        dict(metric="peak_bytes", value=121.0, device="cuda", machine="b", created=t,
             params=dict(impl="naive", seq_len=64, **shape)),
        dict(metric="ms", value=2.0, device="cuda", machine="b", created=t,
             params=dict(impl="naive", seq_len=64, **shape)),
        dict(metric="ms", value=9.0, device="cpu", machine="a", created=t,
             params=dict(impl="tiled", seq_len=64, heads=8, head_dim=16, causal=True)),
        dict(metric="ms", value=9.0, device="cpu", machine="a", created=t,
             params=dict(impl="tiled", seq_len=64, sweep="block", **shape)),
    ]
    df = pd.DataFrame(rows).assign(study=fa.STUDY, unit="", runtime="torch", model="")
    return df.assign(machine_cpu=df.machine.map({"a": "CPU A", "b": "CPU B"}),
                     machine_gpu=df.machine.map({"a": None, "b": "GPU B"}))


def test_other_machines_keeps_the_newest_of_this_shape_and_names_the_machine(well_drawn):
    others = fa.other_machines(_machine_records(), SETUP)
    assert sorted(others["where"].unique()) == ["CPU A (cpu)", "GPU B (cuda)"]
    assert len(others) == 3  # the older duplicate, the other shape and the block sweep dropped
    assert others[others["where"] == "CPU A (cpu)"].value.tolist() == [110.0]
    assert fa.machines_table(others).shape == (2, 2)
    agreement = fa.peak_agreement(others)
    assert "naive 10.0%" in agreement and "N = [64]" in agreement
    assert fa.peak_agreement(others[others.machine == "a"]) is None
    well_drawn(fa.plot_machines(others, SETUP))


def test_other_machines_of_no_records():
    empty = fa.other_machines(pd.DataFrame(), SETUP)
    assert empty.empty and fa.machines_table(empty).empty and fa.peak_agreement(empty) is None
    import matplotlib.pyplot as plt

    plt.close(fa.plot_machines(empty, SETUP))


def test_records_are_accepted_by_results(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    exact = fa.exactness(SETUP, [7], block=4)
    written = results.record_many(fa.exactness_records(exact, SETUP))
    assert len(written) == len(exact)
    back = results.load_results(fa.STUDY)
    assert sorted(back.value) == sorted(exact.max_abs_err)


def test_memory_claims_tell_quadratic_from_linear():
    at_max = pd.Series({"naive": 3.0 * 2**20, "tiled": 0.5 * 2**20})
    rows = fa.memory_claims({"naive": 1.9, "tiled": 0.4}, at_max, 2**20, 512)
    assert [ok for _, ok, _ in rows] == [True, True, True, True]
    assert rows[2][2] == "3.0 MiB, 3.00 score matrices" and rows[3][2].endswith("6x less than naive for the same output")
    rows = fa.memory_claims({"naive": 1.5, "tiled": 1.4}, pd.Series({"naive": 1.0, "tiled": 2.0**21}), 2**20, 512)
    assert [ok for _, ok, _ in rows] == [False, False, False, False]
