"""labkit.quant.evaluate: weights swapped in and restored, metrics sane, bits per weight exact.
The tiny random Llama is conftest's ``tiny_quant``; notebook 03's study code (scoreboard,
sensitivity, mixed precision) is tested in test_study_quantization_error."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.quant import evaluate as ev


def test_layers_are_the_blocks_linears(tiny_quant) -> None:
    model, cache, _, _ = tiny_quant
    assert len(cache.layers) == 2 * 7
    assert all(".layers." in n for n in cache.layers)


def test_reference_scores_itself_perfectly(tiny_quant) -> None:
    model, _, windows, ref = tiny_quant
    s = ev.score(model, windows, ref)
    assert s.delta_ppl == 0.0 and s.same_top_pct == 100.0
    assert abs(s.mean_kld) < 1e-6  # KL of a distribution with itself: zero but for rounding
    assert ref.tokens == 64 and math.isfinite(ref.ppl)


def test_quantized_context_swaps_and_restores(tiny_quant) -> None:
    model, cache, windows, ref = tiny_quant
    before = {n: m.weight.clone() for n, m in cache.layers.items()}
    with ev.quantized(cache, ev.uniform(cache, "mlx-affine2-g32")):
        s2 = ev.score(model, windows, ref)
        changed = any(not torch.equal(before[n], m.weight) for n, m in cache.layers.items())
    assert changed
    assert all(torch.equal(before[n], m.weight) for n, m in cache.layers.items())
    with ev.quantized(cache, ev.uniform(cache, "mlx-affine8-g32")):
        s8 = ev.score(model, windows, ref)
    # fewer bits, more damage (a loose, robust ordering: 2-bit vs 8-bit)
    assert s2.mean_kld > s8.mean_kld > 0
    assert s8.same_top_pct >= s2.same_top_pct


def test_bpw_counts_every_tensor(tiny_quant) -> None:
    _, cache, _, _ = tiny_quant
    assert ev.assignment_bpw(cache, ev.uniform(cache, "gguf-q8_0")) == 8.5
    assert ev.assignment_bpw(cache, {}) == 16.0


def test_unknown_layers_are_refused(tiny_quant) -> None:
    _, cache, _, _ = tiny_quant
    with pytest.raises(ValueError, match="lacks"), ev.quantized(cache, {"nope": "fp16"}):
        pass


def test_heldout_windows_checks_the_request(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="heldout_slice"):
        ev.heldout_windows(tmp_path, 1, 8)


# --------------------------------------------------------------------------- windows and intervals


def _slice(tmp_path, rows: int = 6, width: int = 17):
    import numpy as np
    from safetensors.numpy import save_file

    windows = np.arange(rows * width, dtype=np.int32).reshape(rows, width) % 64
    save_file({"windows": windows}, str(tmp_path / "heldout_slice.safetensors"))
    return windows


def test_heldout_windows_from_a_start_row_are_disjoint(tmp_path) -> None:
    full = _slice(tmp_path)
    calib = ev.heldout_windows(tmp_path, 2, 8)
    evalw = ev.heldout_windows(tmp_path, 4, 16, start=2)
    assert calib.tolist() == full[:2, :9].tolist() and evalw.tolist() == full[2:6].tolist()
    with pytest.raises(ValueError, match="from window 3"):
        ev.heldout_windows(tmp_path, 4, 8, start=3)
    with pytest.raises(ValueError, match="start >= 0"):
        ev.heldout_windows(tmp_path, 1, 8, start=-1)


def test_window_sums_give_the_scores_over_any_selection(tiny_quant) -> None:
    import numpy as np

    model, cache, windows, ref = tiny_quant
    with ev.quantized(cache, ev.uniform(cache, "mlx-affine3-g32")):
        sums = ev.window_sums(model, windows, ref)
        s = ev.score(model, windows, ref)
    assert sums.scores() == s and sums.tokens.tolist() == [32, 32]
    assert s.ppl == pytest.approx(math.exp((sums.nll.sum()) / 64))
    assert ref.ppl == pytest.approx(math.exp(sums.ref_nll.sum() / 64))
    one = sums.metrics(np.array([[1, 1]]))  # a resample that drew window 1 twice
    assert one["mean_kld"][0] == pytest.approx(sums.kld[1] / 32)


def test_bootstrap_intervals_are_seeded_and_bracket_the_estimate(tiny_quant) -> None:
    model, cache, windows, ref = tiny_quant
    with ev.quantized(cache, ev.uniform(cache, "mlx-affine2-g32")):
        sums = ev.window_sums(model, windows, ref)
    ci = ev.bootstrap_intervals(sums, seed=0)
    assert ci == ev.bootstrap_intervals(sums, seed=0)
    s = sums.scores()
    for metric in ("ppl", "delta_ppl", "mean_kld", "same_top_pct"):
        lo, hi = ci[metric]
        assert lo <= getattr(s, metric) <= hi and lo < hi, metric
    # the two windows' own values are the extremes any resample can reach
    per_window = sorted(sums.kld / sums.tokens)
    assert ci["mean_kld"][0] >= per_window[0] and ci["mean_kld"][1] <= per_window[1]
    single = ev.WindowSums(*(a[:1] for a in (sums.nll, sums.ref_nll, sums.kld, sums.same, sums.tokens)))
    lo, hi = ev.bootstrap_intervals(single, seed=3)["mean_kld"]
    assert lo == hi == single.scores().mean_kld  # one window: nothing to resample


def test_quant_cache_first_blocks_and_exact(tiny_quant, tiny_quant_fp16) -> None:
    model, cache, _, _ = tiny_quant
    first = ev.QuantCache(model, first_blocks=1)
    assert list(first.layers) == [n for n in cache.layers if ev.layer_index(n) == 0]
    with pytest.raises(ValueError, match="first_blocks"):
        ev.QuantCache(model, first_blocks=0)
    name = next(iter(cache.layers))
    assert not cache.exact(name, "fp16")  # random fp32 weights are not fp16 values
    half = tiny_quant_fp16[1]
    assert half.exact(name, "fp16") and not half.exact(name, "mlx-affine4-g32")
