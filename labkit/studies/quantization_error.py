"""The pieces of notebook 03 that are more than plotting: the scoreboard, per-layer sensitivity,
and a sensitivity-guided mixed-precision assignment.

Mixed precision, the idea: blocks are not equally fragile. Measure, for each unit (one block's
attention or MLP Linears), the mean KLD when only that unit is quantized at each rung of a
ladder of schemes (e.g. MLX affine 3, 4, 6 bits). Assume the damage adds up across units, and
choose one rung per unit to minimize the summed KLD within a bit budget for the whole model (a
small multiple-choice knapsack, solved exactly by dynamic programming). The result is then *measured* like any other scheme; the additivity is only
the search's guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict

from labkit.quant.evaluate import (
    QuantCache,
    Reference,
    assignment_bpw,
    layer_index,
    quantized,
    score,
    uniform,
)
from labkit.quant.schemes import get_scheme, tensor_bits


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
