"""Generation: cached greedy == uncached greedy (128 tokens, random GQA config), cached greedy ==
transformers' greedy generate, sampling deterministic for a seed, EOS handling, streaming."""

from __future__ import annotations

import pytest
import torch
from conftest import HF_VOCAB, load_pair, random_llama, token_prompt

from labkit.core import tolerances as tol
from labkit.inference.generate import greedy, sample, stream
from labkit.inference.kv_cache import KVCache


def _model() -> torch.nn.Module:
    """The tiny GQA Llama with its logits scaled up 20x, so greedy choices are decisive, not
    near-ties decided by rounding."""
    return random_llama(logit_scale=20.0)


def test_greedy_cached_equals_uncached_128_tokens():
    model = _model()
    prompt = token_prompt(b=2)
    cached = greedy(model, prompt, 128, cache=True, return_logits=True)
    uncached = greedy(model, prompt, 128, cache=False, return_logits=True)
    assert cached.tokens.shape == (2, 5 + 128)
    assert torch.equal(cached.tokens[:, :5], prompt)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert (cached.logits - uncached.logits).abs().max().item() <= tol.LONG_DECODE.at("cpu")
    # the generated text is not a constant: the comparison above is not vacuous
    assert len(set(cached.new_tokens[0].tolist())) > 3


def test_greedy_matches_transformers_generate(hf_checkpoint):
    ours, ref = load_pair(hf_checkpoint("llama", num_key_value_heads=1))
    prompt = token_prompt(6, vocab=HF_VOCAB)
    got = greedy(ours, prompt, 40)
    want = ref.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=40,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(got.tokens, want)


def test_reused_cache_object_is_reset():
    model = _model()
    prompt = token_prompt()
    kv = KVCache.for_model(model, max_len=64)
    first = greedy(model, prompt, 20, cache=kv)
    second = greedy(model, prompt, 20, cache=kv)
    assert torch.equal(first.tokens, second.tokens)
    assert torch.equal(first.tokens, greedy(model, prompt, 20).tokens)
    assert kv.length == 5 + 20 - 1  # the last chosen token is never fed back


def test_sample_is_deterministic_for_a_seed_and_respects_top_k():
    model = _model()
    prompt = token_prompt(b=2)
    a = sample(model, prompt, 30, temperature=1.0, top_k=5, seed=3, return_logits=True)
    b = sample(model, prompt, 30, temperature=1.0, top_k=5, seed=3)
    c = sample(model, prompt, 30, temperature=1.0, top_k=5, seed=4)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    top5 = a.logits.topk(5, dim=-1).indices
    assert (top5 == a.new_tokens.unsqueeze(-1)).any(-1).all()
    one = sample(model, prompt, 10, top_k=1, seed=5)
    assert torch.equal(one.tokens, greedy(model, prompt, 10).tokens)


def test_sample_cached_equals_uncached():
    model = _model()
    prompt = token_prompt(b=2)
    a = sample(model, prompt, 40, temperature=0.8, seed=1)
    b = sample(model, prompt, 40, temperature=0.8, seed=1, cache=False)
    assert torch.equal(a.tokens, b.tokens)


def test_eos_stops_when_every_row_finished():
    model = _model()
    prompt = token_prompt(b=2)
    free = greedy(model, prompt, 30).new_tokens
    eos = int(free[0, 3])  # row 0 emits it at step 3 (or earlier)
    got = greedy(model, prompt, 30, eos_token_id=eos)
    row0_first = free[0].tolist().index(eos)
    assert got.tokens[0, 5 + row0_first].item() == eos
    assert (got.new_tokens[0, row0_first:] == eos).all()  # padded with EOS after finishing
    rows_hit = [(free[r] == eos).nonzero() for r in range(2)]
    if all(len(h) for h in rows_hit):
        assert got.new_tokens.shape[1] == max(int(h[0]) for h in rows_hit) + 1
    else:
        assert got.new_tokens.shape[1] == 30


def test_stream_yields_the_greedy_tokens_one_by_one():
    model = _model()
    prompt = token_prompt()
    streamed = []
    for token in stream(model, prompt, 25):
        assert not torch.is_inference_mode_enabled()  # not leaked into the caller between steps
        streamed.append(token)
    assert len(streamed) == 25 and all(t.shape == (1,) for t in streamed)
    assert torch.equal(torch.stack(streamed, dim=1), greedy(model, prompt, 25).new_tokens)


def test_bad_arguments_name_the_parameter():
    model = _model()
    with pytest.raises(ValueError, match="input_ids"):
        greedy(model, torch.zeros(4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy(model, token_prompt(b=2), -1)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, token_prompt(b=2), 3, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        sample(model, token_prompt(b=2), 3, top_k=0)


def test_agreed_steps_forgives_only_a_near_tie() -> None:
    """Identical tokens agree; a first difference agrees only where the reference's top-2 margin
    is under the tie (0 on a CPU: never), and the shared steps are counted either way."""
    from labkit.inference.generate import agreed_steps

    ref = torch.tensor([[3, 1, 2]])
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 3], logits[0, 1, 1], logits[0, 2, 2] = 5.0, 2.0, 1.0
    logits[0, 1, 4] = 2.0 - 5e-4  # step 1: a near-tie between tokens 1 and 4
    assert agreed_steps(ref.clone(), ref, logits, 0.0) == (3, True)
    other = torch.tensor([[3, 4, 0]])
    assert agreed_steps(other, ref, logits, 0.0) == (1, False)
    assert agreed_steps(other, ref, logits, 1e-3) == (1, True)
    assert agreed_steps(torch.tensor([[0, 1, 2]]), ref, logits, 1e-3) == (0, False)  # margin 5
    with pytest.raises(ValueError, match="shapes differ"):
        agreed_steps(ref[:, :2], ref, logits, 0.0)
