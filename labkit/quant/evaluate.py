"""Quantization error on a whole model: perplexity, KL divergence to fp32, same top token.

The model runs in float32 with each quantized Linear's weight replaced by the scheme's
reconstruction (``labkit.quant.ops.fake_quantize``), so the scoreboard compares weight formats,
not kernels. Token embeddings (tied to the output head in tiny-llama) and norms stay in fp16 for
every scheme and are not counted in bits per weight; the Linear layers of the blocks are
quantized, as the ``bpw`` column says.

The metrics are llama.cpp's ``llama-perplexity --kl-divergence`` ones: for each scored token,
KL(P_fp32 || Q_quant) = sum_v p(v) (log p(v) - log q(v)) over the vocabulary, averaged over
tokens ("mean KLD"), and the share of tokens whose most likely next token is unchanged ("same
top"). We score every position of each held-out window (llama.cpp scores the second half of
each chunk): the numbers are comparable in kind, not digit for digit.

Every metric is a ratio of sums over windows (:class:`WindowSums`), so resampling whole windows
gives a resample's metrics exactly: :func:`bootstrap_intervals` puts a percentile bootstrap 95 %
interval on each (Efron and Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13), the
window being the unit because tokens of one window are not independent.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labkit.quant.ops import fake_quantize, weight_snr_db
from labkit.quant.schemes import Scheme, get_scheme, tensor_bits


def heldout_windows(model_dir: str | Path, n_windows: int, context: int, start: int = 0):
    """``[n_windows, context + 1]`` token windows from the model folder's heldout_slice: its rows
    ``start`` to ``start + n_windows - 1``, each cut to its first ``context + 1`` tokens.

    The trainer ships ``heldout_slice.safetensors`` (held-out windows never trained on) beside
    the weights, so the evaluation needs no corpus download. Rows are consecutive stretches of
    one text, so two calls with disjoint row ranges share no token (``start`` keeps a
    calibration set apart from an evaluation set).
    """
    import torch
    from safetensors.numpy import load_file

    path = Path(model_dir) / "heldout_slice.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected the trainer's held-out windows)")
    windows = load_file(str(path))["windows"]
    if n_windows < 1 or context < 1 or start < 0:
        raise ValueError(
            f"n_windows and context must be >= 1 and start >= 0, got {n_windows}, {context}, {start}"
        )
    if start + n_windows > windows.shape[0] or context + 1 > windows.shape[1]:
        raise ValueError(
            f"{path} holds {windows.shape[0]} windows of {windows.shape[1]} tokens; asked for "
            f"n_windows={n_windows} from window {start} of context={context} (+1 target)"
        )
    rows = windows[start : start + n_windows, : context + 1]
    return torch.from_numpy(rows.astype(np.int64))


def linear_layers(model, include: str = ".layers.") -> dict[str, object]:
    """The quantizable Linear modules, by module name: those whose name contains ``include``
    (decoder blocks by default; "encoder.layer." for a BERT encoder)."""
    import torch.nn as nn

    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and include in f".{name}"
    }


def layer_index(name: str) -> int:
    """The block number in a name like 'model.layers.3.mlp.up_proj'."""
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1])


class QuantCache:
    """Fake-quantized weights per (layer name, scheme), computed once: the per-layer sweep and the
    mixed-precision search reuse the same tensors many times."""

    def __init__(self, model, include: str = ".layers.", first_blocks: int | None = None) -> None:
        """``first_blocks``: quantize only the Linears of blocks 0 .. first_blocks - 1 (None:
        every block), so a quick run on a large model quantizes a part of it."""
        self.layers = linear_layers(model, include)
        if first_blocks is not None:
            if first_blocks < 1:
                raise ValueError(f"first_blocks must be >= 1 or None, got {first_blocks}")
            self.layers = {n: m for n, m in self.layers.items() if layer_index(n) < first_blocks}
        self.original = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self._cache: dict[tuple[str, str], object] = {}

    def weight(self, name: str, scheme: str | Scheme):
        import torch

        s = get_scheme(scheme)
        key = (name, s.name)
        if key not in self._cache:
            w = self.original[name].float().cpu().numpy()
            self._cache[key] = torch.from_numpy(fake_quantize(w, s))
        return self._cache[key]

    def exact(self, name: str, scheme: str | Scheme) -> bool:
        """True when ``scheme`` reconstructs this layer's weight exactly: the weight already lies
        on the scheme's grid (tiny-llama's fp16 weights under fp16; SmolLM2's, which are
        dequantized Q4_1, under Q4_1), so quantizing it there is lossless by construction."""
        import torch

        return torch.equal(self.weight(name, scheme), self.original[name].float().cpu())

    def snr_db(self, name: str, scheme: str | Scheme) -> float:
        w = self.original[name].float().cpu().numpy()
        return weight_snr_db(w, self.weight(name, scheme).numpy())

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: tuple(w.shape) for n, w in self.original.items()}


def uniform(cache: QuantCache, scheme: str | Scheme) -> dict[str, str]:
    """Every quantizable layer in ``scheme``."""
    name = get_scheme(scheme).name
    return dict.fromkeys(cache.layers, name)


def assignment_bpw(cache: QuantCache, assignment: Mapping[str, str]) -> float:
    """Exact bits per weight of the quantized layers under a {layer: scheme} assignment
    (layers absent from it count at fp16)."""
    shapes = cache.shapes()
    bits = sum(tensor_bits(assignment.get(n, "fp16"), shp) for n, shp in shapes.items())
    return bits / sum(a * b for a, b in shapes.values())


@contextmanager
def quantized(cache: QuantCache, assignment: Mapping[str, str]) -> Iterator[None]:
    """Swap in the assignment's weights; restore the originals on exit, even after an error."""
    import torch

    unknown = set(assignment) - set(cache.layers)
    if unknown:
        raise ValueError(f"assignment names layers the model lacks: {sorted(unknown)[:3]}")
    try:
        with torch.no_grad():
            for name, scheme in assignment.items():
                w = cache.layers[name].weight
                w.copy_(cache.weight(name, scheme).to(w.dtype))
        yield
    finally:
        with torch.no_grad():
            for name in assignment:
                cache.layers[name].weight.copy_(cache.original[name])


@dataclass
class Reference:
    """The fp32 model's log-probabilities on the evaluation windows (one tensor per window)."""

    logprobs: list
    targets: list
    nll: float  # mean negative log-likelihood of the true next tokens

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll))

    @property
    def tokens(self) -> int:
        return sum(int(t.numel()) for t in self.targets)


@dataclass
class Scores:
    """One model variant against the reference."""

    ppl: float
    delta_ppl: float
    mean_kld: float
    same_top_pct: float


def _logprobs(model, window):
    import torch

    with torch.no_grad():
        logits = model(window[None, :-1])[0].float()
    return torch.log_softmax(logits, dim=-1)


def reference(model, windows) -> Reference:
    """Run the (unquantized) model once and keep what the comparisons need."""
    logprobs, targets, nll_sum, n = [], [], 0.0, 0
    for window in windows:
        lp = _logprobs(model, window)
        tgt = window[1:]
        nll_sum -= float(lp.gather(1, tgt[:, None]).sum())
        n += tgt.numel()
        logprobs.append(lp)
        targets.append(tgt)
    return Reference(logprobs, targets, nll_sum / n)


@dataclass
class WindowSums:
    """Per evaluation window, the sums every metric is a ratio of: the variant's and the
    reference's summed NLL of the true next tokens, the summed KL(P_ref || Q), the positions whose
    top token is unchanged, and the tokens scored. Any selection of windows (all of them, or a
    bootstrap resample) gives its metrics exactly, by :meth:`metrics`."""

    nll: np.ndarray
    ref_nll: np.ndarray
    kld: np.ndarray
    same: np.ndarray
    tokens: np.ndarray

    def metrics(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """ppl, delta_ppl, mean_kld and same_top_pct of each row of window indices ``idx``
        (shape (..., k), repeats allowed): token-weighted, as over one long text."""
        n = self.tokens[idx].sum(-1)
        ppl = np.exp(self.nll[idx].sum(-1) / n)
        ref_ppl = np.exp(self.ref_nll[idx].sum(-1) / n)
        return {
            "ppl": ppl,
            "delta_ppl": ppl - ref_ppl,
            "mean_kld": self.kld[idx].sum(-1) / n,
            "same_top_pct": 100.0 * self.same[idx].sum(-1) / n,
        }

    def scores(self) -> Scores:
        """The metrics over every window."""
        m = self.metrics(np.arange(len(self.tokens)))
        return Scores(*(float(m[k]) for k in ("ppl", "delta_ppl", "mean_kld", "same_top_pct")))


def window_sums(model, windows, ref: Reference) -> WindowSums:
    """Run the (quantized) model over ``windows`` and sum, per window, what the metrics need."""
    rows = []
    for window, ref_lp, tgt in zip(windows, ref.logprobs, ref.targets, strict=True):
        lp = _logprobs(model, window)
        rows.append((
            -float(lp.gather(1, tgt[:, None]).sum()),
            -float(ref_lp.gather(1, tgt[:, None]).sum()),
            float((ref_lp.exp() * (ref_lp - lp)).sum()),
            int((lp.argmax(-1) == ref_lp.argmax(-1)).sum()),
            int(tgt.numel()),
        ))
    cols = list(zip(*rows, strict=True))
    return WindowSums(*(np.asarray(c, dtype=np.float64) for c in cols))


def score(model, windows, ref: Reference) -> Scores:
    """Perplexity, its change, mean KL(P_ref || Q) and same-top-token % over ``windows``."""
    return window_sums(model, windows, ref).scores()


#: bootstrap resamples behind every interval (enough for stable 2.5 % and 97.5 % percentiles)
BOOTSTRAP_SAMPLES = 2000


def bootstrap_intervals(
    sums: WindowSums, seed: int, samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over windows: {metric: (low, high)} at ``level``.

    ``samples`` resamples of the windows with replacement (numpy's generator seeded with
    ``seed``). Every variant scored on the same windows with the same seed is resampled
    identically, so two variants' intervals come from the same draws. With one window the
    interval is that window's value: nothing to resample.
    """
    rng = np.random.default_rng(seed)
    n = len(sums.tokens)
    draws = sums.metrics(rng.integers(0, n, size=(samples, n)))
    tail = (1.0 - level) / 2.0
    return {k: (float(np.quantile(v, tail)), float(np.quantile(v, 1.0 - tail)))
            for k, v in draws.items()}
