"""Study 01 (labkit.studies.kv_cache): what the study adds on top of the models' cache and generate tests.

* the byte formula against the bytes of real cache tensors (ours, concatenating, sliding, and
  transformers' DynamicCache) and against published configs (Apple's ~1 GB for Llama 3.1 8B);
* growing by concatenation gives exactly what the preallocated cache gives;
* the sliding window: identical to the full cache while the window holds everything, equal to
  transformers' Mistral sliding-window attention (1e-5) once it evicts, fixed memory;
* the fast decode loop: greedy tokens identical to labkit's greedy and to transformers.generate
  over 128 tokens, logits within 1e-5, on a tiny random GQA config and on the shipped tiny-llama;
* the roofline arithmetic: bytes per token = bytes of the parameters a step reads.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from labkit.inference.fast_decode import FastDecoder
from labkit.inference.generate import greedy
from labkit.inference.kv_cache import ConcatKVCache, KVCache, SlidingWindowKVCache
from labkit.models.config import LlamaConfig
from labkit.models.llama import Llama
from labkit.models.sizes import (
    decode_bytes_per_token,
    head_dim_of,
    kv_cache_bytes,
    kv_cache_bytes_for_config,
    weight_bytes_per_token,
)
from labkit.studies import kv_cache as ks

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast, and immune to a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(seed: int = 0, *, tied: bool = False, kv_heads: int = 2, vocab: int = 96) -> Llama:
    """A tiny random GQA Llama whose greedy choices are decisive (scaled output matrix)."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # norms away from one: a dropped norm shows
                p.add_(0.1 * torch.randn_like(p))
            elif tied and "layers" in name:  # else the tied embedding just repeats its input
                p.mul_(5.0)
        model.model.norm.weight.mul_(20.0)  # scales the logits: decisive greedy choices
    return model


def _prompt(t: int = 5, b: int = 1, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(11))


# --------------------------------------------------------------------------- bytes


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


# --------------------------------------------------------------------------- cache variants


def test_concat_cache_gives_exactly_the_preallocated_result():
    model = _model()
    prompt = _prompt(6, b=2)
    pre = greedy(model, prompt, 64, cache=True, return_logits=True)
    cat = greedy(model, prompt, 64, cache=ConcatKVCache.for_model(model), return_logits=True)
    assert torch.equal(pre.tokens, cat.tokens)
    assert (pre.logits - cat.logits).abs().max().item() <= 1e-6
    assert len(set(pre.new_tokens[0].tolist())) > 3  # not a constant sequence


def test_sliding_window_equals_full_cache_while_the_window_holds_everything():
    model = _model()
    prompt = _prompt(8)
    window = SlidingWindowKVCache.for_model(model, window=8 + 40)
    full = greedy(model, prompt, 40, return_logits=True)
    slid = greedy(model, prompt, 40, cache=window, return_logits=True)
    assert torch.equal(full.tokens, slid.tokens)
    assert (full.logits - slid.logits).abs().max().item() <= ATOL


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
    assert (got - expected).abs().max().item() <= ATOL
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


# --------------------------------------------------------------------------- fast decode loop


@pytest.mark.parametrize("fuse", [True, False])
def test_fast_decoder_equals_greedy_over_128_tokens(fuse):
    model = _model(tied=fuse)  # both output layouts
    prompt = _prompt(5, b=2)
    want = greedy(model, prompt, 128, return_logits=True)
    uncached = greedy(model, prompt, 128, cache=False)
    tokens, logits = FastDecoder(model, fuse=fuse).greedy(prompt, 128, return_logits=True)
    assert torch.equal(tokens, want.tokens)
    assert torch.equal(tokens, uncached.tokens)
    assert (logits - want.logits).abs().max().item() <= ATOL
    assert len(set(want.new_tokens[0].tolist())) > 3


def test_fast_decoder_equals_transformers_generate():
    model = _model(kv_heads=1)
    hf = ks.hf_twin(model)
    prompt = _prompt(6)
    tokens, _ = FastDecoder(model).greedy(prompt, 128)
    _, theirs = ks.tokens_per_s_hf_generate(hf, prompt, 128)
    assert torch.equal(tokens, theirs)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= ATOL


def test_fast_decoder_refuses_other_models():
    with pytest.raises(TypeError, match="Llama"):
        FastDecoder(torch.nn.Linear(2, 2))


def test_shipped_tiny_llama_cached_equals_uncached_128_tokens():
    """Uncached greedy, checked in one forward: step i of uncached greedy runs the model on the
    prefix and takes the argmax at its last position. A causal model's logits at position p depend
    only on tokens <= p, so one uncached forward over the cached run's whole sequence gives every
    step's uncached logits at once; the runs agree on all 128 tokens iff each argmax equals the
    next cached token (induction on the step). 128 full reruns would cost ~100x more."""
    from labkit.core import paths
    from labkit.models import load

    folder = paths.repo_models_dir() / "tiny-llama"
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"skipped: {folder} is not in this checkout (it is shipped in CI)")
    model = load("tiny-llama", device="cpu").model
    prompt = ks.make_prompt(model.config.vocab_size, 16)
    cached = greedy(model, prompt, 128, return_logits=True)
    fast, fast_logits = FastDecoder(model).greedy(prompt, 128, return_logits=True)
    with torch.no_grad():
        uncached_logits = model(cached.tokens[:, :-1])[:, 15:]  # positions 15 .. 15+127
    assert torch.equal(uncached_logits.argmax(-1), cached.new_tokens)
    assert (uncached_logits - cached.logits).abs().max().item() <= 1e-4
    assert torch.equal(fast, cached.tokens)
    assert (fast_logits - cached.logits).abs().max().item() <= 1e-4
    assert len(set(cached.new_tokens[0].tolist())) > 3


# --------------------------------------------------------------------------- roofline


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_per_token_is_the_parameters_a_step_reads(tied):
    model = _model(tied=tied)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    # tied: the table is read whole as the output matrix; untied: only one row is gathered
    read = params + cfg.hidden_size if tied else params - embed + cfg.hidden_size
    assert weight_bytes_per_token(cfg, 4) == 4 * read
    assert weight_bytes_per_token(cfg.to_hf_dict(), 2) == 2 * read


def test_decode_bytes_and_roofline_arithmetic():
    cfg = _model().config
    b = decode_bytes_per_token(cfg, position=99, dtype_bytes=4)
    assert b["kv_read"] == kv_cache_bytes(num_layers=2, num_kv_heads=2, head_dim=16,
                                          positions=100, bytes_per_element=4)
    assert b["kv_write"] == b["kv_read"] // 100
    assert b["total"] == b["weights"] + b["kv_read"] + b["kv_write"]
    assert ks.roofline_seconds(2e9, 10.0) == pytest.approx(0.2)
    assert ks.roofline_fraction(1e9, 0.2, 10.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bandwidth_gbs"):
        ks.roofline_seconds(1.0, 0.0)
    with pytest.raises(ValueError, match="seconds_per_token"):
        ks.roofline_fraction(1.0, 0.0, 10.0)


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
