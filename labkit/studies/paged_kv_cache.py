"""Study helpers for notebook 07 (paged KV cache): a request mix and KV-memory accounting.

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

import numpy as np

from labkit.inference.paged_kv_cache import BlockTables, blocks_needed

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
