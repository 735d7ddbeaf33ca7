"""Study 03 (quantization error): one scoreboard across Core ML, MLX, GGUF and our own schemes.

The notebook's parts, each a function here (the formats themselves are ``labkit.quant``'s, the
metrics ``labkit.quant.evaluate``'s, llama.cpp's Q4_K_M mix ``labkit.quant.recipes``'):

1. :func:`scoreboard` and :func:`recipe_rows`: every uniform scheme's and recipe's bits per
   weight, size, perplexity change, mean KL divergence to fp32 and same-top-token share
   (llama.cpp's ``--kl-divergence`` metrics), each with a bootstrap 95 % interval over the
   evaluation windows; a row whose scheme reconstructs every weight exactly is marked (lossless
   by construction: the weights already lie on its grid, and no claim rests on it).
2. :func:`weight_snr`, :func:`outlier_table`: per-matrix SNR, and how weight outliers make
   per-channel int4 scales lose to per-block ones; :func:`activation_outliers`: whether the model
   has outlier features in LLM.int8()'s sense.
3. :func:`sensitivity`: one group of layers quantized at a time (:func:`blocks`, :func:`units`).
4. :func:`mixed_assignment`: sensitivity-guided mixed precision within a bit budget, and
   :func:`separation`: whether its interval separates it from every scheme of no more bits.
5. :func:`pareto_front`: the schemes no other beats in both bits and KL divergence.
6. :func:`encoder_scores`: the same schemes on a sentence encoder (embedding cosine, retrieval).

Calibration and evaluation are disjoint: the held-out slice's first windows calibrate
(the sensitivity sweeps, the choice of the budget's scheme), the windows after them evaluate
(every scored row). Whatever chooses a scheme, a budget or a recipe never scores it.

Mixed precision, the idea: blocks are not equally fragile. Measure, for each unit (one block's
attention or MLP Linears), the mean KLD when only that unit is quantized at each rung of a
ladder of schemes (e.g. GGUF's Q4_0 ... Q8_0). Assume the damage adds up across units, and
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
    bootstrap_intervals,
    layer_index,
    quantized,
    score,
    uniform,
    window_sums,
)
from labkit.quant.recipes import RECIPES, recipe
from labkit.quant.schemes import SCHEMES, bits_per_weight, get_scheme, tensor_bits

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from matplotlib.figure import Figure

STUDY = "03_quantization_error"


def _no_progress(items: Iterable[Any], **_: Any) -> Iterable[Any]:
    return items


def check_schemes(names: Iterable[str], recipes: Iterable[str] = ()) -> None:
    """Refuse scheme (and recipe) names labkit.quant does not know, all of them in one message."""
    unknown = [s for s in names if s not in SCHEMES] + [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"unknown schemes in the parameters: {unknown}")


@dataclass
class Evaluation:
    """The model under study, its quantizable layers and its fp32 references on held-out text:
    ``windows`` / ``ref`` (rows ``eval_rows`` of the held-out slice) score every row;
    ``sens_windows`` / ``sens_ref`` (rows ``calib_rows``, shorter) calibrate: the sensitivity
    sweeps and every choice made from data. The two row ranges share no window."""

    loaded: Any  # labkit.models.LoadedModel
    cache: QuantCache
    windows: torch.Tensor
    ref: Reference
    sens_windows: torch.Tensor
    sens_ref: Reference
    eval_rows: range
    calib_rows: range

    def __post_init__(self) -> None:
        if set(self.eval_rows) & set(self.calib_rows):
            raise ValueError(f"calibration windows {self.calib_rows} overlap the evaluation "
                             f"windows {self.eval_rows}")

    @property
    def model(self) -> Any:
        return self.loaded.model

    def window_params(self) -> dict[str, list[int]]:
        """The held-out rows behind a record, as half-open [start, stop) ranges."""
        return {"eval_windows": [self.eval_rows.start, self.eval_rows.stop],
                "calibration_windows": [self.calib_rows.start, self.calib_rows.stop]}

    def summary(self) -> str:
        """Parameters, what is quantized, and the evaluation's size and fp32 perplexity."""
        card, shapes = self.loaded.card, self.cache.shapes()
        n_quant = sum(a * b for a, b in shapes.values())
        n_windows, width = self.windows.shape
        e, c = self.eval_rows, self.calib_rows
        return (
            f"{card['name']}: {card['num_parameters'] / 1e6:.1f} M parameters ({card['dtype']} on "
            f"{card['device']}); {len(shapes)} Linear layers quantized ({n_quant / 1e6:.1f} M "
            f"weights), embeddings and norms stay as shipped\nevaluation: held-out windows "
            f"{e.start}-{e.stop - 1} ({n_windows} x {width - 1} tokens = {self.ref.tokens} scored "
            f"tokens); fp32 perplexity {self.ref.ppl:.3f}\ncalibration: windows {c.start}-"
            f"{c.stop - 1} ({self.sens_ref.tokens} tokens), disjoint from the evaluation"
        )


def load_evaluation(
    model: str, device: str, windows: int, context: int, sens_windows: int, sens_context: int,
    quant_blocks: int | None = None,
) -> Evaluation:
    """``model`` on ``device``, its held-out windows (the model folder's heldout_slice: the first
    ``sens_windows`` calibrate, the ``windows`` after them evaluate) and the fp32 references;
    ``quant_blocks``: quantize only the first that many decoder blocks (None: all of them)."""
    from labkit.models import load
    from labkit.quant.evaluate import heldout_windows, reference

    lm = load(model, device=device)
    folder = lm.card["path"]
    calib, ev = range(0, sens_windows), range(sens_windows, sens_windows + windows)
    w = heldout_windows(folder, windows, context, start=ev.start).to(device)
    sw = heldout_windows(folder, sens_windows, sens_context, start=calib.start).to(device)
    ref, sens_ref = reference(lm.model, w), reference(lm.model, sw)
    cache = QuantCache(lm.model, first_blocks=quant_blocks)
    return Evaluation(lm, cache, w, ref, sw, sens_ref, ev, calib)


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


#: the metrics that get a bootstrap interval, and the row keys of its bounds
INTERVAL_METRICS = ("delta_ppl", "mean_kld", "same_top_pct")


def evaluate_assignment(
    model,
    cache: QuantCache,
    windows,
    ref: Reference,
    assignment: Mapping[str, str],
    label: str,
    library: str,
    seed: int = 0,
) -> dict:
    """One scoreboard row for an arbitrary {layer: scheme} assignment: its scores over
    ``windows``, their bootstrap 95 % intervals (``<metric>_lo`` / ``_hi``), and ``exact``, True
    when the assignment reconstructs every quantized weight exactly (lossless by construction)."""
    with quantized(cache, assignment):
        sums = window_sums(model, windows, ref)
    s, ci = sums.scores(), bootstrap_intervals(sums, seed)
    row = {
        "scheme": label,
        "library": library,
        "bpw": assignment_bpw(cache, assignment),
        "size_mb": model_megabytes(model, cache, assignment),
        **asdict(s),
        "exact": set(assignment) == set(cache.layers)
        and all(cache.exact(n, sch) for n, sch in assignment.items()),
    }
    for metric in INTERVAL_METRICS:
        row[f"{metric}_lo"], row[f"{metric}_hi"] = ci[metric]
    return row


def scoreboard(
    model,
    cache: QuantCache,
    windows,
    ref: Reference,
    schemes: Iterable[str],
    progress: Callable = _no_progress,
    seed: int = 0,
) -> list[dict]:
    """A row per uniform scheme: bpw, size, PPL, delta PPL, mean KLD, same-top %, intervals."""
    rows = []
    for name in progress(list(schemes), desc="scoreboard"):
        s = get_scheme(name)
        row = evaluate_assignment(model, cache, windows, ref, uniform(cache, s), s.name, s.library,
                                  seed)
        rows.append({**row, "bits": s.bits, "uniform": True})
    return rows


def recipe_rows(
    model, cache: QuantCache, windows, ref: Reference, names: Iterable[str], seed: int = 0
) -> list[dict]:
    """A scoreboard row per llama.cpp recipe (``labkit.quant.recipes``, e.g. Q4_K_M): a mix of
    GGUF types per tensor, a baseline for the sensitivity-guided mix. ``bits`` is the recipe's
    default type's (Q4_K_M: 4); ``uniform`` is False."""
    rows = []
    for name in names:
        row = evaluate_assignment(model, cache, windows, ref, recipe(name, cache.layers), name,
                                  "gguf", seed)
        rows.append({**row, "bits": 4, "uniform": False})
    return rows


#: the scoreboard's metrics and their units, as recorded
SCORE_UNITS = {"bpw": "bit/weight", "delta_ppl": "1", "mean_kld": "nat", "same_top_pct": "%"}


def record_scores(row: Mapping[str, Any], rec: Mapping[str, str], **params: Any) -> None:
    """A scoreboard row's bpw, delta PPL, mean KLD and same-top %, and the 95 % interval bounds
    of the last three (``<metric>_ci95_low`` / ``_high``), params scheme and library (and
    ``params``; ``lossless_by_construction`` on an exact row); ``rec`` holds runtime, device and
    model."""
    p = {"scheme": row["scheme"], "library": row["library"], **params}
    if row.get("exact"):
        p["lossless_by_construction"] = True
    for metric, unit in SCORE_UNITS.items():
        results.record(STUDY, metric, row[metric], unit, params=p, **rec)
    for metric in INTERVAL_METRICS:
        unit = SCORE_UNITS[metric]
        results.record(STUDY, f"{metric}_ci95_low", row[f"{metric}_lo"], unit, params=p, **rec)
        results.record(STUDY, f"{metric}_ci95_high", row[f"{metric}_hi"], unit, params=p, **rec)


def board_table(rows: list[dict]) -> pd.DataFrame:
    """The scoreboard's columns in llama.cpp's order (intervals and flags after), most bits first."""
    import pandas as pd

    columns = ["scheme", "library", "bits", "bpw", "size_mb", "ppl", "delta_ppl", "mean_kld",
               "same_top_pct"]
    extra = [f"{m}_{b}" for m in INTERVAL_METRICS for b in ("lo", "hi")] + ["exact", "uniform"]
    return pd.DataFrame(rows)[columns + extra].sort_values("bpw", ascending=False)


#: the marker of a row that reconstructs every weight exactly, and its footnote
EXACT_MARK = "\N{DAGGER}"
EXACT_NOTE = (f"{EXACT_MARK} reconstructs every quantized weight exactly: these weights already lie "
              "on its grid, so the row is lossless by construction and no claim rests on it")


def board_frame(board: pd.DataFrame) -> pd.DataFrame:
    """The scoreboard as shown: each metric with its 95 % interval in one column, exact rows
    marked (a DataFrame, so a notebook and the site render it as a table)."""
    import pandas as pd

    def ci(r: pd.Series, m: str, fmt: str) -> str:
        return f"{r[m]:{fmt}} [{r[m + '_lo']:{fmt}}, {r[m + '_hi']:{fmt}}]"

    return pd.DataFrame([{
        "scheme": r.scheme + (EXACT_MARK if r.exact else ""), "library": r.library,
        "bits": r.bits, "bpw": round(float(r.bpw), 3), "MB": round(float(r.size_mb), 1),
        "PPL": round(float(r.ppl), 3), "delta PPL [95 % CI]": ci(r, "delta_ppl", "+.4f"),
        "mean KLD [95 % CI]": ci(r, "mean_kld", ".3e"),
        "same top % [95 % CI]": ci(r, "same_top_pct", ".1f"),
    } for _, r in board.iterrows()]).set_index("scheme")


def board_text(board: pd.DataFrame) -> str:
    """The scoreboard as text (:func:`board_frame`), exact rows footnoted: for logs and the CLI."""
    text = board_frame(board).to_string()
    return text + ("\n" + EXACT_NOTE + "." if board.exact.any() else "")


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


#: the most matrices the SNR figure labels one by one (6 pt labels on an 11 inch axis)
MAX_MATRIX_TICKS = 96


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
    if len(wide) <= MAX_MATRIX_TICKS:
        ax.set_xticks(range(len(wide)), [short_layer_name(n) for n in wide.index], rotation=90,
                      fontsize=6)
        ax.set_xlabel("layer (block.matrix)")
    else:  # one tick per block: a tick per matrix would overlap
        first = {}
        for i, name in enumerate(wide.index):
            first.setdefault(layer_index(name), i)
        ax.set_xticks(list(first.values()), [str(b) for b in first], fontsize=7)
        ax.set_xlabel("decoder block (its matrices in order: q, k, v, o, gate, up, down)")
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


#: LLM.int8()'s outlier features (Dettmers et al., 2022, section 4.1): a hidden dimension whose
#: magnitude reaches 6 in at least 25 % of the layers and in at least 6 % of the positions.
OUTLIER_MAGNITUDE, OUTLIER_LAYER_SHARE, OUTLIER_POSITION_SHARE = 6.0, 0.25, 0.06
#: where hidden states enter the Linear layers: the attention and MLP inputs (after each RMSNorm)
ACTIVATION_SITES = {"attention input": "self_attn.q_proj", "MLP input": "mlp.gate_proj"}


@dataclass
class ActivationStats:
    """Per block, site (:data:`ACTIVATION_SITES`) and hidden channel: the largest |x| and the
    share of positions with |x| >= :data:`OUTLIER_MAGNITUDE`, over ``positions`` tokens."""

    sites: list[str]
    max_abs: Any  # numpy [block, site, channel]
    share: Any  # numpy [block, site, channel]
    positions: int

    def outlier_channels(self) -> list[int]:
        """The channels that are outlier features by LLM.int8()'s criterion: at or above the
        magnitude at a position share of at least 6 % at some site, in 25 % of the blocks or more."""
        import numpy as np

        hit = (self.share >= OUTLIER_POSITION_SHARE).any(axis=1)  # [block, channel]
        return np.flatnonzero(hit.mean(axis=0) >= OUTLIER_LAYER_SHARE).tolist()


def activation_outliers(model, windows) -> ActivationStats:
    """Run ``model`` over ``windows`` and measure the inputs of every block's attention and MLP
    (forward hooks on q_proj and gate_proj: what those Linears multiply)."""
    import numpy as np
    import torch

    from labkit.quant.evaluate import linear_layers

    layers = linear_layers(model)
    names = {(layer_index(n), site): n for n in layers
             for site, suffix in ACTIVATION_SITES.items() if n.endswith(suffix)}
    n_blocks, sites = 1 + max(b for b, _ in names), list(ACTIVATION_SITES)
    width = layers[next(iter(names.values()))].in_features
    max_abs = np.zeros((n_blocks, len(sites), width))
    hits = np.zeros_like(max_abs)

    def hook(key):
        def record(_module, inputs, _output):
            x = inputs[0].detach().abs().reshape(-1, width).float()
            b, j = key[0], sites.index(key[1])
            max_abs[b, j] = np.maximum(max_abs[b, j], x.amax(0).cpu().numpy())
            hits[b, j] += (x >= OUTLIER_MAGNITUDE).sum(0).cpu().numpy()
        return record

    handles = [layers[n].register_forward_hook(hook(k)) for k, n in names.items()]
    try:
        with torch.no_grad():
            for window in windows:
                model(window[None, :-1])
    finally:
        for h in handles:
            h.remove()
    positions = int(windows.shape[0] * (windows.shape[1] - 1))
    return ActivationStats(sites, max_abs, hits / positions, positions)


def record_outliers(stats: ActivationStats, rec: Mapping[str, str], **params: Any) -> None:
    """The outlier features' count and the largest Linear input, recorded with the criterion."""
    p = {"magnitude": OUTLIER_MAGNITUDE, "layer_share": OUTLIER_LAYER_SHARE,
         "position_share": OUTLIER_POSITION_SHARE, "tokens": stats.positions, **params}
    results.record(STUDY, "outlier_features", len(stats.outlier_channels()), "1", params=p, **rec)
    results.record(STUDY, "max_linear_input_abs", float(stats.max_abs.max()), "1", params=p, **rec)


def outlier_summary(stats: ActivationStats, model: str) -> str:
    """The answer in words: how many outlier features, which, and the largest input there."""
    import numpy as np

    found = stats.outlier_channels()
    peak = np.unravel_index(stats.max_abs.argmax(), stats.max_abs.shape)
    head = (f"{model}: {len(found)} outlier feature(s) by LLM.int8()'s criterion (|x| >= "
            f"{OUTLIER_MAGNITUDE:g} at >= {OUTLIER_POSITION_SHARE:.0%} of positions in >= "
            f"{OUTLIER_LAYER_SHARE:.0%} of blocks), over {stats.positions} calibration tokens")
    where = f"; channels {found[:12]}" if found else ""
    return (f"{head}{where}\nlargest Linear input |x| = {stats.max_abs.max():.1f} (block {peak[0]}, "
            f"{stats.sites[peak[1]]}, channel {peak[2]}); median channel's largest |x| = "
            f"{np.median(stats.max_abs.max(axis=(0, 1))):.2f}")


#: the most channels the right panel of the activation figure draws (the largest first)
MAX_CHANNEL_LINES = 6


def plot_activation_outliers(stats: ActivationStats, model: str) -> Figure:
    """Left: each channel's largest input |x| over all blocks (outlier features marked); right:
    for the channels that reach the magnitude anywhere (the largest few), the share of positions
    at or above it, block by block, against the criterion's 6 %."""
    import numpy as np

    from labkit.core import plotting

    peak = stats.max_abs.max(axis=(0, 1))
    found = stats.outlier_channels()
    fig, (ax1, ax2) = plotting.new_figure(1, 2, figsize=(11, 4))
    ax1.plot(np.arange(len(peak)), peak, lw=0.8, color="C0", label="largest |x| of the channel")
    if found:
        ax1.scatter(found, peak[found], color="C3", s=18, zorder=3, label="outlier feature")
    ax1.axhline(OUTLIER_MAGNITUDE, color="k", ls="--", lw=1, label=f"|x| = {OUTLIER_MAGNITUDE:g}")
    ax1.set_yscale("log")
    ax1.set_xlabel("hidden channel")
    ax1.set_ylabel("largest |input| over blocks and sites")
    ax1.set_title("Largest input to the Linear layers, per channel", fontsize=9)
    ax1.legend(fontsize=7)
    share = stats.share.max(axis=1)  # [block, channel], the larger of the two sites
    large = [int(c) for c in np.argsort(-peak) if peak[c] >= OUTLIER_MAGNITUDE][:MAX_CHANNEL_LINES]
    for k, c in enumerate(large):
        ax2.plot(np.arange(share.shape[0]), 100 * share[:, c], marker="o", ms=3,
                 color=f"C{k + 1}", label=f"channel {c}" + (" (outlier feature)" if c in found else ""))
    ax2.axhline(100 * OUTLIER_POSITION_SHARE, color="k", ls="--", lw=1,
                label=f"{OUTLIER_POSITION_SHARE:.0%} of positions")
    ax2.set_xlabel("decoder block")
    ax2.set_ylabel(f"positions with |x| >= {OUTLIER_MAGNITUDE:g} (%)")
    ax2.set_title(f"Channels reaching {OUTLIER_MAGNITUDE:g}: in how many blocks, how often",
                  fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(f"Activation outliers of {model}: {len(found)} outlier feature(s) "
                 f"(LLM.int8()'s criterion), {stats.positions} calibration tokens")
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


def budget_scheme(
    model, cache: QuantCache, windows, ref: Reference, board: pd.DataFrame, bits: int
) -> tuple[pd.Series, pd.Series]:
    """(the scoreboard row of the uniform ``bits``-bit scheme with the lowest mean KLD on the
    *calibration* windows, every candidate's calibration KLD): the budget's scheme is chosen
    without looking at the evaluation it is scored on. Exact rows are no candidates."""
    import pandas as pd

    pool = board[(board.bits == bits) & board.uniform & ~board.exact]
    if pool.empty:
        raise ValueError(f"the scoreboard has no uniform {bits}-bit scheme to set the budget")
    kld = {}
    for name in pool.scheme:
        with quantized(cache, uniform(cache, name)):
            kld[name] = score(model, windows, ref).mean_kld
    calib = pd.Series(kld, name="calibration mean KLD").sort_values()
    return pool.set_index("scheme").loc[calib.index[0]].rename(calib.index[0]), calib


def mixed_budgets(board: pd.DataFrame, budget: pd.Series, recipes: Iterable[str]) -> dict[str, float]:
    """The mixed assignments to search: "labkit-mixed" at the budget scheme's bits per weight,
    and "labkit-mixed@<recipe>" at each recipe's (the hand-written mix's own size)."""
    b = board.set_index("scheme")
    out = {"labkit-mixed": float(budget.bpw)}
    out.update({f"labkit-mixed@{r}": float(b.loc[r, "bpw"]) for r in recipes})
    return out


def mixed_precision(
    model, cache: QuantCache, windows, ref: Reference, groups: Mapping[str, list[str]],
    ladder: list[str], kld: Mapping[tuple[str, str], float], budgets: Mapping[str, float],
    seed: int = 0,
) -> tuple[list[dict], dict[str, dict[str, str]]]:
    """(a scoreboard row per budget, the assignment behind each): the knapsack on the
    calibration sensitivities ``kld``, then the result scored on the evaluation ``windows``."""
    rows, assignments = [], {}
    for label, budget in budgets.items():
        a = mixed_assignment(cache, groups, ladder, kld, budget)
        row = evaluate_assignment(model, cache, windows, ref, a, label, "labkit", seed)
        rows.append({**row, "bits": 0, "uniform": False, "budget_bpw": budget})
        assignments[label] = a
    return rows, assignments


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


def separation(board: pd.DataFrame, row: Mapping[str, Any]) -> pd.DataFrame:
    """Every scoreboard scheme (uniform or recipe; not fp16, not exact) of no more bits per
    weight than ``row`` was allowed (its ``budget_bpw``, else its bpw), against it: ``separated``
    when ``row``'s 95 % interval of mean KLD lies wholly below the rival's, ``worse`` when wholly
    above; ``ratio`` = rival KLD / row KLD."""
    allowed = row.get("budget_bpw", row["bpw"])
    rivals = board[(board.bpw <= allowed + 1e-9) & ~board.exact & (board.scheme != "fp16")]
    out = rivals[["scheme", "bpw", "mean_kld", "mean_kld_lo", "mean_kld_hi"]].copy()
    out["separated"] = row["mean_kld_hi"] < out.mean_kld_lo
    out["worse"] = row["mean_kld_lo"] > out.mean_kld_hi
    out["ratio"] = out.mean_kld / row["mean_kld"]
    return out.sort_values("mean_kld").reset_index(drop=True)


def separation_text(row: Mapping[str, Any], sep: pd.DataFrame) -> str:
    """The verdict in words: against which schemes of no more bits the mix is shown better
    (intervals apart), and against which the difference is only reported."""
    head = (f"{row['scheme']}: {row['bpw']:.3f} bpw, mean KLD {row['mean_kld']:.4g} "
            f"[{row['mean_kld_lo']:.4g}, {row['mean_kld_hi']:.4g}]")
    if sep.empty:
        return f"{head}; no scheme on the scoreboard has as few bits per weight"
    lines = [head]
    for _, r in sep.iterrows():
        verdict = ("better, intervals apart" if r.separated else
                   "worse, intervals apart" if r.worse else "intervals overlap: not shown")
        lines.append(f"  vs {r.scheme} ({r.bpw:.3f} bpw, {r.mean_kld:.4g} [{r.mean_kld_lo:.4g}, "
                     f"{r.mean_kld_hi:.4g}]): {r.ratio:.2f}x, {verdict}")
    return "\n".join(lines)


def mixed_verdict(board: pd.DataFrame, row: Mapping[str, Any], predicted: float) -> tuple[bool, str]:
    """(whether the mix is shown better than every scheme of no more bits, the sentence that says
    so or reports why not: which intervals overlap, and the search's own guess ``predicted``)."""
    sep = separation(board, row)
    if len(sep) and sep.separated.all():
        return True, (f"{row['scheme']} holds: lower mean KLD than every scheme of <= "
                      f"{row['budget_bpw']:.3f} bpw ({', '.join(sep.scheme)}), 95 % intervals "
                      f"apart, {sep.ratio.min():.2f}x to {sep.ratio.max():.2f}x")
    rest = ", ".join(sep.scheme[~sep.separated]) or "no scheme of as few bits"
    return False, (f"{row['scheme']}: not shown, reported only: its interval is not below those of "
                   f"{rest}; the search predicted a summed KLD of {predicted:.4g} on the "
                   f"calibration windows, the evaluation measured {row['mean_kld']:.4g}")


# --- 5: error against bits -----------------------------------------------------------------------


def pareto_points(board: pd.DataFrame, mixed: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Every quantized scheme of the scoreboard and the mixed assignments (fp16 and exact rows
    left out: an exact row's KLD is 0 by construction, see :func:`plot_pareto`)."""
    import pandas as pd

    pts = pd.concat([board, pd.DataFrame(list(mixed))], ignore_index=True)
    return pts[(pts.scheme != "fp16") & ~pts.exact.astype(bool)]


def pareto_front(pts: pd.DataFrame) -> pd.DataFrame:
    """The points no cheaper point beats in mean KLD, cheapest first."""
    order = pts.sort_values(["bpw", "mean_kld"])
    return order[order.mean_kld <= order.mean_kld.cummin()]


#: marker of each library in the Pareto figure
LIBRARY_MARKERS = {"coremltools": "s", "mlx": "o", "gguf": "^", "labkit": "D"}
#: label offsets tried around a point (points), nearest first: the first that overlaps nothing wins
_LABEL_OFFSETS = sorted(((dx, dy) for dx in (4, -4, 14, -14, 34, -34, 64, -64)
                         for dy in range(-84, 85, 7)), key=lambda o: (o[0] ** 2 + o[1] ** 2, -o[0]))


#: a label set farther than this from its point (points) gets a leader line to it
LEADER_PT = 12


def place_labels(ax: Any, xs: Iterable[float], ys: Iterable[float], labels: Iterable[str],
                 fontsize: float = 6, spans: Iterable[tuple[float, float]] | None = None,
                 ) -> list[Any]:
    """Annotate each point so that no label overlaps another label, a point (and its error bar
    from ``spans``: (low, high) per point), the legend or the axes' edge.

    Greedy, in display coordinates after the layout is drawn: each label takes the nearest
    offset of :data:`_LABEL_OFFSETS` (right of the point first) whose box overlaps nothing placed
    before; a label with no free offset takes the least crowded one. A label set farther than
    :data:`LEADER_PT` from its point gets a leader line to it. Labels stay out of the layout
    engine, so placing them moves nothing.
    """
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = list(zip(xs, ys, strict=True))
    scale = fig.dpi / 72.0
    boxes = [_box(*ax.transData.transform(p), 4 * scale) for p in pts]  # the markers themselves
    for (x, _), (lo, hi) in zip(pts, spans or (), strict=False):  # and their error bars
        (x0, y0), (x1, y1) = ax.transData.transform([(x, lo), (x, hi)])
        boxes.append(type(boxes[0]).from_extents(x0 - 3 * scale, y0, x1 + 3 * scale, y1))
    if ax.get_legend() is not None:
        boxes.append(ax.get_legend().get_window_extent(renderer))
    out = []
    for (x, y), text in zip(pts, labels, strict=True):
        probe = _label(ax, text, (x, y), (0, 0), fontsize)
        size = probe.get_window_extent(renderer)
        probe.remove()
        px, py = ax.transData.transform((x, y))

        def box_at(offset: tuple[float, float], size=size, px=px, py=py) -> Any:
            left = px + offset[0] * scale - (size.width if offset[0] < 0 else 0)
            bottom = size.y0 + offset[1] * scale
            return type(size).from_bounds(left, bottom, size.width, size.height)

        crowd = [(sum(_area(box_at(o), b) for b in boxes) + (0 if _inside(box_at(o), frame)
                  else 1e9), k) for k, o in enumerate(_LABEL_OFFSETS)]
        free = [k for c, k in crowd if c == 0]
        k = free[0] if free else min(crowd)[1]
        far = not free or _LABEL_OFFSETS[k][0] ** 2 + _LABEL_OFFSETS[k][1] ** 2 > LEADER_PT ** 2
        out.append(_label(ax, text, (x, y), _LABEL_OFFSETS[k], fontsize, leader=far))
        boxes.append(box_at(_LABEL_OFFSETS[k]))
    return out


def _area(a: Any, b: Any) -> float:
    """The area two boxes share (0 when they do not overlap)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def _label(ax: Any, text: str, xy: tuple[float, float], offset: tuple[float, float],
           fontsize: float, leader: bool = False) -> Any:
    arrow = {"arrowstyle": "-", "lw": 0.5, "color": "grey"} if leader else None
    ann = ax.annotate(text, xy, xytext=offset, textcoords="offset points", fontsize=fontsize,
                      ha="left" if offset[0] >= 0 else "right", arrowprops=arrow)
    ann.set_in_layout(False)
    return ann


def _box(x: float, y: float, r: float) -> Any:
    from matplotlib.transforms import Bbox

    return Bbox([[x - r, y - r], [x + r, y + r]])


def _inside(bb: Any, frame: Any) -> bool:
    return bb.x0 >= frame.x0 and bb.x1 <= frame.x1 and bb.y0 >= frame.y0 and bb.y1 <= frame.y1


def plot_pareto(pts: pd.DataFrame, front: pd.DataFrame, model: str,
                exact: pd.DataFrame | None = None) -> Figure:
    """Mean KLD (with its 95 % interval) against bits per weight, every library together, with
    the Pareto front; exact rows (KLD 0, off a log axis) as dotted vertical lines, footnoted."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(9, 5.5))
    for lib, df in pts.groupby("library"):
        err = [df.mean_kld - df.mean_kld_lo, df.mean_kld_hi - df.mean_kld]
        ax.errorbar(df.bpw, df.mean_kld, yerr=err, fmt=LIBRARY_MARKERS.get(lib, "x"), ms=6,
                    capsize=2, lw=0.8, label=lib)
    ax.step(front.bpw, front.mean_kld, where="post", color="grey", lw=1, label="Pareto front")
    marked = exact[exact.scheme != "fp16"] if exact is not None else pts.iloc[:0]
    for _, r in marked.iterrows():  # the fp16 reference is no format to mark
        ax.axvline(r.bpw, color="k", ls=":", lw=1.2,
                   label=f"{r.scheme}{EXACT_MARK}: KLD 0, lossless by construction")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (exact, overheads included)")
    ax.set_ylabel("mean KL divergence to fp32 (nat, log; bars: 95 % CI)")
    ax.set_title(f"Quantization error against size, {model}")
    ax.margins(x=0.08, y=0.15)
    ax.legend(fontsize=7, loc="upper right")
    place_labels(ax, pts.bpw, pts.mean_kld, [s.split("-", 1)[-1] for s in pts.scheme],
                 spans=zip(pts.mean_kld_lo, pts.mean_kld_hi, strict=True))
    return fig


# --- 6: an encoder -------------------------------------------------------------------------------


def load_encoder(name: str) -> Any | None:
    """The encoder of section 6, or None with a skip line: when ``name`` is empty, or the
    optional package is not installed (the rest of the notebook stands alone)."""
    from labkit.core.skips import skip
    from labkit.models import load

    if not name:
        skip("MiniLM section", "ENCODER is empty")
        return None
    try:
        return load(name, device="cpu")
    except Exception as e:  # any failure to load means: skip it, and say why
        skip("MiniLM section", f"cannot load {name!r}: {e}")
        return None


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
