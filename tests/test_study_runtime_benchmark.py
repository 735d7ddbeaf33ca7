"""Study 08 (labkit.studies.runtime_benchmark): its tables and the parity claims, on made-up results.

The matrix itself (each runtime in its own process) is tested in tests/test_runtimes.py.
"""

from __future__ import annotations

from labkit.studies import runtime_benchmark as rb


def _measured(err=1e-5, dtype="float32", agree=100.0):
    return {"pp": {"mean": 100.0, "sd": 2.0}, "tg": {"mean": 20.0, "sd": 0.5}, "dtype": dtype,
            "device": "cpu", "model_bytes": 2**21, "parity": {"greedy_agreement_pct": agree,
                                                              "max_abs_logit_err": err}}


SPEC = rb.Spec(model="m", prompt_len=8, gen_len=4)


def test_bench_frame_has_a_row_per_test_and_says_why_a_runtime_did_not_run():
    res = {"torch-eager": _measured(0.0), "coreml": {"skipped": "needs macOS"},
           "mlx": {"failed": "Traceback\nRuntimeError: boom"}}
    frame = rb.bench_frame(res, SPEC)
    assert list(frame.test) == ["pp8", "tg4", "-", "-"]
    assert list(frame["t/s"]) == ["100.00 ± 2.00", "20.00 ± 0.50", "needs macOS", "failed: RuntimeError: boom"]
    assert frame.loc[0, "size"] == "2.0 MiB" and frame.loc[0, "max |dlogit|"] == "0.00e+00"
    assert frame.loc[2, "dtype"] == "-"


def test_markdown_table_escapes_pipes_so_it_stays_a_table():
    text = rb.table({"torch-eager": _measured(0.0)}, SPEC)
    header, rule, *rows = text.splitlines()
    assert header == "| runtime | dtype | device | size | test | t/s | agree % | max \\|dlogit\\| |"
    assert rule.count("|") == header.count("|") - header.count("\\|") and len(rows) == 2


def test_parity_claims_bound_float32_runtimes_and_report_quantized_ones():
    measured = {"torch-eager": _measured(0.0), "onnxruntime": _measured(1e-3),
                "llama.cpp-f32": _measured(2e-3), "llama.cpp-q4_0": _measured(0.5, dtype="q4_0")}
    rows = rb.parity_claims(measured)
    verdicts = {claim.split(" ")[0].rstrip(","): ok for claim, ok, _ in rows}
    assert verdicts == {"torch-eager": True, "onnxruntime": True, "llama.cpp-f32": False}
    assert len(rows) == 3  # the reference agrees with itself; no row for the quantized file
    assert any("within 0.001" in claim for claim, _, _ in rows)  # llama.cpp's F32 bound
