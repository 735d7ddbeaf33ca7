"""The serving loop: continuous batching of many requests over one KV cache, paged or contiguous.

Why a loop of its own: a serving engine (vLLM) does not decode one request at a time; it keeps a
batch of live requests, admits a new one the moment another finishes (continuous batching), and
decodes one token for every live request per step. :func:`serve` is that loop with greedy
decoding, small enough to read, over one of two KV stores:

* :class:`PagedStore` — ``labkit.inference.paged_kv_cache``'s block pool. A request is admitted
  when the free blocks hold its prompt (and the next token); when a decode step finds no free
  block, the newest request is preempted (its blocks freed, it waits at the head of the queue and
  is prefilled again with the tokens it had: vLLM's preemption by recomputation).
* :class:`ContiguousStore` — max-length reservation: one row of a contiguous ``KVCache`` of
  ``max_len`` positions per request, as a server that cannot grow a cache in place must reserve.

:func:`serve_paged` and :func:`serve_contiguous` build the store, from a KV memory budget where
one is given, so that the same request mix can be served by both (and by vLLM) in the same KV
memory and their tokens, times, admitted concurrency and unused memory compared.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from labkit.core.checks import positive_int
from labkit.inference.paged_kv_cache import (
    PaddedBatch,
    PagedBatch,
    PagedKVCache,
    blocks_needed,
    decode_step,
    prefill,
)


class PagedStore:
    """Requests as sequences of one block pool: admission by free blocks, preemption when full."""

    def __init__(self, model: Any, *, num_blocks: int, block_size: int) -> None:
        self.pool = PagedKVCache.for_model(model, num_blocks=num_blocks, block_size=block_size)
        self.capacity_positions = num_blocks * block_size

    def _needs_block(self, handle: int) -> int:
        """1 if the sequence's next token starts a new block (its last block is full), else 0."""
        return int(self.length(handle) % self.pool.block_size == 0)

    def can_admit(self, positions: int, live: Sequence[int]) -> bool:
        """Do the free blocks hold ``positions`` tokens and the token after them, once every live
        sequence has the block its next token needs?"""
        need = blocks_needed(positions + 1, self.pool.block_size)
        pending = sum(self._needs_block(h) for h in live)
        return need + pending <= self.pool.tables.allocator.num_free

    def admit(self) -> tuple[int, Any]:
        seq = self.pool.sequence()
        return seq.seq, seq

    def free(self, handle: int) -> None:
        self.pool.free_sequence(handle)

    def length(self, handle: int) -> int:
        return self.pool.length(handle)

    def to_preempt(self, handles: Sequence[int]) -> int:
        """How many of ``handles`` (oldest first) must leave, newest first, so that the others
        each get the block their next token needs."""
        need = [self._needs_block(h) for h in handles]
        keep, free = len(handles), self.pool.tables.allocator.num_free
        while keep and sum(need[:keep]) > free:
            keep -= 1
            free += len(self.pool.tables.tables[handles[keep]])  # its blocks return to the pool
        return len(handles) - keep

    def batch(self, handles: Sequence[int]) -> PagedBatch:
        return PagedBatch(self.pool, handles)

    def nbytes(self) -> int:
        return self.pool.nbytes()

    def bytes_in_use(self) -> int:
        return self.pool.bytes_in_use()

    def reserved_positions(self) -> int:
        """Positions of the blocks the live sequences hold (the only slack: each last block)."""
        return self.pool.tables.slots_reserved()


class _LiveRows(PaddedBatch):
    """The live rows of a contiguous batch, decoded together (free rows are skipped).

    When the live rows are the first rows of the buffer (the steady state: a freed row is refilled
    at once), attention reads a slice of it (a view, as ``PaddedBatch`` does); otherwise the live
    rows are gathered (a copy), which happens only while the last requests drain.
    """

    def __init__(self, base: PaddedBatch, rows: Sequence[int]) -> None:
        import torch

        self.base, self.kv, self.rows = base, base.kv, list(rows)
        self._index = torch.tensor(self.rows, dtype=torch.long, device=self._device())
        self._prefix = self.rows == list(range(len(self.rows)))

    @property
    def lengths(self) -> list[int]:  # type: ignore[override]
        return [self.base.lengths[r] for r in self.rows]

    def _begin(self) -> list[int]:
        positions = super()._begin()
        self._rows = self._index
        return positions

    def update(self, layer: int, k: Any, v: Any) -> tuple[Any, Any]:
        kbuf, vbuf = self.kv.k[layer], self.kv.v[layer]
        kbuf[self._rows, :, self._positions] = k[:, :, 0]
        vbuf[self._rows, :, self._positions] = v[:, :, 0]
        n = self._read_length
        if self._prefix:
            return kbuf[: len(self.rows), :, :n], vbuf[: len(self.rows), :, :n]
        return kbuf[:, :, :n].index_select(0, self._index), vbuf[:, :, :n].index_select(0, self._index)

    def advance(self, num_tokens: int) -> None:
        for r in self.rows:
            self.base.lengths[r] += num_tokens


class ContiguousStore:
    """Requests as rows of one contiguous ``KVCache``: ``slots`` rows of ``max_len`` positions."""

    def __init__(self, model: Any, *, max_len: int, slots: int) -> None:
        from labkit.inference.kv_cache import KVCache

        self.rows = PaddedBatch(KVCache.for_model(model, max_len=max_len, batch=slots))
        self.free_rows = list(range(slots))[::-1]  # pop() hands out row 0 first
        self.capacity_positions = slots * max_len

    def can_admit(self, positions: int, live: Sequence[int]) -> bool:
        """Is a row free (a row holds any request: ``positions`` < ``max_len``)?"""
        return bool(self.free_rows) and positions < self.rows.kv.max_len

    def admit(self) -> tuple[int, Any]:
        row = self.free_rows.pop()
        self.rows.lengths[row] = 0
        return row, self.rows.row(row)

    def free(self, handle: int) -> None:
        self.free_rows.append(handle)
        self.free_rows.sort(reverse=True)  # refill the lowest row first: live rows stay a prefix

    def length(self, handle: int) -> int:
        return self.rows.lengths[handle]

    def to_preempt(self, handles: Sequence[int]) -> int:
        return 0  # every row already holds max_len positions

    def batch(self, handles: Sequence[int]) -> _LiveRows:
        return _LiveRows(self.rows, handles)

    def nbytes(self) -> int:
        return self.rows.kv.nbytes()

    def bytes_in_use(self) -> int:
        """The rows of live requests: each reserves ``max_len`` positions, written or not."""
        rows = len(self.rows.lengths)
        return self.nbytes() * (rows - len(self.free_rows)) // rows

    def reserved_positions(self) -> int:
        return (len(self.rows.lengths) - len(self.free_rows)) * self.rows.kv.max_len


def _prefill_request(model: Any, store: Any, ids: list[int], device: Any) -> tuple[int, int]:
    """Admit one request into ``store``: (its handle, the argmax of its prefill logits)."""
    import torch

    handle, cache = store.admit()
    logits = prefill(model, cache, torch.tensor(ids, dtype=torch.long, device=device))
    return handle, int(logits.argmax())


def serve(
    model: Any,
    store: PagedStore | ContiguousStore,
    prompts: Sequence[list[int]],
    max_tokens: Sequence[int],
    *,
    concurrency: int,
) -> dict[str, Any]:
    """Greedy-serve ``prompts`` over ``store``, continuous batching, at most ``concurrency`` live.

    Each step: waiting requests are admitted in order while the store has room (prefill one by
    one; the first token is the prefill's argmax; a preempted request is prefilled again with its
    prompt and the tokens it had, all but the newest); requests the store cannot keep are
    preempted, newest first; every live request decodes one token
    (``paged_kv_cache.decode_step``); a request leaves when it has ``max_tokens`` tokens.

    Returns the tokens, the wall time, the store's bytes and capacity (positions), the peak bytes
    held by live requests, the number of preemptions and, per decode step, the live requests,
    the positions they have written and hold reserved, and whether requests were waiting.
    """
    import torch

    if len(prompts) != len(max_tokens):
        raise ValueError("serve: prompts and max_tokens differ in length")
    positive_int(concurrency, "concurrency", "serve")
    too_long = [i for i, (p, n) in enumerate(zip(prompts, max_tokens, strict=True))
                if not _fits_empty(store, len(p) + n)]
    if too_long:
        raise ValueError(f"serve: request {too_long[0]} does not fit the KV store even alone")
    device = next(model.parameters()).device
    queue, live = list(range(len(prompts)))[::-1], {}  # live: request -> handle, oldest first
    out: list[list[int]] = [[] for _ in prompts]
    steps: dict[str, list] = {"live": [], "used_positions": [], "reserved_positions": [],
                              "waiting": []}
    preemptions = peak = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while queue or live:
            while queue and len(live) < concurrency:  # admit, in order, while there is room
                ids = list(prompts[queue[-1]]) + out[queue[-1]][:-1]  # preempted: + its tokens
                if not store.can_admit(len(ids), list(live.values())):
                    break
                i = queue.pop()
                live[i], first = _prefill_request(model, store, ids, device)
                if not out[i]:
                    out[i].append(first)
            for i in [i for i in live if len(out[i]) >= max_tokens[i]]:
                store.free(live.pop(i))
            order = list(live)
            for i in order[len(order) - store.to_preempt([live[i] for i in order]):][::-1]:
                store.free(live.pop(i))  # newest first; it waits at the head of the queue
                queue.append(i)
                preemptions += 1
            if not live:
                continue
            order = sorted(live, key=live.__getitem__)  # by row/sequence: contiguous rows stay a view
            last = torch.tensor([out[i][-1] for i in order], dtype=torch.long, device=device)
            nxt = decode_step(model, store.batch([live[i] for i in order]), last).argmax(-1)
            steps["live"].append(len(order))
            steps["used_positions"].append(sum(store.length(live[i]) for i in order))
            steps["reserved_positions"].append(store.reserved_positions())
            steps["waiting"].append(bool(queue))
            peak = max(peak, store.bytes_in_use())
            for i, t in zip(order, nxt.tolist(), strict=True):
                out[i].append(int(t))
                if len(out[i]) >= max_tokens[i]:
                    store.free(live.pop(i))
    wall = time.perf_counter() - t0
    return dict(tokens=out, wall_s=wall, kv_pool_bytes=store.nbytes(), kv_peak_in_use_bytes=peak,
                capacity_positions=store.capacity_positions, preemptions=preemptions, **steps)


def _fits_empty(store: Any, positions: int) -> bool:
    """Could a request of ``positions`` tokens fit the store if it held nothing else?"""
    if isinstance(store, PagedStore):
        return blocks_needed(positions, store.pool.block_size) <= store.pool.tables.allocator.num_blocks
    return positions <= store.rows.kv.max_len


def kv_bytes_per_token(model: Any) -> int:
    """KV-cache bytes one token adds to a sequence: K and V, every layer, at the model's dtype."""
    from labkit.inference.kv_cache import kv_cache_bytes_for_config

    dtype_bytes = next(model.parameters()).element_size()
    return kv_cache_bytes_for_config(model.config, 1, dtype_bytes=dtype_bytes)


def serve_paged(
    model: Any,
    prompts: Sequence[list[int]],
    max_tokens: Sequence[int],
    *,
    concurrency: int,
    block_size: int = 32,
    kv_budget_bytes: int | None = None,
) -> dict[str, Any]:
    """:func:`serve` over a paged pool of ``block_size``-token blocks.

    With ``kv_budget_bytes`` the pool holds as many blocks as fit the budget (requests then wait
    for free blocks, and may be preempted); without, the pool is sized for the whole mix, so
    admission never waits for memory.
    """
    positive_int(block_size, "block_size", "serve_paged")
    if kv_budget_bytes is None:
        num_blocks = sum(blocks_needed(len(p) + n, block_size)  # serve() checks the lengths
                         for p, n in zip(prompts, max_tokens, strict=False))
    else:
        num_blocks = positive_int(int(kv_budget_bytes) // (kv_bytes_per_token(model) * block_size),
                                  "blocks in kv_budget_bytes", "serve_paged")
    store = PagedStore(model, num_blocks=max(num_blocks, 1), block_size=block_size)
    return serve(model, store, prompts, max_tokens, concurrency=concurrency)


def serve_contiguous(
    model: Any,
    prompts: Sequence[list[int]],
    max_tokens: Sequence[int],
    *,
    max_len: int,
    kv_budget_bytes: int,
) -> dict[str, Any]:
    """:func:`serve` over max-length rows: as many rows of ``max_len`` positions as fit the budget."""
    positive_int(max_len, "max_len", "serve_contiguous")
    slots = positive_int(int(kv_budget_bytes) // (kv_bytes_per_token(model) * max_len),
                         "max-length rows in kv_budget_bytes", "serve_contiguous")
    store = ContiguousStore(model, max_len=max_len, slots=slots)
    return serve(model, store, prompts, max_tokens, concurrency=slots)
