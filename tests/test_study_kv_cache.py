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
