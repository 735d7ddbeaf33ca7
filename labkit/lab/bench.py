"""`labkit bench NAME`: a study's measurements outside its notebook, recorded the same way.

Each benchmark is registered here by name as "module:function"; the function takes
``quick: bool`` and returns the list of records it wrote. Modules import lazily so that
`labkit bench --list` is instant and a benchmark's heavy dependencies load only when run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

BENCHMARKS: dict[str, str] = {
    "bandwidth": "labkit.studies.tour:bench",
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
