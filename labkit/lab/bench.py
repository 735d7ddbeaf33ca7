"""`labkit bench NAME`: a study's measurements outside its notebook, recorded the same way.

Each benchmark is registered here by name as "module:function"; the function takes
``quick: bool`` and returns the list of records it wrote. Modules import lazily so that
`labkit bench --list` is instant and a benchmark's heavy dependencies load only when run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

BENCHMARKS: dict[str, str] = {
    "bandwidth": "labkit.lab.bench:bench_bandwidth",
    "kv-cache": "labkit.studies.kv_cache:bench",
    "rag": "labkit.studies.rag_on_device:bench_retrieval",
    "runtimes": "labkit.studies.runtime_benchmark:bench",
}


def resolve(name: str) -> Callable[..., list[dict]]:
    """The benchmark function registered under ``name`` (KeyError listing the known names)."""
    if name not in BENCHMARKS:
        known = ", ".join(sorted(BENCHMARKS))
        raise KeyError(f"unknown benchmark {name!r}; known: {known}")
    module, func = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module), func)


def bench_bandwidth(quick: bool = False) -> list[dict]:
    """Copy bandwidth against buffer size (study "00_tour"): the roofline denominator of later studies."""
    from labkit.core import env, results

    sizes = [2**k for k in range(14, 25 if quick else 29, 2)]
    df = env.copy_bandwidth(sizes, repeats=3 if quick else 7)
    out = []
    for row in df.itertuples():
        out.append(
            results.record(
                "00_tour", "copy_bandwidth", float(row.gb_per_s), "GB/s",
                runtime="numpy", device="cpu", params={"size_bytes": int(row.size_bytes)},
            )
        )
    return out
