"""The KV-cache byte formula (the lab's one source of truth) and the contiguous KVCache."""

from __future__ import annotations

import pytest
import torch
from conftest import random_llama, tiny_config

from labkit.inference.kv_cache import Cache, KVCache, kv_cache_bytes, kv_cache_bytes_for_config

# Shapes as published in the models' config.json files (inputs, not measurements).
LLAMA2_7B = {
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_size": 4096,
}
MISTRAL_7B = {
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
}
PHI2 = {"num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 2560}


def test_formula_is_the_product_of_its_factors():
    n = kv_cache_bytes(
        num_layers=3, num_kv_heads=5, head_dim=7, positions=11, bytes_per_element=2, batch=13
    )
    assert n == 2 * 3 * 5 * 7 * 11 * 2 * 13
    assert (
        kv_cache_bytes(num_layers=1, num_kv_heads=1, head_dim=1, positions=0, bytes_per_element=2)
        == 0
    )


def test_fractional_bytes_round_up():
    # a 4-bit cache: half a byte per element
    assert (
        kv_cache_bytes(num_layers=1, num_kv_heads=1, head_dim=3, positions=1, bytes_per_element=0.5)
        == 3
    )
    assert (
        kv_cache_bytes(num_layers=1, num_kv_heads=1, head_dim=4, positions=1, bytes_per_element=0.5)
        == 4
    )


def test_for_config_reads_hf_keys():
    # Llama 2 7B (no GQA): 2 * 32 * 32 * 128 * 4096 * 2 bytes = 2 GiB at 4096 positions, fp16
    assert kv_cache_bytes_for_config(LLAMA2_7B, 4096) == 2 * 1024**3
    # Mistral 7B: 8 KV heads instead of 32 -> a quarter of that
    assert kv_cache_bytes_for_config(MISTRAL_7B, 4096) == 512 * 1024**2
    # Phi-2: head_dim 80 from 2560 / 32
    assert (
        kv_cache_bytes_for_config(PHI2, 2048, dtype_bytes=4, batch=2)
        == 2 * 32 * 32 * 80 * 2048 * 4 * 2
    )
    # explicit head_dim wins over hidden_size / heads
    assert kv_cache_bytes_for_config({**MISTRAL_7B, "head_dim": 64}, 10) == 2 * 32 * 8 * 64 * 10 * 2


def test_for_config_accepts_config_objects():
    cfg = tiny_config(vocab_size=10, intermediate_size=64, num_hidden_layers=3)
    assert kv_cache_bytes_for_config(cfg, 100) == 2 * 3 * 2 * 16 * 100 * 2


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv_cache_bytes(num_layers=1, num_kv_heads=0, head_dim=1, positions=1, bytes_per_element=2)
    with pytest.raises(ValueError, match="positions"):
        kv_cache_bytes(num_layers=1, num_kv_heads=1, head_dim=1, positions=-1, bytes_per_element=2)
    with pytest.raises(ValueError, match="bytes_per_element"):
        kv_cache_bytes(num_layers=1, num_kv_heads=1, head_dim=1, positions=1, bytes_per_element=0)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        kv_cache_bytes_for_config({"num_attention_heads": 4}, 10)
    with pytest.raises(ValueError, match="hidden_size"):
        kv_cache_bytes_for_config(
            {"num_hidden_layers": 2, "num_attention_heads": 3, "hidden_size": 64}, 1
        )


def _cache(**kw) -> KVCache:
    args = dict(num_layers=2, num_kv_heads=2, head_dim=4, max_len=10, batch=1)
    args.update(kw)
    return KVCache(**args)


def test_nbytes_equals_the_formula():
    for dtype, size in ((torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)):
        cache = _cache(dtype=dtype, batch=3)
        expected = kv_cache_bytes(
            num_layers=2, num_kv_heads=2, head_dim=4, positions=10, bytes_per_element=size, batch=3
        )
        assert cache.nbytes() == expected


def test_update_writes_in_place_and_returns_the_filled_prefix():
    cache = _cache()
    assert isinstance(cache, Cache)
    k1, v1 = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    for layer in range(2):
        k_all, v_all = cache.update(layer, k1 + layer, v1 + layer)
        assert k_all.shape == (1, 2, 3, 4)
        assert k_all.data_ptr() == cache.k[layer].data_ptr()  # a view, not a copy
    assert cache.length == 0  # update does not move the length ...
    cache.advance(3)  # ... the model advances once per forward
    assert cache.length == 3
    k2, v2 = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    k_all, v_all = cache.update(1, k2, v2)
    assert torch.equal(k_all, torch.cat([k1 + 1, k2], dim=2))
    assert torch.equal(v_all, torch.cat([v1 + 1, v2], dim=2))
    cache.advance(1)
    cache.reset()
    assert cache.length == 0
    k_all, _ = cache.update(0, k2, v2)
    assert torch.equal(k_all, k2)


def test_overflow_is_an_error():
    cache = _cache(max_len=4)
    cache.update(0, torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
    cache.advance(4)
    with pytest.raises(ValueError, match="max_len=4"):
        cache.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(ValueError, match="max_len=4"):
        cache.advance(1)


def test_for_model_takes_shapes_dtype_and_device_from_the_model():
    model = random_llama(vocab_size=10, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                         num_key_value_heads=1, max_position_embeddings=50).to(torch.float16)
    cfg = model.config
    cache = KVCache.for_model(model, batch=2)
    assert cache.num_layers == 3 and cache.max_len == 50
    assert cache.k[0].shape == (2, 1, 50, 8) and cache.k[0].dtype == torch.float16
    assert cache.nbytes() == kv_cache_bytes_for_config(cfg, 50, dtype_bytes=2, batch=2)


def test_constructor_rejects_bad_shapes():
    with pytest.raises(ValueError, match="max_len"):
        _cache(max_len=0)
