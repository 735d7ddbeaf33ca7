"""Timing: warm-up, repeats, device synchronisation and robust statistics.

Why this module exists: a GPU (CUDA, MPS) or a lazy framework (MLX) returns from a call before the
work is done, the first calls of anything pay for caches and allocations, and one slow outlier
skews a mean. So every measurement in the lab (1) runs the function a few times untimed, (2)
waits for the device before reading the clock, and (3) reports the median with p10/p90 spread.

The clock and the sync are injectable, so the unit tests drive this module with a fake clock and
never sleep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Clock = Callable[[], float]
Sync = Callable[[], None]


def _no_sync() -> None:
    """Nothing to wait for: CPU work is finished when the call returns."""


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings, all in seconds.

    ``p10``/``p90`` are percentiles with linear interpolation (numpy's default), so with few
    samples they sit between the observed values rather than on them.
    """

    samples: list[float]
    median: float
    p10: float
    p90: float
    mean: float
    n: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Stats:
        """Summarise ``samples`` (seconds). Refuses an empty or non-finite list: no number to give."""
        values = [float(s) for s in samples]
        if not values:
            raise ValueError("Stats.from_samples: samples is empty; need at least one timing")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"Stats.from_samples: samples must be finite seconds, got {values}")
        arr = np.asarray(values, dtype=np.float64)
        return cls(
            samples=values,
            median=float(np.median(arr)),
            p10=float(np.percentile(arr, 10)),
            p90=float(np.percentile(arr, 90)),
            mean=float(arr.mean()),
            n=len(values),
        )

    median_ms = property(lambda self: self.median * 1e3, doc="median in milliseconds")
    p10_ms = property(lambda self: self.p10 * 1e3, doc="p10 in milliseconds")
    p90_ms = property(lambda self: self.p90 * 1e3, doc="p90 in milliseconds")
    mean_ms = property(lambda self: self.mean * 1e3, doc="mean in milliseconds")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (seconds), e.g. for a DataFrame row or a record's params."""
        return {"median_s": self.median, "p10_s": self.p10, "p90_s": self.p90, "mean_s": self.mean,
                "n": self.n, "samples_s": list(self.samples)}


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 2,
    repeats: int = 10,
    sync: Sync | None = None,
    clock: Clock = time.perf_counter,
) -> Stats:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed calls.

    ``sync`` (e.g. from :func:`device_sync`) is called after the warm-up and before every clock
    read, so queued GPU work is drained before the span starts and finished before it ends.
    """
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"measure: warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"measure: repeats must be an int >= 1, got {repeats!r}")
    wait = sync or _no_sync
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        wait()
        start = clock()
        fn()
        wait()
        samples.append(clock() - start)
    return Stats.from_samples(samples)


def device_sync(device: str) -> Sync:
    """The function that waits for ``device`` to finish its queued work.

    ``"cpu"`` -> a no-op; ``"cuda"``/``"cuda:N"`` -> ``torch.cuda.synchronize``; ``"mps"`` ->
    ``torch.mps.synchronize``. torch is imported here, not at module import. For MLX, whose
    arrays are lazy, use :func:`mlx_sync` on the output instead.
    """
    if not isinstance(device, str):
        raise ValueError(f"device_sync: device must be a str such as 'cpu', got {device!r}")
    if device == "cpu":
        return _no_sync
    if device == "cuda" or device.startswith("cuda:"):
        import torch

        target = torch.device(device)

        def cuda_sync() -> None:
            torch.cuda.synchronize(target)

        return cuda_sync
    if device == "mps":
        import torch

        return torch.mps.synchronize
    raise ValueError(
        f"device_sync: device must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
    )


def mlx_sync(value: Any) -> Any:
    """Force MLX's lazy evaluation of ``value`` (an array or a tree of arrays); returns it.

    MLX builds a graph and computes nothing until ``mx.eval``; a timer around an MLX call without
    this measures graph construction only. Use it inside the timed function, e.g.
    ``measure(lambda: mlx_sync(model(x)))``. mlx is imported here, so this module stays light.
    """
    import mlx.core as mx

    mx.eval(value)
    return value


class Timer:
    """Context manager for one span: ``with Timer() as t: ...`` then ``t.seconds``.

    For one-off spans (loading a model, an export). For anything you compare, prefer
    :func:`measure`, which warms up and repeats.
    """

    def __init__(self, *, clock: Clock = time.perf_counter, sync: Sync | None = None) -> None:
        self._clock = clock
        self._sync = sync or _no_sync
        self._start: float | None = None
        self.seconds: float | None = None

    def __enter__(self) -> Timer:
        self._sync()
        self._start = self._clock()
        self.seconds = None
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        assert self._start is not None
        self.seconds = self._clock() - self._start

    @property
    def ms(self) -> float:
        if self.seconds is None:
            raise RuntimeError("Timer.ms: the span has not finished (use it after the with block)")
        return self.seconds * 1e3


@dataclass(frozen=True)
class GenerationTiming:
    """Latency of one generation: time to first token and time per output token.

    ``ttft_s`` is the prefill (prompt processing + first token). ``tpot_s`` holds one latency per
    decode step (``n_tokens - 1`` of them). ``total_s`` spans prefill start to last token.
    """

    ttft_s: float
    tpot_s: list[float] = field(default_factory=list)
    total_s: float = 0.0
    n_tokens: int = 0

    @property
    def tpot_median_s(self) -> float:
        """Median decode-step latency; NaN when there were no decode steps (n_tokens == 1)."""
        return float(np.median(self.tpot_s)) if self.tpot_s else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: decode tokens / decode time (prefill excluded); NaN if no steps."""
        decode_time = sum(self.tpot_s)
        return len(self.tpot_s) / decode_time if self.tpot_s and decode_time > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "ttft_s": self.ttft_s,
            "tpot_median_s": self.tpot_median_s,
            "tokens_per_s": self.tokens_per_s,
            "total_s": self.total_s,
            "n_tokens": self.n_tokens,
        }


def time_generation(
    prefill: Callable[[], Any],
    decode_step: Callable[[Any], Any],
    n_tokens: int,
    *,
    sync: Sync | None = None,
    clock: Clock = time.perf_counter,
) -> tuple[GenerationTiming, list[Any]]:
    """Run and time one generation of ``n_tokens`` tokens.

    ``prefill()`` returns the first token (or whatever state the decode needs); each
    ``decode_step(state)`` returns the next state. TTFT is the prefill's time; then
    ``n_tokens - 1`` decode steps are timed one by one. ``sync`` is called before every clock
    read. Returns the timing and the list of the ``n_tokens`` outputs (prefill's first).

    Consecutive spans share a clock read, so the per-step latencies add up to ``total_s``.
    """
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise ValueError(f"time_generation: n_tokens must be an int >= 1, got {n_tokens!r}")
    wait = sync or _no_sync
    wait()
    start = clock()
    state = prefill()
    wait()
    previous = clock()
    ttft = previous - start
    outputs = [state]
    steps = []
    for _ in range(n_tokens - 1):
        state = decode_step(state)
        wait()
        now = clock()
        steps.append(now - previous)
        previous = now
        outputs.append(state)
    timing = GenerationTiming(
        ttft_s=ttft, tpot_s=steps, total_s=previous - start, n_tokens=n_tokens
    )
    return timing, outputs
