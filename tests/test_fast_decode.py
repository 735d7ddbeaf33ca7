"""labkit.inference.fast_decode: the fast decode loop is a tested variant of the readable model.

Greedy tokens identical to labkit's greedy and to transformers.generate over 128 tokens, logits
within tolerances.SAME_MATH, on a tiny random GQA config and on the shipped tiny-llama.
"""

from __future__ import annotations

import pytest
import torch
from conftest import decisive_llama as _model
from conftest import token_prompt as _prompt

from labkit.core import tolerances as tol
from labkit.inference.fast_decode import FastDecoder
from labkit.inference.generate import greedy
from labkit.studies import kv_cache as ks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fuse", [True, False])
def test_fast_decoder_equals_greedy_over_128_tokens(fuse):
    model = _model(tied=fuse)  # both output layouts
    prompt = _prompt(5, b=2)
    want = greedy(model, prompt, 128, return_logits=True)
    uncached = greedy(model, prompt, 128, cache=False)
    tokens, logits = FastDecoder(model, fuse=fuse).greedy(prompt, 128, return_logits=True)
    assert torch.equal(tokens, want.tokens)
    assert torch.equal(tokens, uncached.tokens)
    assert (logits - want.logits).abs().max().item() <= tol.SAME_MATH.at("cpu")
    assert len(set(want.new_tokens[0].tolist())) > 3


def test_fast_decoder_equals_transformers_generate():
    model = _model(kv_heads=1)
    hf = ks.hf_twin(model)
    prompt = _prompt(6)
    tokens, _ = FastDecoder(model).greedy(prompt, 128)
    _, theirs = ks.tokens_per_s_hf_generate(hf, prompt, 128)
    assert torch.equal(tokens, theirs)
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= tol.SAME_MATH.at("cpu")


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
    atol = tol.LONG_DECODE.at("cpu")  # 8 trained layers, 128 steps: past SAME_MATH's 1e-5
    assert (uncached_logits - cached.logits).abs().max().item() <= atol
    assert torch.equal(fast, cached.tokens)
    assert (fast_logits - cached.logits).abs().max().item() <= atol
    assert len(set(cached.new_tokens[0].tolist())) > 3


LEVERS = [dict(fuse=f, transpose=t, attention=a)
          for f in (True, False) for t in (False, True) for a in ("sdpa", "matmul")]


@pytest.mark.parametrize("levers", LEVERS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_every_lever_keeps_the_tokens_and_the_logits(levers):
    """Each rung of the ladder (fused, transposed weights, matmul attention) is the same
    function: greedy tokens identical over 64 steps, logits within SAME_MATH."""
    model = _model(kv_heads=1)  # MQA: the grouped attention path at its widest
    prompt = _prompt(6, b=2)
    want = greedy(model, prompt, 64, return_logits=True)
    tokens, logits = FastDecoder(model, **levers).greedy(prompt, 64, return_logits=True)
    assert torch.equal(tokens, want.tokens)
    assert (logits - want.logits).abs().max().item() <= tol.SAME_MATH.at("cpu")


@pytest.mark.parametrize("attention", ["sdpa", "matmul"])
def test_static_steps_match_the_dynamic_ones(attention):
    model = _model()
    prompt = _prompt(5, b=2)
    dyn = FastDecoder(model, attention=attention).greedy(prompt, 32, return_logits=True)
    sta = FastDecoder(model, attention=attention).greedy(prompt, 32, return_logits=True,
                                                         static=True)
    assert torch.equal(dyn[0], sta[0])
    assert (dyn[1] - sta[1]).abs().max().item() <= tol.SAME_MATH.at("cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_run_and_follow_the_readable_model(dtype):
    """fp16 and bf16 (the RoPE tables are cast, norms upcast as the readable RMSNorm does):
    the fast step agrees with the readable model run in the same dtype."""
    model = _model().to(dtype)
    prompt = _prompt(6)
    want = greedy(model, prompt, 16, return_logits=True)
    tokens, logits = FastDecoder(model, transpose=True, attention="matmul").greedy(
        prompt, 16, return_logits=True)
    assert logits.dtype == dtype
    first = (tokens[0, 6:] != want.tokens[0, 6:]).nonzero()
    upto = int(first[0]) + 1 if len(first) else 16  # compare while the histories are equal
    assert (logits[:, :upto].float() - want.logits[:, :upto].float()).abs().max().item() <= 0.1
    assert upto >= 4, "half precision should agree for the first steps at least"


def test_bad_attention_is_refused():
    with pytest.raises(ValueError, match="attention must be one of"):
        FastDecoder(_model(), attention="flash")
