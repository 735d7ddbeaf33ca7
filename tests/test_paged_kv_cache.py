"""The paged KV cache against the contiguous one (greedy tokens identical, with and without shared
prefixes, batch 1 and batched), and its allocator under a seeded random workload (no double
free, no leak: reference counts always equal the block tables' references)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY_SHAPE, random_llama

from labkit.core import tolerances as tol
from labkit.inference import generate
from labkit.inference.kv_cache import Cache, KVCache
from labkit.inference.paged_kv_cache import (
    AllocatorError,
    BlockAllocator,
    BlockTables,
    PaddedBatch,
    PagedBatch,
    PagedKVCache,
    greedy_batch,
    prefill,
)
from labkit.models.llama import Llama

VOCAB = TINY_SHAPE["vocab_size"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model() -> Llama:
    """A tiny random Llama with GQA (4 query heads, 2 KV heads). Weights drawn with std 0.3
    rather than the training init (0.02), so the logits are peaked and greedy ties impossible."""
    m = random_llama(0, max_position_embeddings=128)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def _prompts(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def _contiguous_greedy(model: Llama, prompt: torch.Tensor, n: int) -> generate.Generation:
    return generate.greedy(model, prompt[None], n, return_logits=True)


# --- allocator ----------------------------------------------------------------------------------


def test_allocator_refuses_double_free_and_exhaustion():
    a = BlockAllocator(2)
    b0, b1 = a.allocate(), a.allocate()
    assert {b0, b1} == {0, 1} and a.num_free == 0
    with pytest.raises(AllocatorError, match="all 2 blocks"):
        a.allocate()
    a.share(b0)
    a.free(b0)
    a.free(b0)
    with pytest.raises(AllocatorError, match="double free"):
        a.free(b0)
    with pytest.raises(AllocatorError, match="free"):
        a.share(b0)
    a.check()
    assert a.num_free == 1


def test_check_catches_a_corrupted_free_list():
    a = BlockAllocator(3)
    a.allocate()
    a.free_list.append(a.free_list[0])  # a block listed twice
    with pytest.raises(AllocatorError, match="twice"):
        a.check()
    t = BlockTables(4, 2)
    s = t.add_sequence()
    t.prepare_write(s, 3)
    t.advance(s, 3)
    t.allocator.refcount[t.tables[s][0]] += 1  # a leaked reference
    with pytest.raises(AllocatorError, match="disagree"):
        t.check()


@pytest.mark.parametrize("block_size", [0, -1, 2.5, True])
def test_bad_block_size_is_named(block_size):
    with pytest.raises(ValueError, match="block_size"):
        BlockTables(4, block_size)


def test_randomized_alloc_fork_append_free_never_leaks():
    """Many seeded random operations; after each one the invariants hold, and at the end every
    block is back on the free list."""
    rng = random.Random(1234)
    tables = BlockTables(num_blocks=64, block_size=4)
    ops = {"add": 0, "fork": 0, "append": 0, "free": 0, "full": 0}
    for _ in range(3000):
        live = list(tables.tables)
        op = rng.choice(["add", "fork", "append", "append", "append", "free"] if live else ["add"])
        try:
            if op == "add":
                tables.add_sequence()
            elif op == "fork":
                tables.fork(rng.choice(live))
            elif op == "append":
                seq, n = rng.choice(live), rng.randint(1, 9)
                tables.prepare_write(seq, n)
                tables.advance(seq, n)
            else:
                tables.free_sequence(rng.choice(live))
            ops[op] += 1
        except AllocatorError:
            ops["full"] += 1  # pool exhausted: tables must still be consistent
            tables.free_sequence(rng.choice(list(tables.tables)))
        tables.check()
        assert tables.allocator.num_used <= 64
    assert min(ops.values()) > 0, ops  # every kind of operation, and exhaustion, happened
    assert tables.copies_made > 0
    for seq in list(tables.tables):
        tables.free_sequence(seq)
    tables.check()
    assert tables.allocator.num_free == 64


def test_copy_on_write_copies_the_shared_partial_block_once():
    cache = PagedKVCache(num_layers=2, num_kv_heads=1, head_dim=2, num_blocks=8, block_size=4)
    parent = cache.add_sequence()
    cache.prepare_write(parent, 6)  # blocks: [full 4][2 of 4]
    blocks, offsets = cache.slots([parent] * 6, range(6))
    values = torch.arange(12.0).view(6, 1, 2)
    for layer in range(2):
        cache.write(layer, blocks, offsets, values, -values)
    cache.tables.advance(parent, 6)
    child = cache.fork(parent)
    assert cache.tables.tables[child] == cache.tables.tables[parent]
    assert cache.tables.allocator.num_used == 2

    cache.prepare_write(child, 1)  # first write into the shared partial block: copy it
    assert cache.tables.copies_made == 1
    assert cache.tables.tables[child][0] == cache.tables.tables[parent][0]  # full block shared
    assert cache.tables.tables[child][1] != cache.tables.tables[parent][1]
    cache.prepare_write(parent, 1)  # now private again: no copy
    assert cache.tables.copies_made == 1
    for seq in (parent, child):
        table = cache.block_table_tensor([seq])
        for layer in range(2):
            k, v = cache.gather(layer, table, 6)
            torch.testing.assert_close(k[0, 0], values[:, 0], rtol=0, atol=0)
            torch.testing.assert_close(v[0, 0], -values[:, 0], rtol=0, atol=0)
    cache.tables.check()


# --- paged vs contiguous: greedy tokens -----------------------------------------------------------


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_batch1_greedy_identical_to_contiguous(model, block_size):
    cache = PagedKVCache.for_model(model, num_blocks=96, block_size=block_size)
    assert isinstance(cache.sequence(), Cache)
    for prompt in _prompts([1, 5, 16, 17]):
        ref = _contiguous_greedy(model, prompt, NEW_TOKENS)
        seq = cache.sequence()
        got = generate.greedy(model, prompt[None], NEW_TOKENS, cache=seq, return_logits=True)
        assert torch.equal(got.tokens, ref.tokens)
        # same K/V values gathered into the same shapes: the logits agree to the bit
        torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=0)
        cache.free_sequence(seq.seq)
    cache.tables.check()
    assert cache.tables.allocator.num_used == 0


@pytest.mark.parametrize("block_size", [1, 4, 7])
def test_batched_decode_of_different_lengths_matches_contiguous(model, block_size):
    prompts = _prompts([3, 11, 8, 20], seed=2)
    refs = [_contiguous_greedy(model, p, NEW_TOKENS) for p in prompts]

    paged = PagedKVCache.for_model(model, num_blocks=128, block_size=block_size)
    seqs = [paged.sequence() for _ in prompts]
    first = torch.stack([prefill(model, s, p).argmax() for s, p in zip(seqs, prompts, strict=True)])
    got_paged = greedy_batch(model, PagedBatch(paged, [s.seq for s in seqs]), first, NEW_TOKENS)

    padded = PaddedBatch(KVCache.for_model(model, max_len=64, batch=len(prompts)))
    first = torch.stack([prefill(model, padded.row(i), p).argmax() for i, p in enumerate(prompts)])
    got_padded = greedy_batch(model, padded, first, NEW_TOKENS)

    for i, ref in enumerate(refs):
        assert torch.equal(got_paged[i], ref.new_tokens[0]), f"paged row {i}"
        assert torch.equal(got_padded[i], ref.new_tokens[0]), f"padded row {i}"
    assert padded.lengths == [len(p) + NEW_TOKENS - 1 for p in prompts]
    paged.tables.check()


def test_batched_decode_logits_close_to_contiguous(model):
    from labkit.inference.paged_kv_cache import decode_step

    prompts = _prompts([4, 9], seed=3)
    paged = PagedKVCache.for_model(model, num_blocks=16, block_size=4)
    seqs = [paged.sequence() for _ in prompts]
    first = torch.stack([prefill(model, s, p).argmax() for s, p in zip(seqs, prompts, strict=True)])
    with torch.inference_mode():
        logits = decode_step(model, PagedBatch(paged, [s.seq for s in seqs]), first)
        for i, p in enumerate(prompts):
            ref = model(torch.cat([p, first[i : i + 1]])[None])[0, -1]
            # batched decode pads K/V and masks it: another reduction shape than batch 1, the
            # same math (tokens must still match)
            torch.testing.assert_close(logits[i], ref, rtol=0, atol=tol.SAME_MATH.at("cpu"))


@pytest.mark.parametrize("block_size", [4, 5])
def test_shared_prefix_greedy_identical_to_contiguous(model, block_size):
    """Parallel continuations: one prompt written once, forked; each fork appends its own suffix
    (the first write lands in the shared, partially filled last block: copy-on-write) and then
    decodes greedily, batched. Each must equal prompt + suffix decoded alone in a KVCache."""
    prompt = _prompts([11], seed=4)[0]  # 11 = not a multiple of either block size
    suffixes = _prompts([1, 3, 2, 6], seed=5)
    cache = PagedKVCache.for_model(model, num_blocks=64, block_size=block_size)
    root = cache.sequence()
    prefill(model, root, prompt)
    blocks_after_prompt = cache.tables.allocator.num_used
    seqs = [root] + [cache.sequence(cache.fork(root.seq)) for _ in suffixes[1:]]
    assert cache.tables.allocator.num_used == blocks_after_prompt  # forks copy nothing
    first = torch.stack(
        [prefill(model, s, suf).argmax() for s, suf in zip(seqs, suffixes, strict=True)]
    )
    assert cache.tables.copies_made == len(suffixes) - 1  # the last one to write keeps the block
    got = greedy_batch(model, PagedBatch(cache, [s.seq for s in seqs]), first, NEW_TOKENS)
    for i, suf in enumerate(suffixes):
        ref = _contiguous_greedy(model, torch.cat([prompt, suf]), NEW_TOKENS)
        assert torch.equal(got[i], ref.new_tokens[0]), f"continuation {i}"
    # the full prompt blocks are held once, not once per continuation
    full = len(prompt) // block_size
    tables = [cache.tables.tables[s.seq] for s in seqs]
    assert all(t[:full] == tables[0][:full] for t in tables)
    cache.tables.check()
    for s in seqs:
        cache.free_sequence(s.seq)
    cache.tables.check()
    assert cache.tables.allocator.num_used == 0


def test_sequence_cache_refuses_a_batch(model):
    cache = PagedKVCache.for_model(model, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="one sequence"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache.sequence())
