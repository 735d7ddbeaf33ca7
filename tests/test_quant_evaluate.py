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
