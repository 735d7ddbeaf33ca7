"""labkit.inference.export_cache: the traceable caches give the eager forward's logits.

Exporters (Core ML steps b-e, ONNX, OpenVINO, the compiled static decode step) run the model's
one forward with these caches; here each is checked against the same model with a plain KVCache,
token by token, within tolerances.SAME_MATH (only the attention's reduction length differs: a
fixed-size buffer under a mask vs the filled prefix).
"""

from __future__ import annotations

import torch
from conftest import random_llama

from labkit.core import tolerances as tol
from labkit.inference.export_cache import PastKVCache, StaticCache
from labkit.inference.kv_cache import KVCache
from labkit.models.layers import explicit_gqa

MAX_LEN = 12


def _reference(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of each position fed one token at a time through a contiguous KVCache."""
    cache = KVCache.for_model(model, max_len=MAX_LEN)
    with torch.no_grad():
        return torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(ids.shape[1])], 1)


def _ids(model, n: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, model.config.vocab_size, (1, n), generator=g)


def _static_mask(position: int) -> torch.Tensor:
    mask = torch.full((1, 1, 1, MAX_LEN), -1e4)
    mask[..., : position + 1] = 0.0
    return mask


def test_static_cache_in_place_and_copied_match_the_eager_forward() -> None:
    model = random_llama()
    ids = _ids(model)
    want = _reference(model, ids)
    cfg = model.config
    shape = (1, cfg.num_key_value_heads, MAX_LEN, cfg.head_dim)
    states = [torch.zeros(shape) for _ in range(2 * cfg.num_hidden_layers)]
    k_io = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    v_io = [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad(), explicit_gqa():
        for pos in range(ids.shape[1]):
            position = torch.tensor([pos])
            in_place = StaticCache(states[0::2], states[1::2], position, _static_mask(pos))
            got = model(ids[:, pos : pos + 1], cache=in_place)
            assert float((got[0, 0] - want[0, pos]).abs().max()) <= tol.SAME_MATH.at("cpu")
            before = [k.clone() for k in k_io]
            copied = StaticCache(k_io, v_io, position, _static_mask(pos), in_place=False)
            got_io = model(ids[:, pos : pos + 1], cache=copied)
            assert float((got_io - got).abs().max()) == 0.0
            assert all(torch.equal(a, b) for a, b in zip(before, k_io, strict=True)), \
                "in_place=False must not write its inputs"
            k_io, v_io = copied.new_k, copied.new_v
    assert not in_place.new_k, "an in-place cache collects nothing (no growth across steps)"


def test_past_kv_cache_prefill_then_decode_matches_the_eager_forward() -> None:
    model = random_llama(num_key_value_heads=1)  # MQA: the explicit repeat path
    ids = _ids(model)
    want = _reference(model, ids)
    cfg = model.config
    empty = [torch.zeros(1, cfg.num_key_value_heads, 0, cfg.head_dim)] * cfg.num_hidden_layers
    split = 4
    causal = torch.ones(split, split, dtype=torch.bool).tril()
    with torch.no_grad(), explicit_gqa():
        pre = PastKVCache(empty, empty, torch.arange(split), causal)
        got = model(ids[:, :split], cache=pre)
        assert float((got - want[:, :split]).abs().max()) <= tol.SAME_MATH.at("cpu")
        k, v = pre.present_k, pre.present_v
        for pos in range(split, ids.shape[1]):
            step = PastKVCache(k, v, torch.tensor([pos]), torch.ones(1, pos + 1, dtype=torch.bool))
            got = model(ids[:, pos : pos + 1], cache=step)
            assert float((got[0, 0] - want[0, pos]).abs().max()) <= tol.SAME_MATH.at("cpu")
            k, v = step.present_k, step.present_v
    assert k[0].shape[2] == ids.shape[1]
