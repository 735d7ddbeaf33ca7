"""The cache variants of labkit.inference.kv_cache: concatenating and sliding window."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import decisive_llama as _model
from conftest import token_prompt as _prompt

from labkit.core import tolerances as tol
from labkit.inference.generate import greedy
from labkit.inference.kv_cache import ConcatKVCache, SlidingWindowKVCache
from labkit.models.config import LlamaConfig
from labkit.models.llama import Llama
from labkit.models.sizes import (
    kv_cache_bytes_for_config,
)
from labkit.studies import kv_cache as ks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_concat_cache_gives_exactly_the_preallocated_result():
    model = _model()
    prompt = _prompt(6, b=2)
    pre = greedy(model, prompt, 64, cache=True, return_logits=True)
    cat = greedy(model, prompt, 64, cache=ConcatKVCache.for_model(model), return_logits=True)
    assert torch.equal(pre.tokens, cat.tokens)
    # tighter than SAME_MATH on purpose: both caches hand SDPA the same keys in the same order
    # (0.0 on a CPU), so more than 1e-6 would be a bug, not rounding
    assert (pre.logits - cat.logits).abs().max().item() <= 1e-6
    assert len(set(pre.new_tokens[0].tolist())) > 3  # not a constant sequence


def test_sliding_window_equals_full_cache_while_the_window_holds_everything():
    model = _model()
    prompt = _prompt(8)
    window = SlidingWindowKVCache.for_model(model, window=8 + 40)
    full = greedy(model, prompt, 40, return_logits=True)
    slid = greedy(model, prompt, 40, cache=window, return_logits=True)
    assert torch.equal(full.tokens, slid.tokens)
    assert (full.logits - slid.logits).abs().max().item() <= tol.SAME_MATH.at("cpu")


def test_sliding_window_matches_transformers_mistral(hf_checkpoint):
    """Once it evicts, the ring buffer equals Mistral's banded mask (each token sees itself and
    the window - 1 before it) in transformers, layer after layer."""
    from safetensors.torch import load_file

    w = 6
    folder = hf_checkpoint("mistral", sliding_window=w, num_key_value_heads=2)
    ref = transformers.MistralForCausalLM.from_pretrained(
        folder, local_files_only=True, attn_implementation="eager").eval()
    hf_cfg = json.loads((folder / "config.json").read_text())
    hf_cfg.pop("sliding_window")
    ours = Llama(LlamaConfig.from_dict(hf_cfg)).eval()
    ours.load_state_dict(load_file(folder / "model.safetensors"))
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(3))
    cache = SlidingWindowKVCache.for_model(ours, window=w)
    with torch.no_grad():
        expected = ref(ids).logits
        got = [ours(ids[:, :4], cache=cache)]  # a prompt shorter than the window
        got += [ours(ids[:, p : p + 1], cache=cache) for p in range(4, 24)]
        full = ours(ids)
    got = torch.cat(got, dim=1)
    assert (got - expected).abs().max().item() <= tol.SAME_MATH.at("cpu")
    assert (full[:, w:] - expected[:, w:]).abs().max().item() > 1e-3  # the window does matter
    assert cache.held == w and cache.length == 24


def test_sliding_window_memory_is_fixed_and_long_prompts_are_refused():
    model = _model()
    cache = SlidingWindowKVCache.for_model(model, window=10)
    before = ks.tensor_bytes(cache)
    assert before == kv_cache_bytes_for_config(model.config, 10, 4)
    greedy(model, _prompt(5), 50, cache=cache)
    assert ks.tensor_bytes(cache) == before and cache.held == 10
    cache.reset()
    with pytest.raises(ValueError, match="window of 10"), torch.no_grad():
        model(_prompt(11), cache=cache)
    with pytest.raises(ValueError, match="window"):
        SlidingWindowKVCache(num_layers=1, num_kv_heads=1, head_dim=4, window=0)
