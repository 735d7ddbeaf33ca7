"""labkit.studies.paged_kv_cache (notebook 07) and the paged serving loop it measures.

The accounting is checked by hand on requests small enough to count; the model-driven parts
(exactness, continuations, decode throughput, serving) against the contiguous cache's greedy
tokens on a tiny random Llama; the tables, records and figures for the fields the notebook reads.
Nothing here checks a speed.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_hf_checkpoint, decisive_llama

from labkit.inference import generate
from labkit.inference.serve import (
    ContiguousStore,
    PagedStore,
    kv_bytes_per_token,
    serve,
    serve_contiguous,
    serve_paged,
)
from labkit.runtimes import vllm_rt
from labkit.studies import paged_kv_cache as pagedstudy
from labkit.studies.paged_kv_cache import Request

NEW_TOKENS = 6
MIX = dict(max_len=128, max_new_tokens=32, prompt_median=20, output_median=10, sigma=0.8, seed=3)


@pytest.fixture(scope="module")
def model():
    return decisive_llama()


@pytest.fixture(scope="module")
def reference(model) -> pagedstudy.ContiguousGreedy:
    return pagedstudy.ContiguousGreedy(model, NEW_TOKENS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random transformers Llama checkpoint (with a word-level tokenizer)."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("paged") / "llama", "llama")


def _prompts(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (n,), generator=g) for n in lengths]


# --- the request mix and its accounting ---------------------------------------------------------


def test_request_mix_is_seeded_and_within_limits():
    kw = dict(max_len=64, max_new_tokens=16, prompt_median=20, output_median=8, seed=7)
    a, b = pagedstudy.request_mix(50, **kw), pagedstudy.request_mix(50, **kw)
    assert a == b
    assert a != pagedstudy.request_mix(50, **{**kw, "seed": 8})
    assert all(1 <= r.output_len <= 16 and r.final_len <= 64 and r.prompt_len >= 1 for r in a)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pagedstudy.request_mix(5, **{**kw, "max_new_tokens": 64})


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_request_mix_names_a_bad_count(n):
    with pytest.raises(ValueError, match="request_mix: n must be a positive integer"):
        pagedstudy.request_mix(n, **MIX)


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


def test_serving_waste_table_records_and_names():
    mix = pagedstudy.request_mix(40, **MIX)
    waste, timelines = pagedstudy.serving_waste(mix, block_sizes=[1, 4, 16], concurrency=8,
                                                max_len=128, max_new_tokens=32)
    assert list(waste.cache) == ["contiguous_max_len", "contiguous_cap", "paged", "paged", "paged"]
    assert sorted(timelines) == [1, 4, 16]
    by = pagedstudy.waste_by_cache(waste)
    assert list(by.index) == ["contiguous_max_len", "contiguous_cap", "paged@1", "paged@4", "paged@16"]
    assert by["paged@1"] == 0 < by["paged@4"] < by["paged@16"] < by["contiguous_cap"]
    assert by["contiguous_max_len"] == pytest.approx(
        pagedstudy.waste_pct(timelines[16].to_dict("records"), "contiguous_max_len"))
    # never used + reserved for later + used = reserved, so the shares stay below the waste
    assert (waste.never_used_pct + waste.reserved_for_later_pct - waste.waste_pct).abs().max() < 1e-9
    assert list(pagedstudy.paged_waste(waste).index) == [1, 4, 16]
    recs = pagedstudy.waste_records(waste, model="m", concurrency=8, requests=40, mix=MIX)
    assert [r["params"]["block_size"] for r in recs] == [None, None, 1, 4, 16]
    assert all(r["metric"] == "waste_pct" and r["params"]["requests"] == 40 for r in recs)
    assert recs[0]["params"]["seed"] == 3 and recs[0]["study"] == pagedstudy.STUDY
    lengths = pagedstudy.mix_lengths(mix)
    assert (lengths.prompt + lengths.output == lengths.final).all() and len(lengths) == 40


# --- prefix sharing -----------------------------------------------------------------------------


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


def test_prefix_sharing_table_is_seeded_and_grows_with_n():
    mix = pagedstudy.request_mix(30, **MIX)
    kw = dict(samples=[1, 2, 4], block_sizes=[1, 8], prompts=10, max_len=128, seed=0)
    sharing = pagedstudy.prefix_sharing(mix, **kw)
    pd.testing.assert_frame_equal(sharing, pagedstudy.prefix_sharing(mix, **kw))
    assert len(sharing) == 6 and (sharing[sharing.n == 1].saving_pct == 0).all()
    for _, g in sharing.groupby("block_size"):
        assert g.saving_pct.is_monotonic_increasing
    # with one-token blocks nothing is ever partially filled: no copy-on-write
    assert (sharing[sharing.block_size == 1].cow_copies_per_prompt == 0).all()
    recs = pagedstudy.sharing_records(sharing, model="m", prompts=10, seed=0)
    assert {r["params"]["source"] for r in recs} == {"request_mix"} and len(recs) == 6


# --- exactness on a model -----------------------------------------------------------------------


def test_contiguous_reference_is_computed_once_per_prompt(model, reference):
    p = _prompts([5])[0]
    assert reference(p) is reference(p.clone())
    assert reference(p).new_tokens.shape == (1, NEW_TOKENS)


def test_exactness_rows_are_identical_and_bitwise_at_batch_1(model, reference):
    prompts = _prompts([3, 9, 17])
    exact = pagedstudy.exactness(model, prompts, block_sizes=[1, 5], reference=reference, max_len=128)
    assert len(exact) == 2 * 2 * 3 and exact.tokens_identical.all()
    assert (exact[exact.case == "batch 1"].max_abs_logit_diff == 0).all()
    summary = pagedstudy.exactness_summary(exact)
    assert summary.loc[("batched", 5), "sequences"] == 3 and summary.all_identical.all()
    text = pagedstudy.describe_exactness(exact, pd.DataFrame(
        dict(tokens_identical=[True, True], copy_on_write_copies=[0, 2])))
    assert "batch 1 6/6, batched 6/6" in text and "copies with sharing: 2" in text


def test_continuations_with_a_shared_prefix_match_and_save_memory(model, reference):
    shared, *suffixes = _prompts([10, 2, 3, 4], seed=2)  # 10 = two blocks of 4 + a partial one
    cont = pagedstudy.continuations(model, shared, suffixes, block_size=4, reference=reference,
                                    max_len=128)
    assert list(cont.shared_prefix) == [False, True] and cont.tokens_identical.all()
    # the partial last block is copied by every continuation but the last one to write
    assert list(cont.copy_on_write_copies) == [0, len(suffixes) - 1]
    assert cont.kv_bytes_at_end[1] < cont.kv_bytes_at_end[0]
    saving = pagedstudy.sharing_saving_pct(cont)
    rec = pagedstudy.continuations_record(cont, model="m", device="cpu", block_size=4,
                                          new_tokens=NEW_TOKENS)
    assert rec["value"] == saving > 0
    assert rec["params"] == dict(cache="paged", source="model_run", n=3, block_size=4,
                                      prompt_tokens=10, new_tokens=NEW_TOKENS,
                                      accounting="bytes_in_use_at_end")
    assert f"{saving:.1f} % less" in pagedstudy.describe_continuations(cont)


def test_encode_and_kv_bytes_per_token(tiny):
    from labkit.models import load

    loaded = load(tiny, device="cpu", dtype="float32")
    ids = pagedstudy.encode(loaded.tokenizer, "w3 w4 w5")
    assert ids.dtype == torch.long and ids.tolist() == [6, 7, 8]
    cfg = loaded.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    assert pagedstudy.kv_bytes_per_token(loaded.model) == per_token
    assert f"{per_token:,} bytes per token" in pagedstudy.describe_model(loaded, "cpu")


# --- decode throughput --------------------------------------------------------------------------


def test_decode_throughput_rows_positions_and_memory(model):
    mix = [Request(5, 3), Request(11, 2), Request(40, 9)]
    decode = pagedstudy.decode_throughput(model, mix, batches=[1, 3], prompt_max=20, block_size=4,
                                          max_len=128, warmup=1, steps=2)
    assert list(zip(decode.cache, decode.batch, strict=True)) == [
        ("contiguous", 1), ("paged", 1), ("contiguous", 3), ("paged", 3)]
    # every row advanced warm-up + timed steps past its prompt (capped at prompt_max)
    assert list(decode.mean_position) == [5 + 3, 5 + 3, np.mean([5, 11, 20]) + 3, np.mean([5, 11, 20]) + 3]
    held = decode.pivot_table(index="batch", columns="cache", values="kv_bytes_held")
    assert (held.paged < held.contiguous).all()
    assert (decode.tok_s_p10 <= decode.tok_s).all() and (decode.tok_s <= decode.tok_s_p90).all()
    recs = pagedstudy.decode_records(decode, model="m", device="cpu", block_size=4, max_len=128,
                                     prompt_max=20, steps=2, threads=1)
    assert [r["params"]["block_size"] for r in recs] == [None, 4, None, 4]
    assert "KV memory held at batch 3" in pagedstudy.describe_throughput(decode)


def test_figures_are_labelled_and_titled(well_drawn):
    mix = pagedstudy.request_mix(20, **MIX)
    waste, timelines = pagedstudy.serving_waste(mix, block_sizes=[1, 4], concurrency=4,
                                                max_len=128, max_new_tokens=32)
    sharing = pagedstudy.prefix_sharing(mix, samples=[1, 2], block_sizes=[4], prompts=5, max_len=128)
    decode = pd.DataFrame(dict(cache=["contiguous", "paged"] * 2, batch=[1, 1, 2, 2],
                               tok_s=[10.0, 9, 18, 17], tok_s_p10=[9.0, 8, 17, 16],
                               tok_s_p90=[11.0, 10, 19, 18], kv_bytes_held=[4096, 512, 8192, 1024]))
    figs = [
        pagedstudy.plot_memory_timeline(timelines[4], bytes_per_token=64, max_len=128, block_size=4,
                                        requests=20, concurrency=4, model_name="m"),
        pagedstudy.plot_waste(waste, requests=20, concurrency=4),
        pagedstudy.plot_prefix_sharing(sharing, prompts=5),
        pagedstudy.plot_decode_throughput(decode, block_size=4, device="cpu", threads=1, model_name="m"),
    ]
    for fig in figs:
        well_drawn(fig)
    assert "paged (block 4)" in pagedstudy.describe_waste(waste, block_size=4, requests=20)
    assert "n=2:" in pagedstudy.describe_sharing(sharing, pd.DataFrame(
        dict(continuations=[3, 3], kv_bytes_at_end=[100, 80])), block_size=4)


# --- the paged serving loop and vLLM beside it --------------------------------------------------


def test_serve_paged_equals_greedy_alone(tiny) -> None:
    from labkit.models import load

    model = load(tiny, device="cpu", dtype="float32").model
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, n).tolist() for n in (5, 19, 1, 33, 12)]
    max_tokens = [7, 3, 12, 1, 9]
    got = serve_paged(model, prompts, max_tokens, concurrency=2, block_size=4)
    for p, n, toks in zip(prompts, max_tokens, got["tokens"], strict=True):
        ref = generate.greedy(model, torch.tensor([p]), n)
        assert toks == ref.new_tokens[0].tolist()
    assert 0 < got["kv_peak_in_use_bytes"] <= got["kv_pool_bytes"]


def test_serve_paged_refuses_bad_arguments(model) -> None:
    with pytest.raises(ValueError, match="differ in length"):
        serve_paged(model, [[1, 2]], [1, 2], concurrency=1)
    with pytest.raises(ValueError, match="serve: concurrency must be a positive integer"):
        serve_paged(model, [[1, 2]], [1], concurrency=0)


def test_greedy_agreement_counts_positions() -> None:
    g = pagedstudy.greedy_agreement([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]])
    assert g["greedy_agreement_pct"] == pytest.approx(100 * 4 / 5)
    assert g["requests_identical_pct"] == 50.0


def test_mix_prompts_are_seeded_ids_of_the_prompt_lengths() -> None:
    mix = [Request(3, 1), Request(7, 2)]
    a = pagedstudy.mix_prompts(mix, 50, seed=1)
    assert a == pagedstudy.mix_prompts(mix, 50, seed=1) != pagedstudy.mix_prompts(mix, 50, seed=2)
    assert [len(p) for p in a] == [3, 7] and all(2 <= t < 50 for p in a for t in p)


def test_side_by_side_reports_why_vllm_did_not_run(tiny, monkeypatch, tmp_path) -> None:
    # vllm_rt says "Linux only" before it looks at the venv: show it (only it) Linux, so a Mac
    # checks the venv path too
    monkeypatch.setattr(vllm_rt, "sys", SimpleNamespace(platform="linux"))
    monkeypatch.setattr(vllm_rt, "VENV", tmp_path / "nowhere")
    monkeypatch.setattr(vllm_rt, "_IMPORT_CHECK", {})
    df = pagedstudy.vllm_side_by_side([Request(4, 3), Request(9, 2)], model=str(tiny), concurrency=2,
                                      budget_seqs=1, block_size=4)
    ours, theirs = df.set_index("engine").loc["labkit-paged"], df.set_index("engine").loc["vllm-cpu"]
    assert ours.status == "ok" and ours.tok_s > 0
    # ours serves from a pool of the budget: one max-length sequence (256 positions) of blocks
    assert ours.kv_budget_bytes == ours.kv_reserved_bytes == 256 * ours.kv_block_bytes // 4
    assert ours.peak_live == 2
    assert theirs.status.startswith("not run: no vLLM venv")
    assert "tok_s" not in df or np.isnan(theirs.tok_s)
    assert pagedstudy.describe_vllm(df) == f"vLLM side-by-side {theirs.status}"


def test_serve_records_and_install_note() -> None:
    side = pd.DataFrame([
        dict(engine="labkit-paged", status="ok", tok_s=10.0, kv_reserved_bytes=100,
             kv_budget_bytes=128, kv_peak_in_use_bytes=60, greedy_agreement_pct=100.0),
        dict(engine="vllm-cpu", status="ok", tok_s=30.0, kv_reserved_bytes=100,
             kv_budget_bytes=128, kv_peak_in_use_bytes=None, greedy_agreement_pct=100.0),
    ])
    recs = pagedstudy.serve_records(side, model="m", params={"seed": 0})
    assert [(r["metric"], r["runtime"]) for r in recs] == [
        ("serve_tok_s", "labkit-paged"), ("kv_reserved_bytes", "labkit-paged"),
        ("serve_tok_s", "vllm-cpu"), ("kv_reserved_bytes", "vllm-cpu"),
        ("greedy_agreement_pct", "vllm-cpu")]
    assert "3.00x tok/s" in pagedstudy.describe_vllm(side)
    attempt = dict(date="d", summary="s", errors_on_the_way=[dict(error="E", fix="F")])
    assert pagedstudy.vllm_install_note(attempt) == "vLLM install (d): s\n  - E  -> F"
    assert "no attempt recorded" in pagedstudy.vllm_install_note({})
    assert pagedstudy.vllm_install_note().startswith("vLLM install")  # the checkout's own record


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
                                      model=str(folder), concurrency=2, budget_seqs=1)
    v = df.set_index("engine").loc["vllm-cpu"]
    assert v.status == "ok", v.status
    assert v.greedy_agreement_pct == 100.0
    assert pagedstudy.same_pool(df), df[["engine", "kv_reserved_bytes", "kv_budget_bytes"]]


# --- serving under a fixed KV budget ------------------------------------------------------------

SERVE_LENGTHS = [(5, 7), (19, 3), (1, 12), (33, 1), (12, 9), (7, 20), (40, 15)]


@pytest.fixture(scope="module")
def serve_case(model):
    """Prompts, output caps and each request's greedy tokens decoded alone (the reference)."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 96, n).tolist() for n, _ in SERVE_LENGTHS]
    max_tokens = [n for _, n in SERVE_LENGTHS]
    refs = [generate.greedy(model, torch.tensor([p]), n).new_tokens[0].tolist()
            for p, n in zip(prompts, max_tokens, strict=True)]
    return prompts, max_tokens, refs


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_serve_contiguous_rows_equal_greedy_alone(model, serve_case, rows) -> None:
    prompts, max_tokens, refs = serve_case
    budget = rows * 64 * kv_bytes_per_token(model)
    got = serve_contiguous(model, prompts, max_tokens, max_len=64, kv_budget_bytes=budget)
    assert got["tokens"] == refs and max(got["live"]) == rows and got["preemptions"] == 0
    assert got["kv_pool_bytes"] == budget and got["capacity_positions"] == rows * 64
    # every live request reserves a whole row
    assert all(r == n * 64 for r, n in zip(got["reserved_positions"], got["live"], strict=True))
    assert all(u <= r for u, r in zip(got["used_positions"], got["reserved_positions"], strict=True))


def test_serve_paged_in_a_small_budget_preempts_and_still_equals_greedy(model, serve_case) -> None:
    prompts, max_tokens, refs = serve_case
    budget = 16 * 4 * kv_bytes_per_token(model)  # 16 blocks of 4: the longest request just fits
    got = serve_paged(model, prompts, max_tokens, concurrency=99, block_size=4,
                      kv_budget_bytes=budget)
    assert got["preemptions"] > 0 and got["tokens"] == refs  # recomputed caches, same argmax
    assert got["kv_pool_bytes"] == budget and max(got["live"]) > 1
    assert got["kv_peak_in_use_bytes"] <= budget and any(got["waiting"])
    roomy = serve_paged(model, prompts, max_tokens, concurrency=99, block_size=4,
                        kv_budget_bytes=4 * budget)
    assert roomy["preemptions"] == 0 and max(roomy["live"]) > max(got["live"])


def test_serve_refuses_what_cannot_fit(model) -> None:
    bpt = kv_bytes_per_token(model)
    with pytest.raises(ValueError, match="does not fit the KV store even alone"):
        serve_paged(model, [[1] * 30], [10], concurrency=1, block_size=4, kv_budget_bytes=8 * 4 * bpt)
    with pytest.raises(ValueError, match="does not fit the KV store even alone"):
        serve_contiguous(model, [[1] * 60], [10], max_len=64, kv_budget_bytes=64 * bpt)
    with pytest.raises(ValueError, match="max-length rows in kv_budget_bytes must be a positive"):
        serve_contiguous(model, [[1]], [1], max_len=64, kv_budget_bytes=63 * bpt)
    with pytest.raises(ValueError, match="blocks in kv_budget_bytes must be a positive"):
        serve_paged(model, [[1]], [1], concurrency=1, block_size=4, kv_budget_bytes=3 * bpt)
    with pytest.raises(ValueError, match="serve: prompts and max_tokens differ"):
        serve(model, ContiguousStore(model, max_len=8, slots=1), [[1]], [1, 2], concurrency=1)


def test_paged_store_admits_after_the_live_sequences_next_blocks(model) -> None:
    store = PagedStore(model, num_blocks=4, block_size=4)
    handles = []
    for n in (4, 4):  # two sequences of one full block each: both need a new block next
        handle, cache = store.admit()
        store.pool.prepare_write(handle, n)
        store.pool.tables.advance(handle, n)
        handles.append(handle)
    assert store.to_preempt(handles) == 0  # 2 free blocks for 2 next tokens
    assert not store.can_admit(1, handles)  # the 2 free blocks are the live ones' next blocks
    assert store.can_admit(1, handles[:1]) and not store.can_admit(4, handles[:1])
    store.pool.tables.allocator.allocate()  # one free block left: the newest must go
    assert store.to_preempt(handles) == 1
    assert store.reserved_positions() == 12 and store.bytes_in_use() == 3 * store.pool.bytes_per_block()


def test_serve_at_budgets_rows_records_and_figure(tiny, well_drawn) -> None:
    from labkit.models import load

    model = load(tiny, device="cpu", dtype="float32").model
    mix = pagedstudy.request_mix(10, max_len=256, max_new_tokens=12, prompt_median=20,
                                 output_median=6, seed=1)
    budgets = pagedstudy.serve_at_budgets(model, mix, budget_seqs=[1, 2], max_len=256, block_size=16)
    assert list(zip(budgets.budget_seqs, budgets.policy, strict=True)) == [
        (1, "contiguous"), (1, "paged"), (2, "contiguous"), (2, "paged")]
    assert list(budgets.budget_bytes) == [pagedstudy.budget_bytes(model, 256, k) for k in (1, 1, 2, 2)]
    table = pagedstudy.budget_table(budgets)
    assert list(table.peak_live.contiguous) == [1, 2] and (table.peak_live.paged > [1, 2]).all()
    assert (table.waste_pct.paged < table.waste_pct.contiguous).all()
    assert (budgets.generated_tokens == sum(r.output_len for r in mix)).all()
    assert (budgets.greedy_agreement_pct == 100).all() and (budgets.kv_pool_bytes <= budgets.budget_bytes).all()
    recs = pagedstudy.budget_records(budgets, model="m", device="cpu", block_size=16, max_len=256,
                                     threads=1, seed=0)
    assert len(recs) == 3 * len(budgets)
    assert {r["metric"] for r in recs} == {"budget_admitted_requests", "budget_serve_tok_s",
                                           "budget_waste_pct"}
    assert {r["params"]["block_size"] for r in recs if r["params"]["cache"] == "contiguous"} == {None}
    well_drawn(pagedstudy.plot_budget_serving(budgets, max_len=256, block_size=16, threads=1,
                                              model_name="m"))
    text = pagedstudy.describe_budgets(budgets)
    assert "admitted 1 contiguous vs" in text and text.count("\n") == 1
    with pytest.raises(ValueError, match="budget_bytes: seqs must be a positive integer"):
        pagedstudy.budget_bytes(model, 256, 0)


def _side(vllm_bytes: int, status: str = "ok") -> pd.DataFrame:
    return pd.DataFrame([
        dict(engine="labkit-paged", status="ok", tok_s=10.0, kv_reserved_bytes=1000,
             kv_budget_bytes=1024, kv_block_bytes=100, greedy_agreement_pct=100.0),
        dict(engine="vllm-cpu", status=status, tok_s=20.0, kv_reserved_bytes=vllm_bytes,
             kv_budget_bytes=1024, kv_block_bytes=100, greedy_agreement_pct=100.0),
    ])


def test_same_pool_compares_like_with_like() -> None:
    assert pagedstudy.same_pool(_side(1000)) and pagedstudy.same_pool(_side(920))
    assert not pagedstudy.same_pool(_side(1100))  # over the budget
    assert not pagedstudy.same_pool(_side(800))  # two blocks short of ours
    assert "KV pool vLLM 920 B" in pagedstudy.describe_vllm(_side(920))


def test_record_side_by_side_skips_or_records(tmp_path, monkeypatch, capsys) -> None:
    from labkit.core.results import load_results

    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    assert not pagedstudy.record_side_by_side(_side(0, status="not run: no venv"), model="m",
                                              params={})
    assert "skipped: vLLM side-by-side: not run: no venv" in capsys.readouterr().out
    assert pagedstudy.record_side_by_side(_side(1000), model="m", params={"seed": 0})
    df = load_results(pagedstudy.STUDY)
    assert len(df) == 5 and all("load_avg_1m" in p for p in df.params)


def test_describe_load_names_the_cpus() -> None:
    text = pagedstudy.describe_load(pd.DataFrame(dict(load_1min=[1.0, 2.5])))
    assert text.startswith("1-minute load average of this machine while timing: 1.0-2.5 on ")
