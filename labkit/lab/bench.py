"""`labkit bench NAME`: a study's measurements outside its notebook, recorded the same way.

Each benchmark is registered here by name as "module:function"; the function takes
``quick: bool`` and returns the list of records it wrote; one call is one run (its own run id).
Modules import lazily so that `labkit bench --list` is instant and a benchmark's heavy
dependencies load only when run.
"""

from __future__ import annotations

import functools
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
    return _as_run(getattr(importlib.import_module(module), func))


def _as_run(fn: Callable[..., list[dict]]) -> Callable[..., list[dict]]:
    """``fn`` as one run: a new run id for its records, entered in the run registry as
    "running" with its first record and "ok" when it returns ("failed" if it raises after
    recording), so a half-finished benchmark is never taken as complete and a refused one
    changes nothing. The signature stays ``fn``'s (functools.wraps), which the CLI inspects."""

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> list[dict]:
        from labkit.core import results

        results.start_run()
        results.note_run_at_first_record("*")
        try:
            records = fn(*args, **kwargs)
        except BaseException:
            if results.run_registered():
                results.note_run("*", "failed")
            raise
        finally:
            results.note_run_at_first_record(None)
        results.note_run("*", "ok")
        return records

    return run
