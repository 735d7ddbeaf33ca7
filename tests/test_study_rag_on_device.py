"""labkit.studies.rag_on_device: the document set, search against a numpy reference, recall@k, prompts within
budget, and prefix KV-cache reuse that gives the same logits as a full prefill."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit.inference.generate import greedy
from labkit.inference.kv_cache import KVCache
from labkit.models import load
from labkit.studies import rag_on_device as rag

LOGIT_TOL = 1e-5  # float32: a cached prefix and a full prefill differ only by summation order


@pytest.fixture
def tiny_lm(hf_checkpoint):
    return load(hf_checkpoint("llama", num_key_value_heads=1), device="cpu")


def test_split_docstring_holds_out_the_first_sentence() -> None:
    summary, rest = rag.split_docstring("Join two paths. Returns a str.\n\nMore text here.")
    assert summary == "Join two paths."
    assert rest == "Returns a str.\n\nMore text here."
    assert rag.split_docstring("One line only")[0] == "One line only"


def test_docset_is_deterministic_and_labels_are_held_out() -> None:
    docs, queries = rag.stdlib_docset(("json", "textwrap", "shutil"))
    again = rag.stdlib_docset(("json", "textwrap", "shutil"))
    assert (docs, queries) == again
    assert len(docs) == len(queries) > 5
    assert [d.id for d in docs] == list(range(len(docs)))
    assert len({q.text for q in queries}) == len(queries)  # unambiguous labels
    for q in queries:
        doc = docs[q.doc_id]
        assert q.text not in doc.text, f"query leaks into {doc.name}"
        assert rag.MIN_QUERY_WORDS <= len(q.text.split()) <= rag.MAX_QUERY_WORDS
    names = {d.name for d in docs}
    assert "shutil.copytree" in names and "textwrap.dedent" in names


def test_shipped_docset_loads_and_matches_the_builder() -> None:
    docs, queries = rag.load_docset()
    assert len(docs) == len(queries) >= 300
    manifest = json.loads((rag.docset_dir() / "manifest.json").read_text())
    assert manifest["documents"] == len(docs)
    if manifest["python"] != sys.version.split()[0]:
        pytest.skip(f"data/rag was built on Python {manifest['python']}; docstrings differ by version")
    assert (docs, queries) == rag.stdlib_docset()


def test_save_and_load_round_trip_and_errors(tmp_path: Path) -> None:
    docs, queries = rag.stdlib_docset(("json",))
    rag.save_docset(docs, queries, tmp_path)
    assert rag.load_docset(tmp_path) == (docs, queries)
    (tmp_path / "queries.jsonl").write_text(json.dumps({"text": "x", "doc_id": 10**6}) + "\n")
    with pytest.raises(ValueError, match="doc_id"):
        rag.load_docset(tmp_path)
    (tmp_path / "docs.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="docs.jsonl"):
        rag.load_docset(tmp_path)


def test_faiss_index_matches_exact_numpy_search() -> None:
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((200, 32)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.standard_normal((17, 32)).astype(np.float32)
    index = rag.FaissIndex(docs)
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = rag.exact_search(docs, queries, 10)
    assert len(index) == 200
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    with pytest.raises(ValueError, match="k must be"):
        index.search(queries, 201)
    with pytest.raises(ValueError, match="queries must be"):
        index.search(queries[0], 3)


def test_recall_at_k_by_hand() -> None:
    retrieved = np.array([[3, 1, 2], [0, 5, 6], [9, 8, 7]])
    relevant = [1, 0, 4]
    assert rag.recall_at_k(retrieved, relevant, 1) == pytest.approx(1 / 3)
    assert rag.recall_at_k(retrieved, relevant, 2) == pytest.approx(2 / 3)
    assert rag.recall_at_k(retrieved, relevant, 3) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k must be"):
        rag.recall_at_k(retrieved, relevant, 4)
    with pytest.raises(ValueError, match="retrieved must be"):
        rag.recall_at_k(retrieved, relevant[:2], 1)


def test_prompt_keeps_whole_documents_within_budget(tiny_lm) -> None:
    tok = tiny_lm.tokenizer
    docs, _ = rag.stdlib_docset(("textwrap",))
    full, used_all = rag.prompt_ids(tok, "How do I wrap text?", docs, 10**6, bos_id=1)
    assert used_all == len(docs) and full[0] == 1
    budget = len(full) - 1
    ids, used = rag.prompt_ids(tok, "How do I wrap text?", docs, budget, bos_id=1)
    assert len(ids) <= budget and used < len(docs)
    # A budget of exactly one document's block: that document goes in whole, nothing else.
    bare, none_used = rag.prompt_ids(tok, "How do I wrap text?", [], 10**6, bos_id=1)
    block = rag.encode(tok, rag.context_block([docs[0]]))
    ids, used = rag.prompt_ids(tok, "How do I wrap text?", docs, len(bare) + len(block), bos_id=1)
    assert none_used == 0 and used == 1
    head = 1 + len(rag.encode(tok, rag.SYSTEM_PROMPT))
    assert ids == bare[:head] + block + bare[head:]
    with pytest.raises(ValueError, match="max_tokens"):
        rag.prompt_ids(tok, "q", docs, 3)


def test_prefix_reuse_gives_the_logits_of_a_full_prefill(tiny_lm) -> None:
    model = tiny_lm.model
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 128, (40,), generator=gen).tolist()
    suffixes = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (1, 7, 13)]
    shared = KVCache.for_model(model, max_len=len(prefix))
    rag.prefill(model, prefix, shared)
    snapshot = [k.clone() for k in shared.k]
    for suffix in suffixes:
        fork = rag.fork_cache(shared, len(prefix) + len(suffix))
        assert fork.length == len(prefix)
        reused = rag.prefill(model, suffix, fork)
        full = rag.prefill(model, prefix + suffix, KVCache.for_model(model, max_len=64))
        assert (reused - full).abs().max().item() <= LOGIT_TOL
    # Each query wrote into its own copy: the shared prefix is untouched.
    assert shared.length == len(prefix)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, shared.k, strict=True))
    with pytest.raises(ValueError, match="shorter than the prefix"):
        rag.fork_cache(shared, 10)


def test_timed_greedy_matches_greedy_with_and_without_a_prefix(tiny_lm) -> None:
    model = tiny_lm.model
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    timing, tokens = rag.timed_greedy(model, ids, 6)
    reference = greedy(model, torch.tensor([ids]), 6).new_tokens[0].tolist()
    assert tokens == reference
    assert timing.n_tokens == 6 and len(timing.tpot_s) == 5 and timing.ttft_s > 0
    shared = KVCache.for_model(model, max_len=20)
    rag.prefill(model, ids[:20], shared)
    _, continued = rag.timed_greedy(model, ids[20:], 6, cache=rag.fork_cache(shared, 36))
    assert continued == reference
