"""torch on the Apple GPU (MPS): decode parity with the CPU, the fast decode loop, attention with
a cache, device sync, the MPS + CPU device map of notebook 09, MiniLM. Skipped off macOS with
"needs macOS 14" (torch 2.13's wheel is macosx_14_0).

Tolerances (``labkit.core.tolerances``): one forward within ``SAME_MATH.at("mps")``; a cached
decode against the uncached one within ``LONG_DECODE.at("mps")``; greedy tokens equal up to the
first step whose top-2 margin is under ``NEAR_TIE.at("mps")`` (there either token is right).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import decisive_llama, needs_macos, random_llama_with_shipped_tokenizer

from labkit.core import env
from labkit.core import tolerances as tol

pytestmark = needs_macos((14, 0), "torch's MPS: make setup installs the PyPI torch 2.13 wheel")

GEN = 16


@pytest.fixture(scope="module")
def pair():
    """The same decisive random Llama on the CPU and on MPS, and a prompt."""
    cpu = decisive_llama(seed=3).eval()
    mps = copy.deepcopy(cpu).to("mps")
    prompt = torch.randint(3, cpu.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    return cpu, mps, prompt


def _agree_until_near_tie(ref_tokens, ref_logits, got_tokens) -> int:
    """Steps compared: every one up to the first near-tie of the reference's logits."""
    top2 = ref_logits[0].topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    n = next((i for i, m in enumerate(margins) if m < tol.NEAR_TIE.at("mps")), len(margins))
    assert torch.equal(ref_tokens[0, -len(margins):][:n].cpu(), got_tokens[0, -len(margins):][:n].cpu())
    return n


def test_auto_picks_mps() -> None:
    assert env.pick_device("auto") == "mps"
    assert env.optional_runtimes()["mps"] is None


def test_one_forward_matches_the_cpu(pair) -> None:
    cpu, mps, prompt = pair
    with torch.no_grad():
        a, b = cpu(prompt), mps(prompt.to("mps")).cpu()
    assert (a - b).abs().max().item() <= tol.SAME_MATH.at("mps")


def test_greedy_decode_on_mps_matches_the_cpu(pair) -> None:
    from labkit.inference.generate import greedy

    cpu, mps, prompt = pair
    ref = greedy(cpu, prompt, GEN, return_logits=True)
    got = greedy(mps, prompt.to("mps"), GEN, return_logits=True)
    assert _agree_until_near_tie(ref.tokens, ref.logits, got.tokens) > GEN // 2
    uncached = greedy(mps, prompt.to("mps"), GEN, cache=False, return_logits=True)
    gap = (got.logits - uncached.logits).abs().max().item()
    assert gap <= tol.LONG_DECODE.at("mps"), f"cached vs uncached on MPS: {gap:.2e}"


def test_the_fast_decoder_on_mps(pair) -> None:
    from labkit.inference.fast_decode import FastDecoder
    from labkit.inference.generate import greedy

    cpu, mps, prompt = pair
    ref = greedy(cpu, prompt, GEN, return_logits=True)
    tokens, _ = FastDecoder(mps).greedy(prompt.to("mps"), GEN)
    assert _agree_until_near_tie(ref.tokens, ref.logits, tokens) > GEN // 2


def test_causal_attention_with_a_cache_offset_and_a_mask() -> None:
    from labkit.models.layers import causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, n, 16, generator=g) for n in (3, 10, 10))
    k, v = k[:, :2], v[:, :2]  # grouped-query: 4 query heads over 2 KV heads
    mask = torch.zeros(1, 1, 3, 10)
    mask[..., 9:] = float("-inf")  # the last key is not visible yet
    for m in (None, mask):
        want = causal_attention(q, k, v, m)
        got = causal_attention(q.to("mps"), k.to("mps"), v.to("mps"), None if m is None else m.to("mps"))
        assert (got.cpu() - want).abs().max().item() <= tol.ATTENTION.at("mps")


def test_device_sync_waits_for_mps() -> None:
    from labkit.core.timing import device_sync, measure

    a = torch.randn(2048, 2048, device="mps")
    stats = measure(lambda: a @ a, warmup=1, repeats=3, sync=device_sync("mps"))
    assert stats.median > 0


def test_the_mps_and_cpu_device_map_runs(tmp_path, monkeypatch) -> None:
    import json

    from labkit.studies import will_it_fit as fit

    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))  # it records its tok/s

    folder = random_llama_with_shipped_tokenizer(tmp_path / "m", hidden_size=128, layers=4)
    config = json.loads((folder / "config.json").read_text())
    prompt = torch.randint(3, 8192, (1, 8), generator=torch.Generator().manual_seed(0))
    mps_map, tok_s = fit.mps_offload(folder, config, prompt, 0.5, 8, 1, 2, tmp_path / "off", "test")
    assert {"mps", "cpu"} <= set(mps_map.values()) and tok_s > 0


def test_minilm_on_mps_embeds_like_the_cpu() -> None:
    from labkit.models import load
    from labkit.models.encoder import cosine, embed

    texts = ["a cat sat on the mat", "import numpy as np"]
    cpu, mps = embed(texts), embed(texts, load("minilm", device="mps"))
    assert cosine(cpu, mps).min().item() > 1 - tol.SAME_MATH.at("mps")
