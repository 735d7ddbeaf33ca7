"""labkit's Phi vs transformers' PhiForCausalLM: max |logits diff| <= tolerances.SAME_MATH (fp32,
the same math in another summation order), uncached and cached. Tiny random configs with
perturbed LayerNorm weights and biases; partial rotary factors 0.5 (transformers' default) and
0.4 (Phi-2's)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import HF_VOCAB, load_pair, max_abs_diff, random_model, reload_in_transformers

from labkit.core import tolerances as tol
from labkit.inference.kv_cache import KVCache
from labkit.models.config import PhiConfig
from labkit.models.errors import ModelLoadError
from labkit.models.phi import gelu_new


@pytest.mark.parametrize("factor", [0.5, 0.4])
def test_uncached_logits_match_transformers(hf_checkpoint, factor):
    # head_dim 20 so that 0.4 gives an even rotary_dim (8), as Phi-2's 80 * 0.4 = 32
    folder = hf_checkpoint(
        "phi", hidden_size=80, num_key_value_heads=4, partial_rotary_factor=factor
    )
    ours, ref = load_pair(folder)
    assert ours.config.rotary_dim == int(20 * factor)
    ids = torch.randint(0, HF_VOCAB, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = max_abs_diff(ours(ids), ref(ids).logits)
    assert diff <= tol.SAME_MATH.at("cpu"), f"max abs diff {diff:.3g}"


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cached_decode_matches_uncached_transformers(hf_checkpoint, kv_heads):
    ours, ref = load_pair(hf_checkpoint("phi", num_key_value_heads=kv_heads))
    ids = torch.randint(0, HF_VOCAB, (2, 32), generator=torch.Generator().manual_seed(2))
    cache = KVCache.for_model(ours, max_len=32, batch=2)
    atol = tol.SAME_MATH.at("cpu")
    with torch.no_grad():
        expected = ref(ids).logits
        assert max_abs_diff(ours(ids[:, :6], cache=cache), expected[:, :6]) <= atol
        for pos in range(6, ids.shape[1]):
            diff = max_abs_diff(ours(ids[:, pos : pos + 1], cache=cache)[:, 0], expected[:, pos])
            assert diff <= atol, f"position {pos}: max abs diff {diff:.3g}"


def test_transformers_dynamic_cache_matches_ours(hf_checkpoint):
    ours, ref = load_pair(hf_checkpoint("phi"))
    ids = torch.randint(0, HF_VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(ours, max_len=20)
    hf_cache = transformers.DynamicCache(config=ref.config)
    with torch.no_grad():
        for a, b in [(0, 4)] + [(p, p + 1) for p in range(4, 20)]:
            ours_step = ours(ids[:, a:b], cache=cache)
            ref_step = ref(ids[:, a:b], cache=hf_cache, use_cache=True).logits
            diff = max_abs_diff(ours_step, ref_step)
            assert diff <= tol.SAME_MATH.at("cpu"), f"tokens [{a}, {b}): max abs diff {diff:.3g}"


def test_state_dict_keys_are_exactly_transformers(hf_checkpoint):
    ours, ref = load_pair(hf_checkpoint("phi"))
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours.num_parameters() == ref.num_parameters()


def test_checkpoint_from_ours_loads_in_transformers(tmp_path):
    ours = random_model("phi", 0, vocab_size=HF_VOCAB, num_key_value_heads=4,
                        partial_rotary_factor=0.5, max_position_embeddings=64)
    ref = reload_in_transformers(ours, tmp_path)
    assert type(ref).__name__ == "PhiForCausalLM"
    ids = torch.randint(0, HF_VOCAB, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert max_abs_diff(ours(ids), ref(ids).logits) <= tol.SAME_MATH.at("cpu")


def test_old_style_config_keys_are_read():
    """Phi-2's config.json keeps rope_theta and partial_rotary_factor at the top level."""
    d = {
        "vocab_size": 51200,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "partial_rotary_factor": 0.4,
        "rope_theta": 10000.0,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu_new",
        "qk_layernorm": False,
    }
    cfg = PhiConfig.from_dict(d, source="phi-2/config.json")
    assert (cfg.head_dim, cfg.rotary_dim, cfg.num_key_value_heads) == (80, 32, 32)


def test_gelu_new_is_transformers_new_gelu():
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-6, 6, 1001)
    assert torch.equal(gelu_new(x), NewGELUActivation()(x))


def test_unsupported_variants_are_refused():
    base = dict(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(ModelLoadError, match="qk_layernorm"):
        PhiConfig.from_dict({**base, "qk_layernorm": True}, source="x/config.json")
    with pytest.raises(ModelLoadError, match="x/config.json.*hidden_act"):
        PhiConfig.from_dict({**base, "hidden_act": "relu"}, source="x/config.json")
