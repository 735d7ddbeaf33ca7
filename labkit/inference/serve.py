"""The paged serving loop: continuous batching of many requests over one paged KV cache.

Why a loop of its own: a serving engine (vLLM) does not decode one request at a time; it keeps a
batch of live requests, admits a new one the moment another finishes (continuous batching), and
decodes one token for every live request per step. :func:`serve_paged` is that loop over
``labkit.inference.paged_kv_cache`` with greedy decoding, small enough to read, so that the same
request mix can be served by it and by vLLM and their tokens, times and KV memory compared.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from labkit.core.checks import positive_int


def serve_paged(
    model: Any,
    prompts: Sequence[list[int]],
    max_tokens: Sequence[int],
    *,
    concurrency: int,
    block_size: int = 32,
) -> dict[str, Any]:
    """Greedy-serve ``prompts`` with our paged cache, continuous batching, ``concurrency`` at once.

    Each step: free slots admit the next requests (prefill one by one, the first token is the
    prefill's argmax), then every live request decodes one token together
    (``paged_kv_cache.decode_step``); a request leaves when it has ``max_tokens`` tokens. The
    pool is sized for the whole mix, so admission never waits for memory (vLLM's pool is bigger
    still). Returns the tokens, the wall time, and the KV memory: the pool allocated up front
    and the peak of the blocks in use.
    """
    import torch

    from labkit.inference.paged_kv_cache import (
        PagedBatch,
        PagedKVCache,
        blocks_needed,
        decode_step,
        prefill,
    )

    if len(prompts) != len(max_tokens):
        raise ValueError("serve_paged: prompts and max_tokens differ in length")
    positive_int(concurrency, "concurrency", "serve_paged")
    device = next(model.parameters()).device
    num_blocks = sum(blocks_needed(len(p) + n, block_size) for p, n in zip(prompts, max_tokens, strict=True))
    pool = PagedKVCache.for_model(model, num_blocks=num_blocks, block_size=block_size)
    queue = list(range(len(prompts)))[::-1]
    live: dict[int, int] = {}  # request index -> sequence id
    out: list[list[int]] = [[] for _ in prompts]
    peak = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while queue or live:
            while queue and len(live) < concurrency:  # admit: prefill, the first token
                i = queue.pop()
                seq = pool.sequence()
                ids = torch.tensor(prompts[i], dtype=torch.long, device=device)
                out[i].append(int(prefill(model, seq, ids).argmax()))
                live[i] = seq.seq
            for i in [i for i in live if len(out[i]) >= max_tokens[i]]:
                pool.free_sequence(live.pop(i))
            if not live:
                continue
            order = list(live)  # decode: one token for every live request
            last = torch.tensor([out[i][-1] for i in order], dtype=torch.long, device=device)
            nxt = decode_step(model, PagedBatch(pool, [live[i] for i in order]), last).argmax(-1)
            peak = max(peak, pool.bytes_in_use())
            for i, t in zip(order, nxt.tolist(), strict=True):
                out[i].append(int(t))
                if len(out[i]) >= max_tokens[i]:
                    pool.free_sequence(live.pop(i))
    wall = time.perf_counter() - t0
    pool.tables.check()
    return dict(tokens=out, wall_s=wall, kv_pool_bytes=pool.nbytes(), kv_peak_in_use_bytes=peak)
