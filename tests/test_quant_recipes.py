"""labkit.quant.recipes: llama.cpp's Q4_K_M mix, as src/llama-quant.cpp writes it."""

from __future__ import annotations

import pytest

from labkit.quant import recipes
from labkit.quant.evaluate import assignment_bpw


def test_use_more_bits_picks_half_the_blocks_of_a_32_layer_model() -> None:
    """llama.cpp's own summary of Q4_K_M: Q6_K for half of attention.wv and feed_forward.w2."""
    more = [i for i in range(32) if recipes.use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(30) if recipes.use_more_bits(i, 30)] == [
        0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(8) if recipes.use_more_bits(i, 8)] == [0, 3, 6, 7]


def test_q4_k_m_gives_q6_k_to_v_and_down_of_those_blocks_only() -> None:
    parts = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = [f"model.layers.{i}.{p}" for i in range(8) for p in parts]
    a = recipes.recipe("gguf-q4_k_m", names)
    six = sorted(n for n, s in a.items() if s == "gguf-q6_k")
    assert six == sorted(f"model.layers.{i}.{p}" for i in (0, 3, 6, 7)
                         for p in ("self_attn.v_proj", "mlp.down_proj"))
    assert set(a.values()) == {"gguf-q4_k", "gguf-q6_k"}
    with pytest.raises(ValueError, match="unknown recipe 'q3_k_s'.*gguf-q4_k_m"):
        recipes.recipe("q3_k_s", names)


def test_q4_k_m_costs_more_than_q4_k_and_less_than_q6_k(tiny_quant) -> None:
    _, cache, _, _ = tiny_quant
    a = recipes.q4_k_m(cache.layers)
    bpw = assignment_bpw(cache, a)
    # tiny_quant's 64-input rows are not multiples of 256: Q4_K -> Q5_0, Q6_K -> Q8_0
    assert 5.5 < bpw < 8.5
