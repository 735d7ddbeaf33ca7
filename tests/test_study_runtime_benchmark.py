"""Study 08 (labkit.studies.runtime_benchmark): the matrix runs each runtime in its own process,
``rounds`` times interleaved, at each thread count; medians over processes with their spread,
ratios to torch eager within a round."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import random_llama_with_shipped_tokenizer

from labkit.studies import runtime_benchmark as rb


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random tied GQA Llama (2 layers, hidden 64, vocab 8192) with the shipped tokenizer."""
    return random_llama_with_shipped_tokenizer(tmp_path_factory.mktemp("rt") / "rt-llama", seed=1,
                                               max_positions=128, init_std=0.2)


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


def test_a_runtime_that_runs_fewer_rounds_is_aggregated_over_its_own(monkeypatch) -> None:
    """MLX off a Mac runs one process (Runtime.rounds_here): its row and its ratio come from the
    round it ran in, not from the reference's other rounds."""
    from labkit.runtimes import mlx_rt

    rounds = [{"torch-eager": _res(100, 10), "mlx": _res(20, 2)}, {"torch-eager": _res(50, 5)},
              {"torch-eager": _res(100, 10)}]
    agg = rb.aggregate(rounds, "mlx")
    assert agg["rounds"] == 1 and agg["tg"]["processes"] == [2]
    assert agg["tg_vs_reference"]["processes"] == [pytest.approx(0.2)]
    monkeypatch.setattr(mlx_rt.platform, "system", lambda: "Linux")
    assert mlx_rt.MlxRuntime.rounds_here(3) == 1 and rb.runtimes_rounds(["torch-eager", "mlx"], 3) == {
        "torch-eager": 3, "mlx": 1}
    monkeypatch.setattr(mlx_rt.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(mlx_rt.platform, "machine", lambda: "arm64")
    assert mlx_rt.MlxRuntime.rounds_here(3) == 3


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


def _measured(err=1e-5, dtype="float32", agree=100.0):
    return {"pp": {"mean": 100.0, "sd": 2.0, "min": 95.0, "max": 104.0},
            "tg": {"mean": 20.0, "sd": 0.5, "min": 19.0, "max": 21.0}, "dtype": dtype,
            "device": "cpu", "model_bytes": 2**21, "parity": {"greedy_agreement_pct": agree,
                                                              "max_abs_logit_err": err}}


SPEC = rb.Spec(model="m", prompt_len=8, gen_len=4)


def test_bench_frame_has_a_row_per_test_and_says_why_a_runtime_did_not_run():
    res = {("torch-eager", 1): _measured(0.0), ("coreml", 1): {"skipped": "needs macOS"},
           ("mlx", 1): {"failed": "Traceback\nRuntimeError: boom"}}
    frame = rb.bench_frame(res, SPEC)
    assert list(frame.test) == ["pp8", "tg4", "-", "-"]
    assert list(frame["t/s"]) == ["100.00 (95.00-104.00)", "20.00 (19.00-21.00)", "needs macOS",
                                  "failed: RuntimeError: boom"]
    assert frame.loc[0, "size"] == "2.0 MiB" and frame.loc[0, "max |dlogit|"] == "0.00e+00"
    assert frame.loc[2, "dtype"] == "-" and list(frame.threads) == [1, 1, 1, 1]


def test_markdown_table_escapes_pipes_so_it_stays_a_table():
    text = rb.table({("torch-eager", 2): _measured(0.0)}, SPEC)
    header, rule, *rows = text.splitlines()
    assert header == ("| runtime | threads | dtype | device | size | test | t/s | agree % | "
                      "max \\|dlogit\\| |")
    assert rule.count("|") == header.count("|") - header.count("\\|") and len(rows) == 2


def test_parity_claims_bound_float32_runtimes_and_report_quantized_ones():
    measured = {("torch-eager", 1): _measured(0.0), ("onnxruntime", 1): _measured(1e-3),
                ("llama.cpp-f32", 1): _measured(2e-3),
                ("llama.cpp-q4_0", 1): _measured(0.5, dtype="q4_0")}
    rows = rb.parity_claims(measured)
    verdicts = {claim.split(" ")[0].rstrip(","): ok for claim, ok, _ in rows}
    assert verdicts == {"torch-eager": True, "onnxruntime": True, "llama.cpp-f32": False}
    assert len(rows) == 3  # the reference agrees with itself; no row for the quantized file
    assert any("within 0.001" in claim for claim, _, _ in rows)  # llama.cpp's F32 bound
    assert all("(1 thread)" in claim for claim, _, _ in rows)


def test_peak_rss_is_the_clis_own_where_the_runtime_runs_one(monkeypatch) -> None:
    """The Swift row: the CLI process's own peak (wait4), not RUSAGE_CHILDREN, which also holds
    the ``swift build`` its load ran; other runtimes keep this process's (or its children's)."""
    from labkit.runtimes import base

    monkeypatch.setattr(base, "peak_rss_bytes", lambda: 100)
    monkeypatch.setattr(base, "children_peak_rss_bytes", lambda: 5000)  # SwiftPM's peak
    peak, note = rb.peak_rss(SimpleNamespace(note="BLAS: OpenBLAS", cli_peak_rss_bytes=300))
    assert peak == 300 and note.startswith("BLAS: OpenBLAS; peak RSS: the CLI process's own")
    peak, note = rb.peak_rss(SimpleNamespace(note="", cli_peak_rss_bytes=None))  # no run yet
    assert peak == 5000 and note == "peak RSS: its child processes' ru_maxrss (an upper bound)"
    monkeypatch.setattr(base, "children_peak_rss_bytes", lambda: 0)
    assert rb.peak_rss(SimpleNamespace(note=None)) == (100, None)
