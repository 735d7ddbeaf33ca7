"""Study 03 (quantization error): one scoreboard across Core ML, MLX, GGUF and our own schemes.

The notebook's parts, each a function here (the formats themselves are ``labkit.quant``'s, the
metrics ``labkit.quant.evaluate``'s):

1. :func:`scoreboard`: every uniform scheme's bits per weight, size, perplexity change, mean KL
   divergence to fp32 and same-top-token share (llama.cpp's ``--kl-divergence`` metrics).
2. :func:`weight_snr` and :func:`outlier_table`: per-matrix SNR, and how weight outliers make
   per-channel int4 scales lose to per-block ones.
3. :func:`sensitivity`: one group of layers quantized at a time (:func:`blocks`, :func:`units`).
4. :func:`mixed_assignment`: sensitivity-guided mixed precision within a bit budget.
5. :func:`pareto_front`: the schemes no other beats in both bits and KL divergence.
6. :func:`encoder_scores`: the same schemes on a sentence encoder (embedding cosine, retrieval).

Mixed precision, the idea: blocks are not equally fragile. Measure, for each unit (one block's
attention or MLP Linears), the mean KLD when only that unit is quantized at each rung of a
ladder of schemes (e.g. MLX affine 3, 4, 6 bits). Assume the damage adds up across units, and
choose one rung per unit to minimize the summed KLD within a bit budget for the whole model (a
small multiple-choice knapsack, solved exactly by dynamic programming). The result is then
*measured* like any other scheme; the additivity is only the search's guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from labkit.core import results
from labkit.core.checks import one_of
from labkit.quant.evaluate import (
    QuantCache,
    Reference,
    assignment_bpw,
    layer_index,
    quantized,
    score,
    uniform,
)
from labkit.quant.schemes import SCHEMES, bits_per_weight, get_scheme, tensor_bits

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure

STUDY = "03_quantization_error"


def _no_progress(items: Iterable[Any], **_: Any) -> Iterable[Any]:
    return items


def check_schemes(names: Iterable[str]) -> None:
    """Refuse scheme names labkit.quant does not know, all of them in one message."""
    unknown = [s for s in names if s not in SCHEMES]
    if unknown:
        raise ValueError(f"unknown schemes in the parameters: {unknown}")


@dataclass
class Evaluation:
    """The model under study, its quantizable layers and its fp32 references on held-out text:
    ``windows`` / ``ref`` for the scoreboard, the shorter ``sens_windows`` / ``sens_ref`` for the
    sensitivity sweeps."""

    loaded: Any  # labkit.models.LoadedModel
    cache: QuantCache
    windows: torch.Tensor
    ref: Reference
    sens_windows: torch.Tensor
    sens_ref: Reference

    @property
    def model(self) -> Any:
        return self.loaded.model

    def summary(self) -> str:
        """Parameters, what is quantized, and the evaluation's size and fp32 perplexity."""
        card, shapes = self.loaded.card, self.cache.shapes()
        n_quant = sum(a * b for a, b in shapes.values())
        n_windows, width = self.windows.shape
        return (
            f"{card['name']}: {card['num_parameters'] / 1e6:.1f} M parameters ({card['dtype']} on "
            f"{card['device']}); {len(shapes)} Linear layers quantized ({n_quant / 1e6:.1f} M "
            f"weights), embeddings and norms stay fp16\nevaluation: {n_windows} held-out windows "
            f"x {width - 1} tokens = {self.ref.tokens} scored tokens; fp32 perplexity {self.ref.ppl:.3f}"
        )


def load_evaluation(
    model: str, device: str, windows: int, context: int, sens_windows: int, sens_context: int
) -> Evaluation:
    """``model`` on ``device``, its held-out windows (the model folder's heldout_slice) and the
    fp32 references the scores compare against."""
    from labkit.models import load
    from labkit.quant.evaluate import heldout_windows, reference

    lm = load(model, device=device)
    folder = lm.card["path"]
    w = heldout_windows(folder, windows, context).to(device)
    sw = heldout_windows(folder, sens_windows, sens_context).to(device)
    ref, sens_ref = reference(lm.model, w), reference(lm.model, sw)
    return Evaluation(lm, QuantCache(lm.model), w, ref, sw, sens_ref)


# --- 1: the scoreboard ---------------------------------------------------------------------------


def _fp16_rest_bits(model, cache: QuantCache) -> int:
    """Bits of everything not quantized (embeddings, norms), stored in fp16."""
    quantized_ids = {id(m.weight) for m in cache.layers.values()}
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in quantized_ids or id(p) in seen:
            continue
        seen.add(id(p))
        n += p.numel()
    return 16 * n


def model_megabytes(model, cache: QuantCache, assignment: Mapping[str, str]) -> float:
    """Stored size in MB (10^6 bytes): quantized Linears at their exact cost, the rest fp16."""
    shapes = cache.shapes()
    bits = sum(tensor_bits(assignment.get(n, "fp16"), s) for n, s in shapes.items())
    return (bits + _fp16_rest_bits(model, cache)) / 8 / 1e6


def evaluate_assignment(
    model,
    cache: QuantCache,
    windows,
    ref: Reference,
    assignment: Mapping[str, str],
    label: str,
    library: str,
) -> dict:
    """One scoreboard row for an arbitrary {layer: scheme} assignment."""
    with quantized(cache, assignment):
        s = score(model, windows, ref)
    return {
        "scheme": label,
        "library": library,
        "bpw": assignment_bpw(cache, assignment),
        "size_mb": model_megabytes(model, cache, assignment),
        **asdict(s),
    }


def scoreboard(
    model,
    cache: QuantCache,
    windows,
    ref: Reference,
    schemes: Iterable[str],
    progress: Callable = lambda x, **_: x,
) -> list[dict]:
    """A row per uniform scheme: bpw, size, PPL, delta PPL, mean KLD, same-top %."""
    rows = []
    for name in progress(list(schemes), desc="scoreboard"):
        s = get_scheme(name)
        row = evaluate_assignment(model, cache, windows, ref, uniform(cache, s), s.name, s.library)
        row["bits"] = s.bits
        rows.append(row)
    return rows


#: the scoreboard's metrics and their units, as recorded
SCORE_UNITS = {"bpw": "bit/weight", "delta_ppl": "1", "mean_kld": "nat", "same_top_pct": "%"}


def record_scores(row: Mapping[str, Any], rec: Mapping[str, str], **params: Any) -> None:
    """A scoreboard row's bpw, delta PPL, mean KLD and same-top %, params scheme and library
    (and ``params``); ``rec`` holds runtime, device and model."""
    p = {"scheme": row["scheme"], "library": row["library"], **params}
    for metric, unit in SCORE_UNITS.items():
        results.record(STUDY, metric, row[metric], unit, params=p, **rec)


def board_table(rows: list[dict]) -> pd.DataFrame:
    """The scoreboard's columns in llama.cpp's order, most bits first."""
    import pandas as pd

    columns = ["scheme", "library", "bits", "bpw", "size_mb", "ppl", "delta_ppl", "mean_kld",
               "same_top_pct"]
    return pd.DataFrame(rows)[columns].sort_values("bpw", ascending=False)


# --- 2: weight SNR and outliers ------------------------------------------------------------------


def weight_snr(
    cache: QuantCache, schemes: list[str], rec: Mapping[str, str], progress: Callable = _no_progress
) -> pd.DataFrame:
    """The SNR (dB) of every quantizable matrix under each scheme, recorded; layer x scheme."""
    import pandas as pd

    rows = []
    for scheme in progress(schemes, desc="weight SNR"):
        lib = get_scheme(scheme).library
        for name in cache.layers:
            snr = cache.snr_db(name, scheme)
            rows.append({"scheme": scheme, "layer": name, "snr_db": snr})
            results.record(STUDY, "weight_snr_db", snr, "dB",
                           params={"scheme": scheme, "library": lib, "layer": name}, **rec)
    snr = pd.DataFrame(rows)
    return snr.pivot(index="layer", columns="scheme", values="snr_db").loc[list(cache.layers)]


def short_layer_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> '3.q' (figure ticks)."""
    for part in ("model.layers.", "self_attn.", "mlp.", "_proj"):
        name = name.replace(part, "")
    return name


def plot_weight_snr(wide: pd.DataFrame, schemes: list[str], model: str) -> Figure:
    """The SNR of every quantized matrix, one line per scheme."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(11, 4))
    for scheme in schemes:
        ax.plot(range(len(wide)), wide[scheme], marker="o", ms=3, label=scheme)
    ax.set_xticks(range(len(wide)), [short_layer_name(n) for n in wide.index], rotation=90, fontsize=6)
    ax.set_xlabel("layer (block.matrix)")
    ax.set_ylabel("weight SNR (dB)")
    ax.set_title(f"Weight SNR of every quantized matrix of {model}")
    ax.legend(fontsize=7, ncols=3)
    return fig


def outlier_ratio(w: torch.Tensor) -> float:
    """How far the largest weight of a row stands out: max |w| / rms, averaged over rows."""
    w = w.float()
    return float((w.abs().amax(dim=1) / w.pow(2).mean(dim=1).sqrt()).mean())


def tail_kurtosis(w: torch.Tensor) -> float:
    """E[(w - mean)^4] / var^2 over the whole matrix (3 for a Gaussian; more: heavier tails)."""
    return float(((w - w.mean()) ** 4).mean() / w.var() ** 2)


#: the two int4 schemes whose SNR difference is the gain of per-block scales
BLOCK_SCALES, CHANNEL_SCALES = "coreml-int4-block32", "labkit-int4-channel"


def outlier_table(cache: QuantCache, wide: pd.DataFrame) -> pd.DataFrame:
    """Per matrix: outlier ratio, tail kurtosis, SNR per scheme and ``block_gain_db``, what
    block-32 int4 scales gain over per-channel ones (needs both schemes in ``wide``)."""
    import pandas as pd

    stats = pd.DataFrame([{"layer": n, "outlier_ratio": outlier_ratio(w), "tail_kurtosis": tail_kurtosis(w)}
                          for n, w in cache.original.items()])
    st = stats.set_index("layer").join(wide)
    st["block_gain_db"] = st[BLOCK_SCALES] - st[CHANNEL_SCALES]
    return st


def outlier_gain_correlation(st: pd.DataFrame) -> float:
    """Spearman's rho between the outlier ratio and the block-scale gain."""
    return float(st[["outlier_ratio", "block_gain_db"]].corr(method="spearman").iloc[0, 1])


def plot_outliers(cache: QuantCache, st: pd.DataFrame, seed: int) -> Figure:
    """Left: the heaviest-tailed matrix's weights against a Gaussian of the same std (log
    counts); right: the block-scale gain against the outlier ratio, every matrix."""
    import numpy as np

    from labkit.core import plotting

    worst = st.outlier_ratio.idxmax()
    rho = outlier_gain_correlation(st)
    w = cache.original[worst].float().flatten().cpu().numpy()
    fig, (ax1, ax2) = plotting.new_figure(1, 2, figsize=(11, 4))
    bins = np.linspace(w.min(), w.max(), 200)
    ax1.hist(w, bins=bins, color="C0", label="weights")
    rng = np.random.default_rng(seed)
    ax1.hist(rng.normal(0, w.std(), w.size), bins=bins, histtype="step", color="C3",
             label="Gaussian, same std")
    ax1.set_yscale("log")
    ax1.set_xlabel("weight value")
    ax1.set_ylabel("count (log)")
    ax1.set_title(f"Heaviest tails: {worst.replace('model.layers.', 'layer ')}", fontsize=9)
    ax1.legend(fontsize=7)
    ax2.scatter(st.outlier_ratio, st.block_gain_db, s=12)
    ax2.set_xlabel("outlier ratio: mean over rows of max|w| / rms")
    ax2.set_ylabel("int4 SNR gain of block-32 scales\nover per-channel scales (dB)")
    ax2.set_title(f"Outliers and per-block scales (Spearman rho = {rho:.2f})", fontsize=9)
    fig.suptitle("Weight outliers and their effect")
    return fig


# --- 3: per-layer sensitivity --------------------------------------------------------------------


def blocks(cache: QuantCache) -> dict[int, list[str]]:
    """Quantizable layer names grouped by decoder block."""
    out: dict[int, list[str]] = {}
    for name in cache.layers:
        out.setdefault(layer_index(name), []).append(name)
    return dict(sorted(out.items()))


def units(cache: QuantCache) -> dict[str, list[str]]:
    """Mixed-precision units: each block's attention Linears and its MLP Linears."""
    out: dict[str, list[str]] = {}
    for name in cache.layers:
        part = "attn" if ".self_attn." in name else "mlp"
        out.setdefault(f"{layer_index(name)}.{part}", []).append(name)
    return out


def layer_groups(cache: QuantCache, kind: str) -> dict[str, list[str]]:
    """Groups of layers quantized together by :func:`sensitivity` and :func:`mixed_assignment`:
    "attn_mlp" (:func:`units`) or "block" (:func:`blocks`, named by their number)."""
    one_of(kind, "kind", ("attn_mlp", "block"))
    if kind == "attn_mlp":
        return units(cache)
    return {str(k): v for k, v in blocks(cache).items()}


def sensitivity(
    model,
    cache: QuantCache,
    windows,
    ref: Reference,
    groups: Mapping[str, list[str]],
    schemes: Iterable[str],
    progress: Callable = lambda x, **_: x,
) -> dict[tuple[str, str], float]:
    """Mean KLD to the reference with only one group quantized: {(group, scheme): kld}."""
    out = {}
    todo = [(g, get_scheme(s).name) for g in groups for s in schemes]
    for group, scheme in progress(todo, desc="one group at a time"):
        with quantized(cache, dict.fromkeys(groups[group], scheme)):
            out[(group, scheme)] = score(model, windows, ref).mean_kld
    return out


def sensitivity_heat(kld: Mapping[tuple[str, str], float], schemes: list[str]) -> pd.DataFrame:
    """Block x scheme table of :func:`sensitivity`'s KLDs (groups named by block number)."""
    import pandas as pd

    heat = pd.DataFrame([{"block": int(g), "scheme": s, "kld": v} for (g, s), v in kld.items()])
    return heat.pivot(index="block", columns="scheme", values="kld")[schemes]


def plot_sensitivity(heat: pd.DataFrame) -> Figure:
    """Heatmap of log10 mean KLD, block x scheme, each cell labelled with its value."""
    import numpy as np

    from labkit.core import plotting

    schemes = list(heat.columns)
    fig, ax = plotting.new_figure(figsize=(7, 4.5))
    im = ax.imshow(np.log10(np.maximum(heat.values, 1e-9)), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(schemes)), schemes, rotation=20, fontsize=7)
    ax.set_yticks(range(len(heat)), heat.index)
    ax.set_xlabel("scheme applied to that one block")
    ax.set_ylabel("decoder block")
    ax.set_title("Per-layer sensitivity: log10 mean KLD with one block quantized")
    for i in range(heat.shape[0]):
        for j in range(heat.shape[1]):
            ax.text(j, i, f"{heat.values[i, j]:.1e}", ha="center", va="center", fontsize=6, color="w")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("log10 mean KLD (nat)")
    return fig


# --- 4: mixed precision --------------------------------------------------------------------------


def best_uniform(board: pd.DataFrame, bits: int) -> pd.Series:
    """The scoreboard row of the ``bits``-bit scheme with the lowest mean KLD."""
    return board[board.bits == bits].sort_values("mean_kld").iloc[0]


def mixed_assignment(
    cache: QuantCache,
    groups: Mapping[str, list[str]],
    ladder: list[str],
    kld: Mapping[tuple[str, str], float],
    budget_bpw: float,
) -> dict[str, str]:
    """The {layer: scheme} assignment with the least summed unit KLD within ``budget_bpw``.

    A multiple-choice knapsack solved exactly by dynamic programming over the exact bit costs
    (divided by their greatest common divisor, so the table stays small). Raises ValueError when
    even the cheapest rung everywhere does not fit the budget.
    """
    import numpy as np

    ladder = [get_scheme(s).name for s in ladder]
    shapes = cache.shapes()
    total = sum(a * b for a, b in shapes.values())
    names = list(groups)
    bits = {
        (g, s): sum(tensor_bits(s, shapes[n]) for n in groups[g]) for g in names for s in ladder
    }
    cheapest = sum(min(bits[(g, s)] for s in ladder) for g in names)
    budget_bits = math.floor(budget_bpw * total + 1e-6)
    if cheapest > budget_bits:
        raise ValueError(
            f"budget_bpw={budget_bpw:.3f} is below the cheapest rung {ladder[0]} "
            f"({cheapest / total:.3f} bpw)"
        )
    unit = math.gcd(*bits.values())
    cost = {k: v // unit for k, v in bits.items()}
    size = budget_bits // unit + 1
    if size > 20_000_000:
        raise ValueError(f"the knapsack table would hold {size} states; use fewer, larger units")
    best = np.full(size, np.inf)
    best[0] = 0.0
    picks = []
    for g in names:
        nxt = np.full(size, np.inf)
        pick = np.full(size, -1, dtype=np.int64)
        for r, s in enumerate(ladder):
            c = cost[(g, s)]
            if c >= size:
                continue
            cand = np.full(size, np.inf)
            cand[c:] = best[: size - c] + kld[(g, s)]
            better = cand < nxt
            nxt[better] = cand[better]
            pick[better] = r
        best = nxt
        picks.append(pick)
    c = int(np.argmin(best))
    rungs = {}
    for g, pick in zip(reversed(names), reversed(picks), strict=True):
        s = ladder[int(pick[c])]
        rungs[g] = s
        c -= cost[(g, s)]
    assert c == 0
    assignment = {n: rungs[g] for g in names for n in groups[g]}
    assert assignment_bpw(cache, assignment) <= budget_bpw + 1e-9
    return assignment


def chosen_rungs(assignment: Mapping[str, str], groups: Mapping[str, list[str]]) -> pd.Series:
    """The scheme the assignment gives each unit (all layers of a unit share it)."""
    import pandas as pd

    return pd.Series({u: assignment[names[0]] for u, names in groups.items()})


def plot_mixed(chosen: pd.Series, budget: float, budget_scheme: str, unit_kind: str) -> Figure:
    """Bits per weight given to each unit, against the budget."""
    from labkit.core import plotting

    rung = chosen.map({s: bits_per_weight(s) for s in set(chosen)})
    fig, ax = plotting.new_figure(figsize=(9, 3.5))
    colors = ["C0" if u.endswith("attn") else "C1" for u in rung.index]
    ax.bar(range(len(rung)), rung.values, color=colors)
    ax.axhline(budget, color="k", ls="--", lw=1, label=f"budget {budget:.2f} bpw ({budget_scheme})")
    ax.set_xticks(range(len(rung)), rung.index, rotation=90, fontsize=7)
    ax.set_xlabel("unit (block.attn in blue, block.mlp in orange)" if unit_kind == "attn_mlp"
                  else "decoder block")
    ax.set_ylabel("bits per weight")
    ax.set_title("Sensitivity-guided mixed precision: bits given to each unit")
    ax.legend(fontsize=7)
    return fig


def predicted_kld(
    kld: Mapping[tuple[str, str], float], assignment: Mapping[str, str], groups: Mapping[str, list[str]]
) -> float:
    """The summed unit KLD the search expected of ``assignment`` (its additivity guess)."""
    return sum(kld[(g, assignment[names[0]])] for g, names in groups.items())


# --- 5: error against bits -----------------------------------------------------------------------


def pareto_points(board: pd.DataFrame, mixed_row: Mapping[str, Any]) -> pd.DataFrame:
    """Every quantized scheme of the scoreboard and the mixed assignment (fp16 left out)."""
    import pandas as pd

    pts = pd.concat([board, pd.DataFrame([mixed_row])], ignore_index=True)
    return pts[pts.scheme != "fp16"]


def pareto_front(pts: pd.DataFrame) -> pd.DataFrame:
    """The points no cheaper point beats in mean KLD, cheapest first."""
    order = pts.sort_values(["bpw", "mean_kld"])
    return order[order.mean_kld <= order.mean_kld.cummin()]


#: marker of each library in the Pareto figure
LIBRARY_MARKERS = {"coremltools": "s", "mlx": "o", "gguf": "^", "labkit": "D"}


def plot_pareto(pts: pd.DataFrame, front: pd.DataFrame, model: str) -> Figure:
    """Mean KLD against bits per weight, every library together, with the Pareto front."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(8, 5))
    for lib, df in pts.groupby("library"):
        ax.scatter(df.bpw, df.mean_kld, marker=LIBRARY_MARKERS.get(lib, "x"), s=40, label=lib)
        for _, r in df.iterrows():
            ax.annotate(r.scheme.split("-", 1)[-1], (r.bpw, r.mean_kld), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.step(front.bpw, front.mean_kld, where="post", color="grey", lw=1, label="Pareto front")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (exact, overheads included)")
    ax.set_ylabel("mean KL divergence to fp32 (nat, log)")
    ax.set_title(f"Quantization error against size, {model}")
    ax.legend(fontsize=8)
    return fig


# --- 6: an encoder -------------------------------------------------------------------------------


def retrieval_pairs(n: int) -> tuple[list[str], list[str]]:
    """(the first ``n`` queries of data/rag, the text of each one's document)."""
    import json

    from labkit.core import paths

    rag = paths.data_dir() / "rag"
    with (rag / "queries.jsonl").open() as f:
        queries = [json.loads(line) for line in f][:n]
    with (rag / "docs.jsonl").open() as f:
        docs = {d["id"]: d for d in (json.loads(line) for line in f)}
    return [q["text"] for q in queries], [docs[q["doc_id"]]["text"] for q in queries]


def _retrieval(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """The index of each query's most similar document (embeddings are unit length)."""
    return (queries @ docs.T).argmax(1)


def _pct(hits: torch.Tensor) -> float:
    return float(hits.float().mean() * 100)


def encoder_scores(
    enc: Any, queries: list[str], docs: list[str], schemes: list[str], model: str,
    progress: Callable = _no_progress,
) -> tuple[pd.DataFrame, float]:
    """(per scheme: bpw, mean cosine of quantized to fp32 embeddings, top-1 agreement and
    recall@1, recorded; the fp32 recall@1), on ``enc``'s encoder layers' Linears."""
    import pandas as pd
    import torch

    from labkit.models.encoder import embed

    cache = QuantCache(enc.model, include="encoder.layer.")
    q0, d0 = embed(queries, enc), embed(docs, enc)
    top0, truth = _retrieval(q0, d0), torch.arange(len(queries))
    rows = []
    for scheme in progress(schemes, desc="MiniLM"):
        with quantized(cache, uniform(cache, scheme)):
            q1, d1 = embed(queries, enc), embed(docs, enc)
        cos = float(torch.cat([(q0 * q1).sum(1), (d0 * d1).sum(1)]).mean())
        top1 = _retrieval(q1, d1)
        agree, lib = _pct(top1 == top0), get_scheme(scheme).library
        rows.append({"scheme": scheme, "library": lib, "bpw": assignment_bpw(cache, uniform(cache, scheme)),
                     "embed_cosine": cos, "top1_agreement_pct": agree,
                     "recall_at_1_pct": _pct(top1 == truth)})
        p = {"scheme": scheme, "library": lib, "texts": 2 * len(queries)}
        for metric, value, unit in (("embed_cosine", cos, "1"), ("top1_agreement_pct", agree, "%")):
            results.record(STUDY, metric, value, unit, runtime="torch", device="cpu", model=model, params=p)
    return pd.DataFrame(rows).sort_values("bpw", ascending=False), _pct(top0 == truth)
