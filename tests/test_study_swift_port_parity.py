"""labkit.studies.swift_port_parity: notebook 04's parity tables, speed comparison, figures and
sentences. The Swift CLI and the PyTorch reference are replaced by fakes where a test is about
the bookkeeping; torch_model is checked against transformers on a tiny random folder."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from labkit.core import tolerances
from labkit.ports import refdump
from labkit.ports import swift as swiftport
from labkit.studies import swift_port_parity as study


def _ref(logits: np.ndarray, hidden: np.ndarray, prompt: int = 2) -> refdump.RefDump:
    return refdump.RefDump(
        prompt_tokens=np.arange(prompt),
        layer_indices=list(range(hidden.shape[0])),
        hidden=hidden,
        logits=logits,
        greedy_tokens=np.argmax(logits, axis=1),
        meta={"min_top2_margin": 0.5},
    )


def _model(label: str = "llama", stored: str = "float32") -> study.CheckedModel:
    return study.CheckedModel(
        label, "llama", Path("/src"), label, "note", stored=stored,
        dirs={"float32": Path("/f32"), "float16": Path("/f16")}, prompt=[0, 1],
    )


# --- parity bookkeeping -------------------------------------------------------------------------


def test_first_mismatch():
    assert study.first_mismatch([1, 2, 3], [1, 2, 3]) == 3
    assert study.first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert study.first_mismatch([4], [1]) == 0


def test_step_and_layer_errors_are_absolute_and_relative():
    ref_logits = np.array([[1.0, -4.0], [2.0, 0.0]], dtype=np.float32)
    ours = ref_logits + np.array([[0.5, 0.0], [0.0, -0.25]], dtype=np.float32)
    rows = study.step_errors("m", "float32", ours, ref_logits.astype(np.float64))
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["max_abs"] == 0.5 and rows[0]["rel"] == 0.5 / 4
    assert rows[1]["max_abs"] == 0.25 and rows[1]["rel"] == 0.25 / 2
    hidden = np.ones((2, 3, 4), dtype=np.float32)
    ref = _ref(np.zeros((2, 5), np.float32), hidden * 2)
    rows = study.layer_errors("m", "float16", hidden, ref)
    assert [(r["layer"], r["max_abs"], r["rel"]) for r in rows] == [(0, 1.0, 0.5), (1, 1.0, 0.5)]


def test_port_only_error_reuses_the_reference_on_the_same_weights(monkeypatch):
    ref = _ref(np.eye(3, dtype=np.float32), np.zeros((1, 4, 2), np.float32))
    ours = ref.logits + 1e-3
    calls = []

    def fake_reference(folder, prompt, steps, force=None):
        calls.append((folder, list(force)))
        return SimpleNamespace(logits=ours.astype(np.float64) - 2e-3)

    monkeypatch.setattr(swiftport, "reference", fake_reference)
    near = lambda x: pytest.approx(x, rel=1e-4)  # noqa: E731  (ours is float32)
    assert study.port_only_error(_model(), "float32", ours, ref, 3, 3) == near(1e-3)
    assert study.port_only_error(_model(stored="float16"), "float16", ours, ref, 3, 3) == near(1e-3)
    assert calls == []  # both ran on the reference's own weights
    assert study.port_only_error(_model(), "float16", ours, ref, 3, 2) == near(2e-3)
    assert calls == [(Path("/f16"), list(ref.greedy_tokens[:-1]))]  # teacher-forced, same weights


def _fake_port(monkeypatch, steps: int = 4, vocab: int = 6, layers: int = 2, hidden: int = 3):
    """swiftport.reference and swiftport.run replaced: the port is off by 1e-5 with float32
    weights, by 1e-3 with float16 ones, and free-running float16 diverges at step 2."""
    rng = np.random.default_rng(0)
    ref = _ref(
        rng.standard_normal((steps, vocab)).astype(np.float32),
        rng.standard_normal((layers, 2 + steps - 1, hidden)).astype(np.float32),
    )
    monkeypatch.setattr(swiftport, "reference", lambda *a, **k: ref)

    def fake_run(folder, prompt, n, dump=None, dump_hidden=False, force=None):
        off = 1e-5 if Path(folder).name == "f32" else 1e-3
        tokens = list(ref.greedy_tokens)
        if force is None and off > 1e-4:
            tokens[2] = (tokens[2] + 1) % vocab
        return SimpleNamespace(tokens=tokens, logits=ref.logits + off, hidden=ref.hidden + off)

    monkeypatch.setattr(swiftport, "run", fake_run)
    return ref


def test_parity_tables_summarise_each_model_and_dtype(monkeypatch):
    _fake_port(monkeypatch)
    layers, steps, summary = study.parity_tables({"llama": _model()}, 4, 3)
    assert len(layers) == 2 * 2 and len(steps) == 2 * 4
    by = summary.set_index("dtype")
    assert by.loc["float32", "max_abs_logit_err"] == pytest.approx(1e-5, rel=1e-2)
    assert by.loc["float32", "greedy_agreement_pct"] == 100.0
    assert by.loc["float16", "greedy_agreement_pct"] == 50.0
    assert by.loc["float16", "first_divergence"] == 2
    assert by.loc["float16", "teacher_forced_top1_pct"] == 100.0
    assert by.loc["float16", "min_top2_margin"] == 0.5


def test_no_models_give_empty_tables_and_no_records(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)
    layers, steps, summary = study.parity_tables({}, 4, 3)
    assert layers.empty and steps.empty and summary.empty
    assert study.error_growth(layers, steps).empty
    study.record_parity(summary, steps=4, logit_n=3)
    assert not list(tmp_path.rglob("*.jsonl"))


def test_records_carry_the_notebooks_params(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)
    _fake_port(monkeypatch)
    _, _, summary = study.parity_tables({"llama": _model()}, 4, 3)
    study.record_parity(summary, steps=4, logit_n=3)
    speed = pd.DataFrame([study.rate_row("swift", 1, [0.01]), study.rate_row("torch", 1, [0.02])])
    study.record_speed(speed, "m", 4, 2, loads=(0.44, 1.26))
    (path,) = tmp_path.rglob(f"{study.STUDY}/*.jsonl")
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    err = [r for r in recs if r["metric"] == "max_abs_logit_err"]
    assert [r["params"]["steps"] for r in err] == [3, 3]
    agree = [r for r in recs if r["metric"] == "greedy_agreement_pct"]
    assert [r["params"]["mode"] for r in agree] == ["free-running"] * 2
    assert [r["params"]["steps"] for r in agree] == [4, 4]
    rates = [r for r in recs if r["metric"] == "decode_tok_s"]
    assert [r["value"] for r in rates] == [100.0, 50.0]
    assert rates[0]["params"]["load_avg_1m"] == 1.3
    assert rates[1]["params"]["impl"] == study.RUNTIME_IMPL["torch"]
    # the Swift row says which BLAS ran it and the thread environment it got; torch's does not
    assert rates[0]["params"]["blas"] == swiftport.port_blas()
    assert rates[0]["params"]["thread_env"] == {"OPENBLAS_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1"}
    assert "blas" not in rates[1]["params"]


def test_a_macs_swift_speed_rows_say_accelerate(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)
    assert (swiftport.port_blas("Darwin"), swiftport.port_blas("Linux")) == ("Accelerate", "OpenBLAS")
    # a Mac (only the port's answer: the fingerprint the record takes stays this machine's)
    monkeypatch.setattr(swiftport, "port_blas", functools.partial(swiftport.port_blas, "Darwin"))
    study.record_speed(pd.DataFrame([study.rate_row("swift", 3, [0.01])]), "m", 4, 2, loads=(0.1, 0.2))
    (path,) = tmp_path.rglob(f"{study.STUDY}/*.jsonl")
    (rec,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert rec["params"]["blas"] == "Accelerate" and rec["params"]["thread_env"]["VECLIB_MAXIMUM_THREADS"] == "3"


def test_error_growth_compares_last_with_first():
    layers = pd.DataFrame(
        [dict(model="m", dtype="float32", layer=i, max_abs=1e-6 * (i + 1), rel=1e-7) for i in range(3)]
    )
    steps = pd.DataFrame(
        [dict(model="m", dtype="float32", step=s, max_abs=1e-6 if s < 4 else 3e-6) for s in range(8)]
    )
    g = study.error_growth(layers, steps).iloc[0]
    assert g.depth_growth == pytest.approx(3.0)
    assert g.rel_depth_growth == pytest.approx(1.0)
    assert g.step_growth == pytest.approx(3.0)
    (line,) = study.growth_lines(study.error_growth(layers, steps))
    assert "grows with depth (last/first layer 3.0x, relative 1.0x) and grows" in line


# --- figures ------------------------------------------------------------------------------------


def test_figures_have_their_panels(monkeypatch):
    _fake_port(monkeypatch)
    layers, steps, _ = study.parity_tables({"llama": _model()}, 4, 3)
    fig = study.plot_per_layer(layers)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]
    assert len(fig.axes[0].lines) == 2  # float32 and float16
    fig = study.plot_per_step(steps, 1e-4, 3)
    assert fig.axes[0].get_title() == "Per-step logit error, absolute"
    assert "tolerance 0.0001" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    speed = pd.DataFrame(
        [study.rate_row(rt, n, [0.01 * n, 0.02 * n]) for n in (1, 2) for rt in ("swift", "torch")]
    )
    fig = study.plot_decode_speed(speed, [1, 2], "m")
    assert len(fig.axes[0].patches) == 4
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2"]


# --- speed --------------------------------------------------------------------------------------


def test_rate_row_and_ratios():
    row = study.rate_row("swift", 2, [0.1, 0.2, 0.4])
    assert row["tok_s"] == pytest.approx(5.0)
    assert row["tok_s_p10"] < row["tok_s"] < row["tok_s_p90"]
    speed = pd.DataFrame([study.rate_row("swift", 1, [0.01]), study.rate_row("torch", 1, [0.02])])
    ratio = study.speed_ratios(speed)
    assert ratio.loc[1, "swift / torch"] == pytest.approx(2.0)
    assert "swift / llama.cpp" not in ratio
    lines = study.speed_lines(ratio, "m", "machine", "no llama-cpp-python")
    assert "Swift is 2.00x, faster than PyTorch eager (m, machine)" in lines[0]
    assert lines[-1] == "llama.cpp not measured here: no llama-cpp-python"
    speed = pd.concat([speed, pd.DataFrame([study.rate_row("llama.cpp", 1, [0.0125])])])
    ratio = study.speed_ratios(speed)
    assert ratio.loc[1, "swift / llama.cpp"] == pytest.approx(1.25)
    assert "within the 1.3x target" in study.speed_lines(ratio, "m", "x", None)[1]


def test_shipped_shape_llama_has_the_shipped_shape(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    shipped = json.loads((swiftport.paths.repo_models_dir() / "tiny-llama" / "config.json").read_text())
    seen = {}
    monkeypatch.setattr(swiftport, "random_model", lambda out, config, dtype, seed: seen.update(c=config))
    study.shipped_shape_llama(tmp_path)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(seen["c"], key) == shipped[key], key


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_torch_model_matches_transformers(tmp_path, arch):
    """The eager side of the speed comparison computes transformers' logits."""
    torch = pytest.importorskip("torch")
    folder = (swiftport.tiny_llama if arch == "llama" else swiftport.tiny_phi)(tmp_path / arch)
    prompt = swiftport.prompt_for(folder)
    ref = swiftport.reference(folder, prompt, 1)
    model = study.torch_model(folder)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0, -1].numpy()
    np.testing.assert_allclose(ours, ref.logits[0], atol=tolerances.SAME_MATH.at("cpu"), rtol=0)
    measured = study.torch_decode_timing(model, prompt, 5)
    assert len(measured.tpot_s) == 4 and all(t > 0 for t in measured.tpot_s)


# --- models and sentences -----------------------------------------------------------------------


def test_models_to_check_stands_in_for_a_missing_model(tmp_path, capsys):
    pytest.importorskip("torch")
    models = study.models_to_check("no-such-model", "", tmp_path, seed=0)
    assert list(models) == ["llama", "phi"]
    assert models["llama"].model == "tiny-random-llama"
    assert "skipped: parity on no-such-model" in capsys.readouterr().out
    m = study.store_both_ways(models["phi"], tmp_path, seed=0)
    assert m.stored == "float32" and swiftport.weights_dtype(m.dirs["float16"]) == "float16"
    assert m.prompt
    with pytest.raises(FileNotFoundError, match="PHI_PATH"):
        study.models_to_check("no-such-model", str(tmp_path / "nothing"), tmp_path, seed=0)


def test_float16_findings_tell_shipped_float16_from_float32_models():
    summary = pd.DataFrame(
        [
            dict(model=label, dtype=dtype, max_abs_logit_err=err, port_only_err=1e-5,
                 first_divergence=3, teacher_forced_top1_pct=100.0)
            for label, dtype, err in [("a", "float32", 1e-5), ("a", "float16", 1e-3),
                                      ("b", "float32", 2e-5), ("b", "float16", 2e-5)]
        ]
    )
    models = {"a": _model("a", "float32"), "b": _model("b", "float16")}
    a, b = study.float16_findings(summary, models, 8)
    assert not a.ships_float16 and a.err > a.err_float32 and "100x the float32 port's" in a.text
    assert b.ships_float16 and b.err == b.err_float32 and "ship as float16" in b.text
    assert [ok for _, ok, _ in a.claims(1e-4)] == [True, True]
    assert [ok for _, ok, _ in a.claims(1e-6)] == [True, False]  # the port alone misses 1e-6
    ((claim, ok, value),) = b.claims(1e-4)
    assert ok and "ship as float16" in claim and value == "max |dlogit| 2.0e-05 both ways"
    f32 = summary[summary.dtype == "float32"].assign(max_abs_logit_err_all=2e-5, greedy_agreement_pct=100.0,
                                                     arch=["llama", "phi"])
    rows = study.float32_claims(f32, 3, 8, 1e-4)
    assert rows[0] == ("a: the Swift port computes PyTorch's float32 logits within 0.0001 over the "
                       "first 3 steps", True, "max |dlogit| 1.0e-05 (2.0e-05 over 8)")
    assert all(ok for _, ok, _ in rows) and rows[-1][2] == "llama, phi"
    assert not study.float32_claims(f32.assign(arch="llama"), 3, 8, 1e-4)[-1][1]


def test_speed_claims_need_every_thread_count():
    ratio = pd.DataFrame({"swift / torch": [1.5, 2.0]}, index=[1, 2])
    assert all(ok for _, ok, _ in study.speed_claims(ratio, [1, 2]))
    assert not study.speed_claims(ratio, [1, 2, 4])[0][1]
    assert not study.speed_claims(ratio.assign(**{"swift / torch": [1.5, float("nan")]}), [1, 2])[1][1]
