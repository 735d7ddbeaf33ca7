"""Study 08 (labkit.studies.runtime_benchmark): the matrix runs each runtime in its own process,
``rounds`` times interleaved, at each thread count; medians over processes with their spread,
ratios to torch eager within a round."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from labkit.studies import runtime_benchmark as rb

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "models" / "tiny-llama"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random tied GQA Llama (2 layers, hidden 64, vocab 8192) with the shipped tokenizer."""
    from labkit.ports.swift import random_llama

    out = tmp_path_factory.mktemp("rt") / "rt-llama"
    random_llama(out, "float32", 1, vocab_size=8192, hidden_size=64, intermediate_size=128,
                 layers=2, heads=4, kv_heads=2, max_positions=128, tie=True, init_std=0.2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED / name, out / name)
    return out


def _res(pp: float, tg: float, ttft: float = 0.01, load: float = 0.5) -> dict:
    return {"pp": {"mean": pp, "sd": 0.0}, "tg": {"mean": tg, "sd": 0.0},
            "ttft": {"8": {"mean": ttft, "sd": 0.0}}, "load_avg_1m": load, "dtype": "float32"}


def test_aggregate_takes_medians_over_processes_and_ratios_within_rounds() -> None:
    rounds = [{"torch-eager": _res(100, 10), "x": _res(200, 30)},
              {"torch-eager": _res(50, 5), "x": _res(110, 16)},   # a slow round: both slower
              {"torch-eager": _res(100, 10), "x": _res(190, 29, load=3.0)}]
    agg = rb.aggregate(rounds, "x")
    assert agg["pp"]["median"] == 190 and (agg["pp"]["min"], agg["pp"]["max"]) == (110, 200)
    assert agg["pp"]["processes"] == [200, 110, 190]
    assert agg["pp_vs_reference"]["median"] == pytest.approx(2.0)  # 2.0, 2.2, 1.9 within rounds
    assert agg["tg_vs_reference"]["processes"] == pytest.approx([3.0, 3.2, 2.9])
    assert agg["rounds"] == 3 and agg["load_avg_1m"] == 3.0
    assert agg["noisy"] == (3.0 > (__import__("os").cpu_count() or 1) / 2)
    assert agg["ttft"]["8"]["mean"] == pytest.approx(0.01)


def test_a_round_that_failed_reports_its_reason() -> None:
    rounds = [{"torch-eager": _res(100, 10), "x": _res(200, 30)},
              {"torch-eager": _res(100, 10), "x": {"runtime": "x", "failed": "boom"}}]
    assert rb.aggregate(rounds, "x")["failed"] == "boom"


def test_matrix_records_every_metric(folder, tmp_path, monkeypatch):
    """A small matrix (2 rounds, torch-eager in its own process each time) writes the records."""
    from labkit.core import results

    monkeypatch.setenv("LABKIT_OUTPUT_ROOT", str(tmp_path / "out"))
    monkeypatch.setenv("LABKIT_RUNTIME_CACHE", str(tmp_path / "cache"))
    spec = rb.Spec(model=str(folder), prompt_len=8, gen_len=3, repeats=2, ttft_lens=[4, 8],
                   parity_prompt=4, parity_gen=3, rounds=2)
    res = rb.run_matrix(spec, ["torch-eager", "coreml"], thread_counts=[1], progress=False)
    ref = res[("torch-eager", 1)]
    assert "pp" in ref, ref.get("failed")
    assert ref["parity"]["greedy_agreement_pct"] == 100.0 and len(ref["pp"]["processes"]) == 2
    assert ref["pp_vs_reference"]["processes"] == [1.0, 1.0]
    df = results.load_results(rb.STUDY)
    assert {"pp_tok_s", "tg_tok_s", "pp_vs_reference", "tg_vs_reference", "ttft_ms",
            "peak_rss_bytes", "greedy_agreement_pct", "max_abs_logit_err"} <= set(df["metric"])
    pp = df[df["metric"] == "pp_tok_s"].iloc[0]["params"]
    assert pp["rounds"] == 2 and pp["threads"] == 1 and len(pp["processes"]) == 2
    ttft = df[df["metric"] == "ttft_ms"]
    assert sorted(p["prompt_len"] for p in ttft["params"]) == [4, 8]
    if "skipped" in res[("coreml", 1)]:
        assert res[("coreml", 1)]["skipped"]
    table = rb.table(res, spec)
    assert "| torch-eager | 1 |" in table
    assert list(rb.matrix_frame(res, spec).index) == [("torch-eager", 1)]


def test_matrix_compares_llamacpp_as_logprobs(folder, tmp_path, monkeypatch):
    """Through the matrix (each runtime in its own process, parity from the saved files): the
    llama.cpp rows' log-probabilities are compared as log-probabilities, within 1e-3."""
    from labkit.core import tolerances as tol

    monkeypatch.setenv("LABKIT_OUTPUT_ROOT", str(tmp_path / "out"))
    monkeypatch.setenv("LABKIT_RUNTIME_CACHE", str(tmp_path / "cache"))
    spec = rb.Spec(model=str(folder), prompt_len=8, gen_len=3, repeats=1, ttft_lens=[4],
                   parity_prompt=4, parity_gen=4, rounds=1)
    res = rb.run_matrix(spec, ["llama.cpp-f32", "llama.cpp-server"], thread_counts=[1],
                        record=False, progress=False)
    for name in ("llama.cpp-f32", "llama.cpp-server"):
        r = res[(name, 1)]
        assert "pp" in r, r.get("failed") or r.get("skipped")
        assert r["parity"]["greedy_agreement_pct"] == 100.0
        assert r["parity"]["max_abs_logit_err"] <= tol.GGUF_F32.at("cpu")
