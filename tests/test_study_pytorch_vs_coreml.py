"""labkit.studies.pytorch_vs_coreml: notebook 02's ladder, read-back checks, tables and roofline.

What is checked:
- the PyTorch ladder's steps (a-d) give the model's logits token by token, and the int4 Linear
  equals the Core ML int4 weight it stands for;
- a package's read-back weights are judged exact only when they equal coremltools' compressors
  (a model with other weights is caught), and the read-back logits errors are within the bounds
  the notebook states;
- the tables count what they say (ops, gains, roofline = bandwidth / footprint bytes), every
  published row has its chip's roofline, and the figures pass the house rules.
The model is the 2-layer slice of tiny-llama's shapes from conftest (see test_export_coreml).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from labkit.core import chips, plotting
from labkit.core import tolerances as tol
from labkit.export.coreml import Export
from labkit.studies import pytorch_vs_coreml as study

MAX_LEN = 16
LAYERS = 2


@pytest.fixture(scope="module")
def model():
    from conftest import tiny_llama_slice

    return tiny_llama_slice(LAYERS)


def _export(step: str, compression: str = "none", **ops: int) -> Export:
    return Export(step=step, compression=compression, path=None, package_bytes=1_000_000 * (ord(step) - 96),
                  export_seconds=1.0, convert_seconds=2.0, op_counts=dict(ops))


# --------------------------------------------------------------------------- the model


def test_first_layers_slices_a_copy(model) -> None:
    one = study.first_layers(model, 1)
    assert len(one.model.layers) == 1 and one.config.num_hidden_layers == 1
    assert len(model.model.layers) == LAYERS  # the original is untouched
    assert study.first_layers(model, None) is model
    for bad in (0, LAYERS + 1, True, 1.0):
        with pytest.raises(ValueError, match="layers must be an int"):
            study.first_layers(model, bad)


# --------------------------------------------------------------------------- the PyTorch ladder


def test_ladder_steps_match_the_model_token_by_token(model) -> None:
    """Steps a, b, c run the exported wrappers in PyTorch; d their int4 copy."""
    ids = [5, 17, 300, 2, 99, 41]
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
        int4_ref = study.int4_model(model)(torch.tensor([ids]))[0]
    steps = study.ladder_steps(model, MAX_LEN)
    assert list(steps) == ["a", "b", "c", "d"]
    with torch.no_grad():
        for name, step in steps.items():
            if name == "d":  # torch's int4 kernel sums in its own order: relative to the logits
                expect, bounds = int4_ref, dict(atol=1e-3 * float(int4_ref.abs().max()), rtol=1e-4)
            else:  # the float32 wrappers: the same math as the model
                expect, bounds = ref, dict(atol=tol.SAME_MATH.at("cpu"), rtol=0)
            for pos, tok in enumerate(ids):
                got = step(tok, pos).reshape(-1)
                torch.testing.assert_close(got, expect[pos], **bounds, msg=name)


def test_int4_linear_equals_coreml_dequantized_weight(model) -> None:
    from labkit.quant.ops import fake_quantize

    lin = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(1))
    w_hat = torch.from_numpy(fake_quantize(lin.weight.detach().numpy(), "coreml-int4-block32"))
    with torch.no_grad():
        got = study.Int4Linear.from_linear(lin)(x)
    want = x @ w_hat.T
    # torch's int4 kernel accumulates in its own order: equal up to fp32 rounding of the sums
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())


def test_pytorch_ladder_refuses_an_empty_run(model) -> None:
    with pytest.raises(ValueError, match="non-empty prompt"):
        study.pytorch_ladder(model, [], 4)
    with pytest.raises(ValueError, match="n_new >= 1"):
        study.pytorch_ladder(model, [1, 2], 0)


def test_ladder_table_sets_medians_beside_apple() -> None:
    apple = study.published()["apple_coreml_ladder"]
    lad = study.ladder_table({"a": [1.0, 3.0, 2.0], "b": [4.0], "c": [10.0, 12.0]}, apple)
    assert list(lad.index) == ["a", "b", "c"]
    assert lad.tok_s.tolist() == [2.0, 4.0, 11.0] and lad.runs.tolist() == [3, 1, 2]
    assert lad[study.APPLE].tolist() == [0.19, 1.25, 16.26]
    assert lad["gain vs previous (here)"].tolist()[1:] == [2.0, 11.0 / 4.0]
    assert np.isnan(lad["gain vs previous (here)"].iloc[0])
    plotting.check_figure(study.plot_ladder(lad, "slice"))


# --------------------------------------------------------------------------- converted packages


def test_conversion_table_counts_ops() -> None:
    ops = dict(linear=15, const=40, constexpr_lut_to_dense=15, read_state=4, coreml_update_state=4,
               scaled_dot_product_attention=2)
    conv = study.conversion_table({"c": _export("c", **{k: v for k, v in ops.items() if "lut" not in k}),
                                   "e": _export("e", "lut4", **ops)})
    assert conv.loc["e", "ops (non-const)"] == 15 + 4 + 4 + 2
    assert conv.loc["e", "constexpr"] == 15 and conv.loc["c", "constexpr"] == 0
    assert conv.loc["c", "state r/w"] == 8 and conv.loc["c", "sdpa"] == 2
    assert conv.loc["e", "package_MB"] == 5.0 and conv.loc["e", "compression"] == "lut4"
    plotting.check_figure(study.plot_package_sizes(conv, 2_000_000, "slice"))


def test_record_conversions_writes_bytes_and_seconds(tmp_path, monkeypatch) -> None:
    from labkit.core.results import load_results

    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    study.record_conversions({"a": _export("a")}, "slice", MAX_LEN, LAYERS)
    df = load_results(study.STUDY).set_index("metric")
    assert df.loc["package_bytes", "value"] == 1_000_000 and df.loc["convert_seconds", "value"] == 2.0
    assert df.loc["package_bytes", "params"] == {"step": "a", "compression": "none",
                                                 "max_len": MAX_LEN, "layers": LAYERS}


def test_ane_comparison_needs_both_steps() -> None:
    exports = {"c": _export("c", linear=15), "f": _export("f", conv=14, linear=1)}
    conv = study.conversion_table(exports)
    cmp = study.ane_comparison(conv, exports)
    assert cmp["conv ops"].tolist() == [0, 14] and cmp["linear ops"].tolist() == [15, 1]
    assert study.ane_comparison(conv.loc[["c"]], exports) is None


def test_compressor_weight_refuses_unknown_compressions() -> None:
    w = np.ones((4, 32), np.float16)
    assert study.compressor_weight(w, "none") is w
    row = w[0]
    assert study.compressor_weight(row, "lut4") is row  # vectors stay fp16
    with pytest.raises(ValueError, match="compression must be"):
        study.compressor_weight(w, "int3")


@pytest.fixture(scope="module")
def compressed(model, tmp_path_factory) -> dict[str, Export]:
    """Steps c, d, e: one conversion of (c)'s graph, compressed two ways."""
    pytest.importorskip("coremltools", reason="needs coremltools (extra 'coreml')")
    from labkit.export import coreml as cx

    out = tmp_path_factory.mktemp("coreml")
    return {e.step: e for e in cx.convert(model, ["c", "d", "e"], out, MAX_LEN)}


def test_package_weights_are_exact_only_for_the_packaged_model(model, compressed) -> None:
    for e in compressed.values():
        weights, exact = study.package_weights(model, e)
        assert exact, e.step
        assert weights["model.layers.0.mlp.down_proj.weight"].shape == (512, 1408)
    other = study.first_layers(model, LAYERS)  # a copy, then perturbed
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    assert not study.package_weights(other, compressed["c"])[1]


def test_read_back_errors_and_records(model, compressed, tmp_path, monkeypatch) -> None:
    from labkit.core.results import load_results

    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    ids = torch.tensor([[5, 17, 300, 2, 99, 41, 7, 8]])
    rb = study.read_back(model, compressed, ids, "slice")
    errs = rb.errors
    assert list(errs.index) == [("c", "none"), ("d", "int4-block32"), ("e", "lut4")]
    assert errs.loc[("c", "none"), "float32"] == 0.0
    # on this slice (logit std ~ 1): fp16 compute of fp16 weights, fp32 compute of 4-bit weights
    assert errs.loc[("c", "none"), "float16"] < tol.FP16_COMPUTE.at("cpu")
    four_bit = [("d", "int4-block32"), ("e", "lut4")]
    assert all(0.0 < errs.loc[k, "float32"] < tol.INT4_WEIGHTS.at("cpu") for k in four_bit)
    assert errs["read-back == compressor"].all() and rb.exact == {"c": True, "d": True, "e": True}
    assert ((errs["top-1 agreement (fp16 compute)"] > 0) & (errs["top-1 agreement (fp16 compute)"] <= 1)).all()
    assert rb.logit_std > 0
    rec = load_results(study.STUDY)
    assert len(rec) == 6 and set(rec.metric) == {"readback_max_abs_logit_err"}
    assert {p["tokens"] for p in rec.params} == {8}


# --------------------------------------------------------------------------- roofline, references


def test_roofline_is_bandwidth_over_footprint_bytes() -> None:
    from labkit.core.paths import configs_dir
    from labkit.quant.footprint import weights_bytes

    table = study.roofline_table(["M1 Max"], {"Llama 2 7B": "meta-llama__Llama-2-7b-hf"})
    cfg = json.loads((configs_dir() / "meta-llama__Llama-2-7b-hf.json").read_text())
    row = table.set_index("dtype").loc["fp16"]
    assert row.weight_bytes == weights_bytes(cfg, "fp16")
    assert row.roofline_tok_s == pytest.approx(400e9 / weights_bytes(cfg, "fp16"))
    assert row.bandwidth_gbs == chips.CHIPS["M1 Max"].bandwidth_gbs
    assert table.set_index("dtype").roofline_tok_s.is_monotonic_increasing  # fp16 < int8 < int4
    with pytest.raises(KeyError, match="unknown chip"):
        study.roofline_table(["M9"])
    for bad in ((0, 400.0), (1e9, 0)):
        with pytest.raises(ValueError, match="must be > 0"):
            study.roofline_tok_s(*bad)


def test_every_published_row_meets_its_roofline() -> None:
    roof = study.roofline_table()
    assert len(roof) == len(chips.CHIPS) * len(study.ROOFLINE_MODELS) * len(study.ROOFLINE_DTYPES)
    ref = study.published_vs_roofline(roof)
    assert len(ref) == len(study.published()["llamacpp_4167"]["rows"])  # no row lost in the merge
    assert (ref["fraction of roofline"] == ref.tok_s / ref.roofline_tok_s).all()
    pivot = study.roofline_pivot(roof)
    assert pivot.shape == (len(chips.CHIPS), len(study.ROOFLINE_MODELS) * len(study.ROOFLINE_DTYPES))
    plotting.check_figure(study.plot_roofline(roof, ref))


def test_published_references_carry_sources() -> None:
    pub = study.published()
    apple = pub["apple_coreml_ladder"]
    assert apple["source"].startswith("https://machinelearning.apple.com/")
    assert [apple["steps"][s]["tok_s"] for s in "abcd"] == [0.19, 1.25, 16.26, 33.67]
    assert pub["llamacpp_4167"]["source"].endswith("/discussions/4167")


def test_expected_failures_silence_a_probe_and_restore_the_log_level():
    import logging
    import warnings

    log = logging.getLogger("coremltools")
    before = log.level
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with study._expected_failures():
            assert log.level == logging.CRITICAL
            warnings.warn("tracer noise", UserWarning, stacklevel=1)
        warnings.warn("a real warning after the probe", UserWarning, stacklevel=1)
    assert log.level == before
    assert [str(w.message) for w in seen] == ["a real warning after the probe"]


def test_coreml_speeds_on_macos_14_measures_the_stateless_steps_and_names_the_rest(monkeypatch, tmp_path):
    """macOS 14 loads spec 8 packages (steps a, b) but not the stateful ones: part 5 times a and b
    and skips c-f with the reason, instead of failing on the first stateful package."""
    from labkit.core import env, results
    from labkit.export import coreml as cx

    monkeypatch.setenv("LABKIT_OUTPUT_ROOT", str(tmp_path))
    monkeypatch.setattr(env.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(env, "macos_version", lambda: (14, 6))
    monkeypatch.setattr(env, "_installed", lambda name: True)
    timed = []

    def fake_generate(path, step, prompt, n_new, max_len, unit):
        timed.append(step)
        return cx.CoreMLRun(ttft_s=0.01, decode_tok_s=100.0, tokens=[0] * n_new, first_logits=np.zeros(4))

    monkeypatch.setattr(cx, "coreml_generate", fake_generate)
    monkeypatch.setattr(results, "record", lambda *a, **k: {})
    exports = {s: _export(s) for s in ("a", "b", "c", "d")}
    df = study.coreml_speeds(exports, [1, 2], 4, MAX_LEN, ["CPU_ONLY"], 2, "m")
    assert sorted(set(timed)) == ["a", "b"] and sorted(df["step"]) == ["a", "b"]
    assert sorted(df.attrs["skipped"]) == ["c", "d"]
    assert all("needs macOS 15" in why for why in df.attrs["skipped"].values())
