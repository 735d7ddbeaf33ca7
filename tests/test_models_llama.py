"""labkit's Llama vs transformers' LlamaForCausalLM (the reference), like llm.c's test_gpt2.

Tolerance: max |logits_ours - logits_hf| <= tolerances.SAME_MATH (1e-5 in fp32 on a CPU: the same
math, only the summation order differs), uncached and cached. Configs are tiny and random (built
by transformers, saved as safetensors); norm weights and biases are perturbed so they matter.
GQA (2 KV heads for 4 query heads), MQA (1 KV head) and plain MHA are covered.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from conftest import (
    HF_VOCAB,
    load_pair,
    max_abs_diff,
    random_llama,
    reload_in_transformers,
    tiny_config,
)

from labkit.core import tolerances as tol
from labkit.inference.kv_cache import KVCache
from labkit.models.config import LlamaConfig

KV_HEADS = {"gqa": 2, "mqa": 1, "mha": 4}


@pytest.mark.parametrize("kind", list(KV_HEADS))
def test_uncached_logits_match_transformers(hf_checkpoint, kind):
    ours, ref = load_pair(hf_checkpoint("llama", num_key_value_heads=KV_HEADS[kind]))
    ids = torch.randint(0, HF_VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = max_abs_diff(ours(ids), ref(ids).logits)
    assert diff <= tol.SAME_MATH.at("cpu"), f"{kind}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("kind", ["gqa", "mqa"])
def test_cached_decode_matches_uncached_transformers(hf_checkpoint, kind):
    """Prefill 7 tokens, then decode one token at a time; every step's logits must equal
    transformers' uncached logits at that position."""
    ours, ref = load_pair(hf_checkpoint("llama", num_key_value_heads=KV_HEADS[kind]))
    ids = torch.randint(0, HF_VOCAB, (2, 40), generator=torch.Generator().manual_seed(2))
    cache = KVCache.for_model(ours, max_len=64, batch=2)
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids[:, :7], cache=cache)
        assert max_abs_diff(got, expected[:, :7]) <= tol.SAME_MATH.at("cpu")
        for pos in range(7, ids.shape[1]):
            step = ours(ids[:, pos : pos + 1], cache=cache)
            diff = max_abs_diff(step[:, 0], expected[:, pos])
            assert diff <= tol.SAME_MATH.at("cpu"), f"position {pos}: max abs diff {diff:.3g}"
    assert cache.length == ids.shape[1]


def test_chunked_prefill_after_prefix_is_causal(hf_checkpoint):
    """Several new tokens after a filled prefix need an explicit offset causal mask."""
    ours, ref = load_pair(hf_checkpoint("llama"))
    ids = torch.randint(0, HF_VOCAB, (1, 30), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(ours, max_len=30)
    with torch.no_grad():
        expected = ref(ids).logits
        chunks = [ours(ids[:, a:b], cache=cache) for a, b in ((0, 10), (10, 21), (21, 30))]
    assert max_abs_diff(torch.cat(chunks, dim=1), expected) <= tol.SAME_MATH.at("cpu")


def test_transformers_dynamic_cache_matches_ours(hf_checkpoint):
    """transformers' own cached decode (DynamicCache) vs ours, step by step."""
    ours, ref = load_pair(hf_checkpoint("llama", num_key_value_heads=1))
    ids = torch.randint(0, HF_VOCAB, (1, 24), generator=torch.Generator().manual_seed(4))
    cache = KVCache.for_model(ours, max_len=24)
    hf_cache = transformers.DynamicCache(config=ref.config)
    with torch.no_grad():
        a = ours(ids[:, :5], cache=cache)
        b = ref(ids[:, :5], cache=hf_cache, use_cache=True).logits
        assert max_abs_diff(a, b) <= tol.SAME_MATH.at("cpu")
        for pos in range(5, ids.shape[1]):
            a = ours(ids[:, pos : pos + 1], cache=cache)
            b = ref(ids[:, pos : pos + 1], cache=hf_cache, use_cache=True).logits
            assert max_abs_diff(a, b) <= tol.SAME_MATH.at("cpu"), f"position {pos}"
    assert hf_cache.get_seq_length() == cache.length == ids.shape[1]


def test_tied_embeddings_have_no_lm_head_key(hf_checkpoint):
    ours, ref = load_pair(hf_checkpoint("llama", tie_word_embeddings=True))
    assert "lm_head.weight" not in ours.state_dict()
    assert ours.output_weight is ours.model.embed_tokens.weight
    ids = torch.randint(0, HF_VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert max_abs_diff(ours(ids), ref(ids).logits) <= tol.SAME_MATH.at("cpu")
    assert ours.num_parameters() == ref.num_parameters()


def test_state_dict_keys_are_exactly_transformers(hf_checkpoint):
    ours, ref = load_pair(hf_checkpoint("llama"))
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours.num_parameters() == ref.num_parameters()


def test_hidden_states_match_transformers(hf_checkpoint):
    """hidden[i] for i < num_hidden_layers equals transformers' output_hidden_states[i]
    (transformers' last entry is after the final norm; ours is before it)."""
    ours, ref = load_pair(hf_checkpoint("llama", num_hidden_layers=3))
    ids = torch.randint(0, HF_VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits, hidden = ours(ids, return_hidden=True)
        ref_hidden = ref(ids, output_hidden_states=True).hidden_states
        assert len(hidden) == len(ref_hidden) == 4
        atol = tol.SAME_MATH.at("cpu")
        for i in range(3):
            assert max_abs_diff(hidden[i], ref_hidden[i]) <= atol, f"hidden state {i}"
        assert max_abs_diff(ours.model.norm(hidden[3]), ref_hidden[3]) <= atol
        assert max_abs_diff(logits, ours(ids)) == 0.0


def test_checkpoint_from_ours_loads_in_transformers(tmp_path):
    """The other direction: our config.json + our state dict load in transformers unchanged."""
    ours = random_llama(0, vocab_size=HF_VOCAB, max_position_embeddings=128, rope_theta=500000.0,
                        rms_norm_eps=1e-5)
    ref = reload_in_transformers(ours, tmp_path)
    assert type(ref).__name__ == "LlamaForCausalLM"
    assert ref.config.rope_parameters["rope_theta"] == 500000.0
    ids = torch.randint(0, HF_VOCAB, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert max_abs_diff(ours(ids), ref(ids).logits) <= tol.SAME_MATH.at("cpu")


def test_init_scales_residual_projections():
    """nanoGPT init: N(0, 0.02), and o_proj/down_proj at 0.02/sqrt(2 * layers)."""
    model = random_llama(0, vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=8)
    scaled = 0.02 / math.sqrt(2 * 8)
    layer = model.model.layers[3]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))


def test_training_forward_backward_runs():
    """The uncached forward is differentiable (the trainer uses it)."""
    model = random_llama(0, vocab_size=64, hidden_size=32, intermediate_size=64).train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(8))
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(loss.item() - math.log(64)) < 0.5  # near-uniform predictions at init


def test_cache_overflow_is_an_error(hf_checkpoint):
    ours, _ = load_pair(hf_checkpoint("llama"))
    cache = KVCache.for_model(ours, max_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match="max_len=8"):
        ours(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_linear_rope_scaling_matches_transformers(hf_checkpoint):
    folder = hf_checkpoint(
        "llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    )
    ours, ref = load_pair(folder)
    assert ours.config.rope_scaling_factor == 2.0 and ours.config.rope_theta == 5000.0
    ids = torch.randint(0, HF_VOCAB, (1, 100), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert max_abs_diff(ours(ids), ref(ids).logits) <= tol.SAME_MATH.at("cpu")


def test_old_style_llama_config_and_refusals():
    """Llama-2-era config.json (top-level rope_theta, rope_scaling null) reads; what our RoPE
    does not implement is refused with the file and the alternative named."""
    from labkit.models.errors import ModelLoadError

    old = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float16",
    }
    cfg = LlamaConfig.from_dict(old, source="llama-2-7b/config.json")
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.torch_dtype) == (128, 32, "float16")
    llama3 = {**old, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ModelLoadError, match=r"l3/config.json.*'llama3'.*impl='hf'"):
        LlamaConfig.from_dict(llama3, source="l3/config.json")
    with pytest.raises(ModelLoadError, match=r"x/config.json.*multiple of num_key_value_heads"):
        LlamaConfig.from_dict({**old, "num_key_value_heads": 5}, source="x/config.json")
    with pytest.raises(ModelLoadError, match=r"x/config.json.*'num_hidden_layers'"):
        LlamaConfig.from_dict({**old, "num_hidden_layers": 0}, source="x/config.json")


def test_shipped_tiny_llama_matches_transformers():
    """The acceptance check on the real checkpoint: ours vs transformers within SAME_MATH (fp32).

    Uncached: one full forward each. Cached: prefill 16 tokens then decode one at a time, ours
    with our KVCache against transformers with its DynamicCache (the same computation order).
    Across modes (our cached step vs an uncached forward) the summation order inside SDPA
    differs, so there the bound is relative: 1e-6 of the logits' scale (about 1e-5 absolute).
    """
    from transformers import DynamicCache

    from labkit.core import paths

    folder = paths.repo_models_dir() / "tiny-llama"
    if not (folder / "config.json").is_file():
        pytest.skip(f"skipped: {folder} is not shipped yet (being trained)")
    ours, ref = load_pair(folder)
    ids = torch.randint(
        0, ours.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(10)
    )
    cache = KVCache.for_model(ours, max_len=64)
    hf_cache = DynamicCache()
    atol = tol.SAME_MATH.at("cpu")
    with torch.no_grad():
        expected = ref(ids).logits
        assert max_abs_diff(ours(ids), expected) <= atol
        ours_prefill = ours(ids[:, :16], cache=cache)
        hf_prefill = ref(ids[:, :16], past_key_values=hf_cache, use_cache=True).logits
        assert max_abs_diff(ours_prefill, hf_prefill) <= atol
        scale = expected.abs().max().item()
        for pos in range(16, 64):
            step = ours(ids[:, pos : pos + 1], cache=cache)[:, 0]
            hf_step = ref(ids[:, pos : pos + 1], past_key_values=hf_cache, use_cache=True).logits[:, 0]
            assert max_abs_diff(step, hf_step) <= atol
            # across modes SDPA sums in another order: a bound relative to the logits' scale
            assert max_abs_diff(step, expected[:, pos]) <= 1e-6 * scale


def test_explicit_repeat_kv_path_matches_transformers(hf_checkpoint, monkeypatch):
    """The fallback for torch < 2.5 / exporters: K/V heads copied per query head."""
    import labkit.models.layers as layers_module

    monkeypatch.setattr(layers_module, "SDPA_GQA", False)
    ours, ref = load_pair(hf_checkpoint("llama", num_key_value_heads=1))
    ids = torch.randint(0, HF_VOCAB, (2, 20), generator=torch.Generator().manual_seed(12))
    cache = KVCache.for_model(ours, max_len=20, batch=2)
    atol = tol.SAME_MATH.at("cpu")
    with torch.no_grad():
        expected = ref(ids).logits
        assert max_abs_diff(ours(ids), expected) <= atol
        assert max_abs_diff(ours(ids[:, :8], cache=cache), expected[:, :8]) <= atol
        for pos in range(8, 20):
            step = ours(ids[:, pos : pos + 1], cache=cache)[:, 0]
            assert max_abs_diff(step, expected[:, pos]) <= atol, f"position {pos}"


def test_to_hf_dict_round_trips_through_transformers_and_back():
    cfg = tiny_config(vocab_size=100, num_hidden_layers=3, num_attention_heads=8,
                      rope_theta=20000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                      tie_word_embeddings=True)
    hf = transformers.LlamaConfig(**cfg.to_hf_dict())
    assert hf.rope_parameters["rope_type"] == "linear" and hf.rope_parameters["factor"] == 4.0
    assert hf.num_key_value_heads == 2 and hf.tie_word_embeddings is True
    back = LlamaConfig.from_dict(hf.to_dict(), source="roundtrip")
    assert back == cfg
