"""Model-level quantization: weights restored, metrics sane, the mixed-precision search obeys its
budget. A tiny random Llama (random weights are fine for plumbing, not for conclusions)."""

from __future__ import annotations

import math

import pytest
import torch

from labkit.models.config import LlamaConfig
from labkit.models.llama import Llama
from labkit.quant import evaluate as ev
from labkit.studies import quantization_error as study


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Llama(cfg).eval()
    windows = torch.randint(0, 64, (2, 33))
    return model, ev.QuantCache(model), windows, ev.reference(model, windows)


def test_layers_are_the_blocks_linears(tiny) -> None:
    model, cache, _, _ = tiny
    assert len(cache.layers) == 2 * 7
    assert all(".layers." in n for n in cache.layers)


def test_reference_scores_itself_perfectly(tiny) -> None:
    model, _, windows, ref = tiny
    s = ev.score(model, windows, ref)
    assert s.delta_ppl == 0.0 and s.same_top_pct == 100.0
    assert abs(s.mean_kld) < 1e-6
    assert ref.tokens == 64 and math.isfinite(ref.ppl)


def test_quantized_context_swaps_and_restores(tiny) -> None:
    model, cache, windows, ref = tiny
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


def test_bpw_and_size_count_every_tensor(tiny) -> None:
    model, cache, _, _ = tiny
    assert ev.assignment_bpw(cache, ev.uniform(cache, "gguf-q8_0")) == 8.5
    assert ev.assignment_bpw(cache, {}) == 16.0
    n_lin = sum(m.weight.numel() for m in cache.layers.values())
    n_all = sum(p.numel() for p in model.parameters())
    assert study.model_megabytes(model, cache, {}) == pytest.approx(n_all * 2 / 1e6)
    mb4 = study.model_megabytes(model, cache, ev.uniform(cache, "mlx-affine4-g64"))
    assert mb4 == pytest.approx(((n_all - n_lin) * 16 + n_lin * 4.5) / 8 / 1e6)


def test_mixed_assignment_stays_within_budget_and_spends_it(tiny) -> None:
    model, cache, windows, ref = tiny
    groups = study.units(cache)
    ladder = ["mlx-affine3-g32", "mlx-affine4-g32", "mlx-affine6-g32"]
    kld = study.sensitivity(model, cache, windows, ref, groups, ladder)
    a = study.mixed_assignment(cache, groups, ladder, kld, budget_bpw=5.0)
    bpw = ev.assignment_bpw(cache, a)
    assert 4.0 <= bpw <= 5.0
    assert set(a.values()) <= set(ladder)
    with pytest.raises(ValueError, match="below the cheapest rung"):
        study.mixed_assignment(cache, groups, ladder, kld, budget_bpw=3.0)


def test_unknown_layers_are_refused(tiny) -> None:
    _, cache, _, _ = tiny
    with pytest.raises(ValueError, match="lacks"), ev.quantized(cache, {"nope": "fp16"}):
        pass


def test_heldout_windows_checks_the_request(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="heldout_slice"):
        ev.heldout_windows(tmp_path, 1, 8)


def test_mixed_assignment_is_the_knapsack_optimum(tiny) -> None:
    import itertools

    _, cache, _, _ = tiny
    groups = study.units(cache)
    ladder = ["mlx-affine2-g32", "mlx-affine4-g32", "mlx-affine8-g32"]
    rng = torch.Generator().manual_seed(1)
    kld = {}
    for g in groups:  # fake, decreasing-in-bits sensitivities
        a = float(torch.rand(1, generator=rng)) + 0.1
        kld.update({(g, ladder[0]): a, (g, ladder[1]): a / 8, (g, ladder[2]): a / 100})
    budget = 5.0
    got = study.mixed_assignment(cache, groups, ladder, kld, budget)
    best = None
    for combo in itertools.product(ladder, repeat=len(groups)):
        a = {n: s for g, s in zip(groups, combo, strict=True) for n in groups[g]}
        if ev.assignment_bpw(cache, a) <= budget:
            total = sum(kld[(g, s)] for g, s in zip(groups, combo, strict=True))
            best = total if best is None else min(best, total)
    got_total = sum(kld[(g, got[groups[g][0]])] for g in groups)
    assert got_total == pytest.approx(best)
