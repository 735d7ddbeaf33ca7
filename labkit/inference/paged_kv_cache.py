"""A paged KV cache: vLLM's PagedAttention idea (Kwon et al., SOSP 2023) in readable PyTorch.

Why: a contiguous cache (``labkit.inference.kv_cache.KVCache``) reserves ``max_len`` positions per
sequence up front, because it cannot grow in place. Most sequences stop far short of ``max_len``,
so most of that reservation is never written. A paged cache cuts the positions of a sequence into
fixed-size *blocks* of ``block_size`` tokens, stored anywhere in one shared pool, and keeps a
*block table* per sequence (logical block i -> physical block id), like virtual memory's page
table. A sequence holds only the blocks it has written, so the only slack is the unfilled tail of
its last block (internal fragmentation, < ``block_size`` positions per sequence).

Sharing comes for free: n continuations of one prompt (parallel sampling) can point their tables
at the same physical blocks. Each block carries a reference count; writing into a block that
another sequence also references first copies it (copy-on-write). Only the prompt's last,
partially filled block is ever written after a fork, so each continuation copies at most one block.

Layers, from the bottom:

* ``BlockAllocator`` — a fixed pool of block ids: a free list and reference counts.
* ``BlockTables`` — sequences -> block tables and lengths over one allocator; decides which blocks
  to allocate and which to copy before a write. No tensors, so the waste study
  (``labkit.studies.paged_kv_cache``) runs the same bookkeeping on thousands of requests without memory.
* ``PagedKVCache`` — the K and V pools (per layer ``[num_blocks, kv_heads, block_size, head_dim]``)
  plus the tables: writes K/V through the table and gathers them back for attention.
* ``SequenceCache`` — one sequence seen through the ``Cache`` protocol of ``kv_cache.py``
  (``length``, ``update``, ``advance``), so the unmodified labkit Llama prefills and decodes with
  it at batch 1: ``update`` gathers the sequence's blocks into a contiguous K/V for attention.
* Batched decode of sequences of different lengths: ``PagedBatch`` (paged) and ``PaddedBatch``
  (max-length preallocation, one row of a ``KVCache`` per sequence, the baseline) give per-row
  positions; ``decode_step`` runs the model's own layers one token per sequence with RoPE at each
  row's position and a padding mask over positions a row has not reached.

vLLM's kernel reads the blocks in place inside the attention kernel; this readable version
gathers them into a contiguous tensor first (a copy per layer per step), which is the cost the
notebook measures on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from labkit.models.layers import SequentialCache, cache_layout

if TYPE_CHECKING:  # torch is heavy; the bookkeeping classes do not need it
    import torch

    from labkit.inference.kv_cache import KVCache


class AllocatorError(RuntimeError):
    """A block was freed twice, shared while free, or the pool ran out."""


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


def blocks_needed(positions: int, block_size: int) -> int:
    """Blocks that hold ``positions`` tokens: ceil(positions / block_size)."""
    return -(-positions // block_size)


# --- the allocator -------------------------------------------------------------------------------


class BlockAllocator:
    """``num_blocks`` physical block ids with a free list and a reference count per block.

    A block is *free* (count 0, on the free list) or *in use* (count >= 1: the number of block
    tables that point at it). ``allocate`` pops the free list, ``share`` adds a reference,
    ``free`` drops one and returns the block to the free list when none is left. Freeing a free
    block is a bug in the caller, so it raises instead of corrupting the list.
    """

    def __init__(self, num_blocks: int) -> None:
        _positive_int("BlockAllocator", "num_blocks", num_blocks)
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.free_list = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_list)

    def allocate(self) -> int:
        """A free block with reference count 1."""
        if not self.free_list:
            raise AllocatorError(
                f"BlockAllocator: all {self.num_blocks} blocks are in use; "
                "free a sequence or build the cache with more num_blocks"
            )
        block = self.free_list.pop()
        self.refcount[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more table points at ``block`` (a fork)."""
        if self.refcount[block] <= 0:
            raise AllocatorError(f"BlockAllocator: cannot share block {block}: it is free")
        self.refcount[block] += 1

    def free(self, block: int) -> None:
        """One table stops pointing at ``block``; the last one returns it to the free list."""
        if self.refcount[block] <= 0:
            raise AllocatorError(f"BlockAllocator: double free of block {block}")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self.free_list.append(block)

    def check(self) -> None:
        """Raise AllocatorError unless: free list has no duplicates and holds exactly the blocks
        with count 0, and no count is negative."""
        free = set(self.free_list)
        if len(free) != len(self.free_list):
            raise AllocatorError("BlockAllocator: a block is on the free list twice")
        for block, count in enumerate(self.refcount):
            if count < 0 or (count == 0) != (block in free):
                raise AllocatorError(
                    f"BlockAllocator: block {block} has count {count} but is "
                    f"{'on' if block in free else 'off'} the free list"
                )


# --- block tables (bookkeeping only) -------------------------------------------------------------


class BlockTables:
    """Per sequence: a block table (logical block -> physical block id) and a length.

    Sequences are numbered by ``add_sequence`` / ``fork``. Before tokens are written at positions
    ``[length, length + n)``, ``prepare_write`` makes every block they land in private to the
    sequence: it allocates blocks past the end of the table and replaces a shared block by a fresh
    one, returning the ``(src, dst)`` copies the storage must perform (copy-on-write). It is
    idempotent, so every layer of one forward may call it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = _positive_int("BlockTables", "block_size", block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self._next_id = 0
        self.copies_made = 0  # copy-on-write copies so far (the notebook reports it)

    def _check_seq(self, seq: int) -> None:
        if seq not in self.tables:
            raise KeyError(f"BlockTables: no sequence {seq!r} (live: {sorted(self.tables)})")

    def add_sequence(self) -> int:
        """A new, empty sequence; returns its id."""
        seq = self._next_id
        self._next_id += 1
        self.tables[seq] = []
        self.lengths[seq] = 0
        return seq

    def fork(self, parent: int) -> int:
        """A new sequence sharing all of ``parent``'s blocks (no copy until one of them writes)."""
        self._check_seq(parent)
        child = self.add_sequence()
        for block in self.tables[parent]:
            self.allocator.share(block)
        self.tables[child] = list(self.tables[parent])
        self.lengths[child] = self.lengths[parent]
        return child

    def free_sequence(self, seq: int) -> None:
        """Drop the sequence and its references to its blocks."""
        self._check_seq(seq)
        for block in self.tables.pop(seq):
            self.allocator.free(block)
        del self.lengths[seq]

    def truncate(self, seq: int) -> None:
        """Empty the sequence (length 0, no blocks) but keep its id."""
        self._check_seq(seq)
        for block in self.tables[seq]:
            self.allocator.free(block)
        self.tables[seq] = []
        self.lengths[seq] = 0

    def prepare_write(self, seq: int, num_tokens: int) -> list[tuple[int, int]]:
        """Make the blocks of positions [length, length + num_tokens) private; return the copies.

        On AllocatorError (pool exhausted) the blocks allocated so far stay in the table, so the
        sequence stays consistent and ``free_sequence`` releases them.
        """
        self._check_seq(seq)
        if num_tokens <= 0:
            return []
        table = self.tables[seq]
        start = self.lengths[seq]
        first = start // self.block_size
        last = (start + num_tokens - 1) // self.block_size
        copies = []
        for i in range(first, last + 1):
            if i == len(table):
                table.append(self.allocator.allocate())
            elif self.allocator.refcount[table[i]] > 1:  # shared: copy before writing
                fresh = self.allocator.allocate()
                copies.append((table[i], fresh))
                self.allocator.free(table[i])
                table[i] = fresh
        self.copies_made += len(copies)
        return copies

    def advance(self, seq: int, num_tokens: int) -> None:
        """Mark ``num_tokens`` more positions written (after ``prepare_write`` and the writes)."""
        self._check_seq(seq)
        new_length = self.lengths[seq] + num_tokens
        if blocks_needed(new_length, self.block_size) > len(self.tables[seq]):
            raise ValueError(
                f"BlockTables: sequence {seq} cannot advance to {new_length} positions: its table "
                f"has {len(self.tables[seq])} blocks; call prepare_write first"
            )
        self.lengths[seq] = new_length

    def slot(self, seq: int, position: int) -> tuple[int, int]:
        """(physical block, offset in block) of a position of a sequence."""
        return self.tables[seq][position // self.block_size], position % self.block_size

    # -- accounting --

    def positions_stored(self) -> int:
        """Token positions written, counted once per sequence (a shared prompt counts n times)."""
        return sum(self.lengths.values())

    def slots_reserved(self) -> int:
        """Positions held by blocks in use: blocks x block_size (shared blocks counted once)."""
        return self.allocator.num_used * self.block_size

    def check(self) -> None:
        """Raise AllocatorError unless every block's count equals the number of tables holding it,
        the allocator is consistent, and every table covers its sequence's length."""
        self.allocator.check()
        held = [0] * self.allocator.num_blocks
        for seq, table in self.tables.items():
            if len(table) < blocks_needed(self.lengths[seq], self.block_size):
                raise AllocatorError(f"BlockTables: sequence {seq}'s table is shorter than it")
            if len(set(table)) != len(table):
                raise AllocatorError(f"BlockTables: sequence {seq} holds a block twice")
            for block in table:
                held[block] += 1
        if held != self.allocator.refcount:
            leaked = [
                b
                for b, (h, c) in enumerate(zip(held, self.allocator.refcount, strict=True))
                if h != c
            ]
            raise AllocatorError(
                f"BlockTables: reference counts disagree with the tables at blocks {leaked[:10]}"
            )


# --- the paged cache (tensors) -------------------------------------------------------------------


class PagedKVCache:
    """K and V pools shared by all sequences, addressed through ``BlockTables``.

    Per layer: ``k_pool[layer]`` and ``v_pool[layer]`` of shape
    ``[num_blocks, num_kv_heads, block_size, head_dim]``. A physical block id addresses the same
    block in every layer, so one table serves all layers (as in vLLM).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        import torch

        for name, value in (
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
        ):
            _positive_int("PagedKVCache", name, value)
        self.tables = BlockTables(num_blocks, block_size)
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        dtype = dtype or torch.float32
        self.k_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_pool = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model: Any, *, num_blocks: int, block_size: int = 16) -> PagedKVCache:
        """A pool shaped for ``model`` (anything with a LlamaConfig-like ``.config``)."""
        return cls(**cache_layout(model), num_blocks=num_blocks, block_size=block_size)

    @property
    def block_size(self) -> int:
        return self.tables.block_size

    @property
    def num_layers(self) -> int:
        return len(self.k_pool)

    # -- sequences --

    def add_sequence(self) -> int:
        return self.tables.add_sequence()

    def fork(self, parent: int) -> int:
        return self.tables.fork(parent)

    def free_sequence(self, seq: int) -> None:
        self.tables.free_sequence(seq)

    def length(self, seq: int) -> int:
        return self.tables.lengths[seq]

    def sequence(self, seq: int | None = None) -> SequenceCache:
        """The ``Cache``-protocol view of sequence ``seq`` (a new sequence when None)."""
        return SequenceCache(self, self.add_sequence() if seq is None else seq)

    # -- writing and reading through the table --

    def prepare_write(self, seq: int, num_tokens: int) -> None:
        """Allocate the blocks the next ``num_tokens`` positions need and copy shared ones."""
        for src, dst in self.tables.prepare_write(seq, num_tokens):
            for pool in self.k_pool + self.v_pool:  # the copy covers every layer at once
                pool[dst] = pool[src]

    def slots(self, seqs: Sequence[int], positions: Sequence[int]) -> tuple[torch.Tensor, ...]:
        """Physical block ids and in-block offsets of (sequence, position) pairs, as tensors."""
        import torch

        pairs = [self.tables.slot(s, p) for s, p in zip(seqs, positions, strict=True)]
        device = self.k_pool[0].device
        blocks = torch.tensor([b for b, _ in pairs], dtype=torch.long, device=device)
        offsets = torch.tensor([o for _, o in pairs], dtype=torch.long, device=device)
        return blocks, offsets

    def write(
        self,
        layer: int,
        blocks: torch.Tensor,
        offsets: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store rows ``k[i], v[i]`` (``[N, kv_heads, head_dim]``) at slot (blocks[i], offsets[i])."""
        # Two index tensors around a slice: the indexed dims come first, [N, kv_heads, head_dim].
        self.k_pool[layer][blocks, :, offsets] = k
        self.v_pool[layer][blocks, :, offsets] = v

    def block_table_tensor(self, seqs: Sequence[int]) -> torch.Tensor:
        """``[B, max_blocks]`` block ids, rows padded with block 0 (masked out by the reader)."""
        import torch

        tables = [self.tables.tables[s] for s in seqs]
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.long, device=self.k_pool[0].device)

    def gather(
        self, layer: int, table: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[B, kv_heads, length, head_dim]`` read through ``table`` ``[B, blocks]``.

        ``pool[table]`` is ``[B, blocks, kv_heads, block_size, head_dim]``; moving the heads in
        front and merging (blocks, block_size) lays the positions out in order. (Written with
        ``index_select``, which copies whole blocks, instead of ``pool[table]``: the same values,
        but on the CPU advanced indexing was ~50x slower here.)
        """
        b, n = table.shape
        out = []
        for pool in (self.k_pool[layer], self.v_pool[layer]):
            _, heads, block, dim = pool.shape
            blocks = pool.index_select(0, table.reshape(-1)).view(b, n, heads, block, dim)
            x = blocks.permute(0, 2, 1, 3, 4).reshape(b, heads, n * block, dim)
            out.append(x[:, :, :length])
        return out[0], out[1]

    # -- accounting --

    def bytes_per_block(self) -> int:
        """K and V bytes of one block across all layers."""
        return sum(p[0].numel() * p.element_size() for p in self.k_pool + self.v_pool)

    def nbytes(self) -> int:
        """Bytes of the whole pool (allocated up front, used or not)."""
        return sum(p.numel() * p.element_size() for p in self.k_pool + self.v_pool)

    def bytes_in_use(self) -> int:
        """Bytes of the blocks some sequence holds (shared blocks once)."""
        return self.tables.allocator.num_used * self.bytes_per_block()

    def __repr__(self) -> str:
        n, h, bs, d = self.k_pool[0].shape
        a = self.tables.allocator
        return (
            f"PagedKVCache(layers={self.num_layers}, blocks={a.num_used}/{n} used, "
            f"block_size={bs}, kv_heads={h}, head_dim={d}, sequences={len(self.tables.tables)})"
        )


class SequenceCache(SequentialCache):
    """One sequence of a ``PagedKVCache`` behind the ``Cache`` protocol (batch 1).

    ``update`` writes the new positions through the block table, then gathers all of the
    sequence's blocks into contiguous K/V for the model's attention.
    """

    def __init__(self, cache: PagedKVCache, seq: int) -> None:
        self.cache = cache
        self.seq = seq
        self._prepared: tuple[int, int] | None = None  # (length, T) of the forward in progress
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None
        self._table: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.cache.length(self.seq)

    def _prepare(self, num_tokens: int) -> None:
        """Once per forward (the first layer): allocate/copy blocks, compute slots and table."""
        if self._prepared == (self.length, num_tokens):
            return
        self.cache.prepare_write(self.seq, num_tokens)
        positions = range(self.length, self.length + num_tokens)
        self._slots = self.cache.slots([self.seq] * num_tokens, positions)
        self._table = self.cache.block_table_tensor([self.seq])
        self._prepared = (self.length, num_tokens)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if k.shape[0] != 1:
            raise ValueError(
                f"SequenceCache holds one sequence; got a batch of {k.shape[0]} "
                "(use PagedBatch and decode_step for several)"
            )
        num_tokens = k.shape[2]
        self._prepare(num_tokens)
        blocks, offsets = self._slots
        # [1, kv_heads, T, d] -> [T, kv_heads, d]: one row per position written
        self.cache.write(layer, blocks, offsets, k[0].transpose(0, 1), v[0].transpose(0, 1))
        return self.cache.gather(layer, self._table, self.length + num_tokens)

    def advance(self, num_tokens: int) -> None:
        self.cache.tables.advance(self.seq, num_tokens)
        self._prepared = None

    def reset(self) -> None:
        """Release the sequence's blocks and start again at length 0 (``generate`` calls this)."""
        self.cache.tables.truncate(self.seq)
        self._prepared = None


# --- batched decode: several sequences of different lengths, one token each ---------------------


class _RowsAtPositions:
    """A model cache over B rows at different positions, one new token per row per forward.

    ``positions(1)`` is called first in every forward: it reserves the slot each row writes
    (``_begin``) and returns ``[B, 1, 1]`` positions, so each row gets RoPE at its own position;
    ``mask(1)`` hides the positions beyond each row's length (padding in the batch's K/V).
    Subclasses implement ``_begin``, ``update`` and ``advance``.
    """

    _positions_now: list[int]

    def positions(self, num_tokens: int) -> torch.Tensor:
        import torch

        if num_tokens != 1:
            raise ValueError(
                f"{type(self).__name__} decodes one token per row per step, got {num_tokens}"
            )
        self._positions_now = self._begin()
        self._read_length = max(self._positions_now) + 1
        return torch.tensor(self._positions_now, dtype=torch.long,
                            device=self._device())[:, None, None]

    def mask(self, num_tokens: int) -> torch.Tensor:
        import torch

        device = self._device()
        positions = torch.tensor(self._positions_now, dtype=torch.long, device=device)
        span = torch.arange(self._read_length, device=device)
        return (span[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, S]


class PagedBatch(_RowsAtPositions):
    """Sequences of a ``PagedKVCache`` decoded together, each at its own position."""

    def __init__(self, cache: PagedKVCache, seqs: Sequence[int]) -> None:
        self.cache = cache
        self.seqs = list(seqs)

    @property
    def lengths(self) -> list[int]:
        """Positions each row has filled (the position its next token gets)."""
        return [self.cache.length(s) for s in self.seqs]

    def _device(self) -> torch.device:
        return self.cache.k_pool[0].device

    def _begin(self) -> list[int]:
        for s in self.seqs:
            self.cache.prepare_write(s, 1)
        positions = self.lengths
        self._slots = self.cache.slots(self.seqs, positions)
        self._table = self.cache.block_table_tensor(self.seqs)
        return positions

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.write(layer, *self._slots, k[:, :, 0], v[:, :, 0])
        return self.cache.gather(layer, self._table, self._read_length)

    def advance(self, num_tokens: int) -> None:
        for s in self.seqs:
            self.cache.tables.advance(s, num_tokens)


class PaddedBatch(_RowsAtPositions):
    """The baseline: max-length preallocation, one row of a contiguous ``KVCache`` per sequence.

    Every row reserves ``max_len`` positions whatever its real length. ``row(i)`` is a
    ``Cache``-protocol view of row i for the batch-1 prefill.
    """

    def __init__(self, kv: KVCache) -> None:
        self.kv = kv
        self.lengths = [0] * kv.k[0].shape[0]

    def row(self, index: int) -> _PaddedRow:
        return _PaddedRow(self, index)

    def _device(self) -> torch.device:
        return self.kv.k[0].device

    def _begin(self) -> list[int]:
        import torch

        if max(self.lengths) + 1 > self.kv.max_len:
            raise ValueError(f"PaddedBatch: a row would pass max_len={self.kv.max_len}")
        device = self._device()
        self._rows = torch.arange(len(self.lengths), device=device)
        self._positions = torch.tensor(self.lengths, dtype=torch.long, device=device)
        return list(self.lengths)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv.k[layer][self._rows, :, self._positions] = k[:, :, 0]
        self.kv.v[layer][self._rows, :, self._positions] = v[:, :, 0]
        n = self._read_length
        return self.kv.k[layer][:, :, :n], self.kv.v[layer][:, :, :n]

    def advance(self, num_tokens: int) -> None:
        self.lengths = [n + num_tokens for n in self.lengths]


class _PaddedRow(SequentialCache):
    """Row ``index`` of a PaddedBatch as a batch-1 ``Cache`` (for prefilling one prompt)."""

    def __init__(self, batch: PaddedBatch, index: int) -> None:
        self.batch = batch
        self.index = index

    @property
    def length(self) -> int:
        return self.batch.lengths[self.index]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, end, i = self.length, self.length + k.shape[2], self.index
        if end > self.batch.kv.max_len:
            raise ValueError(f"PaddedBatch: {end} positions exceed max_len={self.batch.kv.max_len}")
        kbuf, vbuf = self.batch.kv.k[layer], self.batch.kv.v[layer]
        kbuf[i : i + 1, :, start:end] = k
        vbuf[i : i + 1, :, start:end] = v
        return kbuf[i : i + 1, :, :end], vbuf[i : i + 1, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.batch.lengths[self.index] += num_tokens


def decode_step(model: Any, kv: PagedBatch | PaddedBatch, tokens: torch.Tensor) -> torch.Tensor:
    """One decode step of a labkit ``Llama`` for B sequences at different positions.

    ``tokens`` [B] are each sequence's newest token; returns the next-token logits [B, vocab].
    The model's own forward does the work: the batch cache gives each row its position for RoPE
    and a mask over the positions beyond each row's length.
    """
    longest = max(kv.lengths)
    if longest + 1 > model.rope_cos.shape[0]:
        raise ValueError(
            f"decode_step: position {longest} exceeds max_position_embeddings="
            f"{model.rope_cos.shape[0]}"
        )
    return model(tokens[:, None], cache=kv)[:, -1]


def greedy_batch(
    model: Any, kv: PagedBatch | PaddedBatch, last_tokens: torch.Tensor, max_new_tokens: int
) -> torch.Tensor:
    """Greedy-decode ``max_new_tokens`` per row after prefill; returns the new tokens [B, n].

    ``last_tokens`` [B] is each row's first generated token (the argmax of its prefill logits),
    which the caller already holds; it is fed back first and is the first column of the result.
    """
    import torch

    out = [last_tokens]
    with torch.inference_mode():
        for _ in range(max_new_tokens - 1):
            out.append(decode_step(model, kv, out[-1]).argmax(-1))
    return torch.stack(out, dim=1)


def prefill(model: Any, cache: Any, prompt: torch.Tensor) -> torch.Tensor:
    """Run ``prompt`` [T] (one sequence) through ``model`` into a batch-1 ``Cache``; return the
    logits of its last position [vocab]."""
    import torch

    with torch.inference_mode():
        return model(prompt[None, :], cache=cache)[0, -1]
