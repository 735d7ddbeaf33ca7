"""Study 01 (labkit.studies.kv_cache): the formula against real tensors and published configs,
the roofline arithmetic, the thread picker.

* the byte formula against the bytes of real cache tensors (ours, concatenating, sliding, and
  transformers' DynamicCache) and against published configs (Apple's ~1 GB for Llama 3.1 8B);
* the roofline arithmetic and the random models it measures, which dwarf the CPU caches.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import decisive_llama as _model
from conftest import token_prompt as _prompt

from labkit.inference.kv_cache import ConcatKVCache, KVCache
from labkit.models.config import LlamaConfig
from labkit.models.sizes import (
    decode_bytes_per_token,
    head_dim_of,
    kv_cache_bytes,
    kv_cache_bytes_for_config,
    weight_bytes_per_token,
)
from labkit.studies import kv_cache as ks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_formula_equals_bytes_of_real_cache_tensors():
    model = _model()
    cfg = model.config
    prompt = _prompt(7, b=2)
    pre = KVCache.for_model(model, max_len=40, batch=2)
    cat = ConcatKVCache.for_model(model)
    with torch.no_grad():
        for cache in (pre, cat):
            model(prompt, cache=cache)
            for _ in range(5):
                model(prompt[:, :1], cache=cache)
    assert ks.tensor_bytes(pre) == kv_cache_bytes_for_config(cfg, 40, 4, batch=2)  # allocated
    assert ks.tensor_bytes(cat) == kv_cache_bytes_for_config(cfg, 12, 4, batch=2)  # filled
    assert cat.k[0].shape == ks.cache_shapes(cfg, 12, batch=2)["k"] == (2, 2, 12, 16)
    half = KVCache.for_model(model, max_len=33, dtype=torch.float16)
    assert ks.tensor_bytes(half) == kv_cache_bytes_for_config(cfg, 33, 2)


def test_formula_equals_bytes_of_transformers_dynamic_cache():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=3, num_attention_heads=8,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        out = hf(torch.zeros(1, 9, dtype=torch.long), use_cache=True)
    cache = out.past_key_values
    assert ks.tensor_bytes(cache) == kv_cache_bytes_for_config(cfg.to_dict(), 9, 4)
    assert ks.tensor_bytes(cache) == 2 * 3 * 2 * 8 * 9 * 4


def test_published_configs_and_apples_figure():
    llama31 = ks.published_config(ks.PUBLISHED["Llama 3.1 8B"])
    # 2 x 32 layers x 8 KV heads x 128 x 8192 positions x 2 bytes = 2^30 bytes (1.07 GB)
    got = kv_cache_bytes_for_config(llama31, ks.APPLE_CONTEXT, 2)
    assert got == 2**30
    assert abs(got / 1e9 - ks.APPLE_LLAMA31_8B_CACHE_GB) < 0.1
    llama2 = ks.published_config(ks.PUBLISHED["Llama 2 7B"])
    assert kv_cache_bytes_for_config(llama2, 4096, 2) == 2 * 2**30  # MHA: 4x Llama 3.1's per token
    phi2 = ks.published_config(ks.PUBLISHED["Phi-2"])
    assert head_dim_of(phi2) == 80 and ks.attention_kind(phi2) == "MHA"
    xlam = ks.published_config(ks.PUBLISHED["xLAM-1b"])
    assert kv_cache_bytes_for_config(xlam, 1, 2) == 2 * 24 * 16 * 128 * 2
    table = ks.cache_bytes_table({"Llama 3.1 8B": llama31}, [1024, 8192])
    assert table["bytes"].tolist() == [2**27, 2**30]
    assert table["attention"].tolist() == ["GQA 32:8"] * 2


def test_published_config_errors_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ks, "configs_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ks.published_config("nope")
    (tmp_path / "bad.json").write_text(json.dumps({"num_hidden_layers": "32"}))
    with pytest.raises(ValueError, match=r"bad.json.*num_hidden_layers"):
        ks.published_config("bad")


def test_mha_gqa_mqa_differ_only_in_kv_heads():
    base = ks.published_config(ks.PUBLISHED["Llama 2 7B"])
    variants = ks.attention_variants(base, gqa_group=4)
    sizes = {k: kv_cache_bytes_for_config(v, 1000, 2) for k, v in variants.items()}
    assert sizes["MHA"] == 4 * sizes["GQA"] == 32 * sizes["MQA"]
    assert [ks.attention_kind(v) for v in variants.values()] == ["MHA", "GQA 32:8", "MQA"]
    with pytest.raises(ValueError, match="gqa_group"):
        ks.attention_variants(base, gqa_group=5)


def test_decode_bytes_and_roofline_arithmetic():
    cfg = _model().config
    b = decode_bytes_per_token(cfg, position=99, dtype_bytes=4)
    assert b["kv_read"] == kv_cache_bytes(num_layers=2, num_kv_heads=2, head_dim=16,
                                          positions=100, bytes_per_element=4)
    assert b["kv_write"] == b["kv_read"] // 100
    assert b["total"] == b["weights"] + b["kv_read"] + b["kv_write"]
    # the roofline arithmetic itself lives in labkit.core.bandwidth (tests/test_core_bandwidth.py)


def test_roofline_configs_dwarf_the_caches():
    for size, lo, hi in (("full", 100e6, 300e6), ("quick", 40e6, 100e6)):
        cfg = LlamaConfig(**ks.roofline_config(size))
        n = weight_bytes_per_token(cfg, 1)
        assert lo <= n <= hi, (size, n)
    with pytest.raises(ValueError, match="size"):
        ks.roofline_config("huge")


def test_pick_threads_sets_the_fastest_candidate():
    model = _model()
    before = torch.get_num_threads()
    try:
        best, speeds = ks.pick_threads(model, [1, 2], tokens=2)
        assert set(speeds) == {1, 2} and best in speeds
        assert speeds[best] == max(speeds.values()) and torch.get_num_threads() == best
    finally:
        torch.set_num_threads(before)
    load = ks.load_average()
    assert load is None or load >= 0


def _claims_inputs(model, window=4, **over):
    """What ks.claims reads, from a real model's configs and caches and made-up timings."""
    import pandas as pd

    from labkit.inference.kv_cache import SlidingWindowKVCache

    cfg = model.config
    _, published, variants = ks.memory_table(cfg, "m", [256], 4)
    timings = pd.DataFrame({"cache": ["on", "off", "on", "off"], "prompt_len": [8, 8, 16, 16],
                            "total_s": [1.0, 2.0, 1.0, 3.0], "tpot_ms": [1.0, 2.0, 1.0, 4.0]})
    ring = SlidingWindowKVCache.for_model(model, window=window)
    v = {"update": pd.DataFrame({"length": [64, 1024], "concat_us": [1.0, 9.0], "inplace_us": [1.0, 2.0]}),
         "window_cache": ring, "window_bytes": [kv_cache_bytes_for_config(cfg, window, 4)],
         "same_tokens": True, "e2e": {"concat": (None, torch.zeros(1, 12))}}
    apple = kv_cache_bytes_for_config(published["Llama 3.1 8B"], ks.APPLE_CONTEXT, 2)
    kw = dict(equality={"tokens_identical": True, "logit_gap": 1e-6}, dynamic={"gap": 0.0, "steps": 5},
              bytes_check={"formula": 10, "real": 10, "shape": (1,), "expected_shape": (1,)},
              timings=timings, apple_bytes=apple, variants_cfg=variants, variants=v,
              versus={"same_tokens": True, "table": pd.DataFrame({"loop": ["a", "b"]})},
              model_cfg=cfg, window=window)
    return {**kw, **over}


def test_claims_carry_a_verdict_and_the_value_behind_it():
    model = _model()
    rows = ks.claims(**_claims_inputs(model))
    assert all(isinstance(c, str) and ok is True and isinstance(v, str) and v for c, ok, v in rows)
    by_claim = {c: v for c, _, v in rows}
    assert by_claim["the cache makes the whole generation faster at every prompt length"] == "x2.0 to x3.0"
    assert by_claim["without the cache a decode step at prompt 16 is slower than with it"] == \
        "4.00 vs 1.00 ms per token"
    failing = ks.claims(**_claims_inputs(model, dynamic={"gap": 1e-3, "steps": 5}))
    assert [c for c, ok, _ in failing if not ok] == ["ours matches transformers' DynamicCache within 1e-5"]
