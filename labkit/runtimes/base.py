"""The interface every runtime adapter implements, and the measurements built on it.

A runtime here is "something that turns token ids into next-token logits, keeping its own KV
cache": torch eager, torch.compile, ONNX Runtime, MLX, llama.cpp, the Swift port, Core ML.
Each adapter says whether it can run here (``available()``: None, or the reason in words), loads
a model folder, then answers ``prefill(ids)`` (reset the cache, run the prompt, return the last
position's logits) and ``decode_step(token)`` (append one token, return its logits).

Why one interface: llama-bench's two numbers — pp (prompt tokens/s) and tg (generated tokens/s)
— and the parity column are then computed by the same code for every runtime (:func:`time_pp`,
:func:`time_tg`, :func:`greedy`), so a difference in the matrix is the runtime's, not the
harness's. A runtime that cannot be driven token by token from Python (the Swift CLI) overrides
:meth:`Runtime.timed_generate` and reports its own in-process timers instead.

Logits come back as float32 numpy ``[vocab]``; all timings are wall-clock seconds around calls
that return only when the work is done (the adapters synchronise: ``mx.eval``, CUDA sync).
"""

from __future__ import annotations

import hashlib
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class RuntimeUnavailable(RuntimeError):
    """Raised by ``load`` when ``available()`` gave a reason (the message is that reason)."""


@dataclass
class GenerationRun:
    """One timed greedy run: prompt time, per-token decode times, tokens, logits."""

    prefill_s: float
    decode_s: list[float]  # one entry per decode_step (the first token comes from prefill)
    tokens: list[int]  # generated tokens, len = n_new
    logits: list[np.ndarray] = field(default_factory=list)  # [vocab] per generated token

    @property
    def decode_total_s(self) -> float:
        return float(sum(self.decode_s))


class Runtime(ABC):
    """One inference runtime; subclasses set ``name`` and implement the four methods."""

    name: ClassVar[str] = "runtime"
    #: what the numbers run on ("cpu", "cuda", ...), recorded with every result
    device: str = "cpu"
    #: precision of the weights as this runtime holds them ("float32", "float16", "q4_0", ...)
    dtype: str = "float32"
    #: False where the runtime gives only tokens (then max_abs_logit_err is not recorded)
    exposes_logits: ClassVar[bool] = True
    #: True where prefill/decode_step return log-probabilities (the logits' log-softmax) because
    #: the runtime's API gives no raw logits (llama.cpp's server API); parity then compares both
    #: sides as log-probabilities (a per-position shift of the logits changes no probability)
    returns_logprobs: ClassVar[bool] = False
    #: a note shown beside the numbers (e.g. "reference BLAS, one thread")
    note: str = ""

    @classmethod
    @abstractmethod
    def available(cls) -> str | None:
        """None when this runtime can run here; otherwise why not, and how to get it."""

    @abstractmethod
    def load(self, model_dir: Path) -> None:
        """Prepare the model (convert/export if needed). Raises RuntimeUnavailable if unavailable."""

    @abstractmethod
    def prefill(self, ids: list[int]) -> np.ndarray:
        """Reset the cache, run ``ids``, return the last position's logits (float32 [vocab])."""

    @abstractmethod
    def decode_step(self, token: int) -> np.ndarray:
        """Append ``token`` at the next position; return its logits (float32 [vocab])."""

    def model_bytes(self) -> int | None:
        """Bytes of the weights as this runtime stores them (file or tensors); None if unknown."""
        return None

    @classmethod
    def rounds_here(cls, rounds: int) -> int:
        """How many of the matrix's ``rounds`` processes this runtime runs on this machine: all,
        unless its numbers here are a correctness check rather than its speed (MLX off a Mac)."""
        return rounds

    def close(self) -> None:
        """Free what ``load`` built (optional)."""
        return None

    def _check_available(self) -> None:
        reason = self.available()
        if reason is not None:
            raise RuntimeUnavailable(f"{self.name}: {reason}")

    def timed_generate(self, prompt: list[int], n_new: int, keep_logits: bool = False) -> GenerationRun:
        """Greedy ``n_new`` tokens after ``prompt``, timing prefill and every decode step."""
        if n_new < 1:
            raise ValueError(f"n_new must be >= 1, got {n_new}")
        t0 = time.perf_counter()
        logits = self.prefill(list(prompt))
        prefill_s = time.perf_counter() - t0
        tokens, kept, decode_s = [], [], []
        for i in range(n_new):
            if i:
                t0 = time.perf_counter()
                logits = self.decode_step(tokens[-1])
                decode_s.append(time.perf_counter() - t0)
            if keep_logits:
                kept.append(np.asarray(logits, dtype=np.float32).copy())
            tokens.append(int(np.argmax(logits)))
        return GenerationRun(prefill_s, decode_s, tokens, kept)


# --- measurements shared by every runtime ---------------------------------------------------


@dataclass(frozen=True)
class MeanSd:
    """mean +- sd over repeats, as llama-bench prints them (sd with n-1; 0 for one sample)."""

    mean: float
    sd: float
    n: int
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: list[float]) -> MeanSd:
        if not samples:
            raise ValueError("MeanSd.of: no samples")
        arr = np.asarray(samples, dtype=np.float64)
        sd = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        return cls(float(arr.mean()), sd, len(arr), tuple(float(s) for s in samples))

    def __str__(self) -> str:
        return f"{self.mean:.2f} ± {self.sd:.2f}"


def time_pp(rt: Runtime, prompt: list[int], repeats: int, warmup: int = 1) -> tuple[MeanSd, MeanSd]:
    """pp: prompt tokens/s of the prefill of ``prompt``; also returns its seconds (the TTFT:
    the first new token's logits exist when prefill returns).

    Timed through ``timed_generate(prompt, 1)`` so that a runtime with its own timers (the Swift
    CLI) reports the same quantity.
    """
    for _ in range(warmup):
        rt.timed_generate(prompt, 1)
    seconds = [rt.timed_generate(prompt, 1).prefill_s for _ in range(repeats)]
    return MeanSd.of([len(prompt) / s for s in seconds]), MeanSd.of(seconds)


def time_tg(rt: Runtime, n_gen: int, repeats: int, start: list[int], warmup: int = 1) -> MeanSd:
    """tg: generated tokens/s of ``n_gen`` decode steps after a one-token context (``start``).

    As llama-bench's tg: the tokens fed are the greedy ones (the same for every runtime that
    agrees with the reference); the prompt (one BOS) is not timed.
    """
    rates = []
    for r in range(warmup + repeats):
        run = rt.timed_generate(start, n_gen + 1)
        if r >= warmup:
            rates.append(n_gen / run.decode_total_s)
    return MeanSd.of(rates)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes (Python, its libraries and the model).

    On Linux, VmHWM from /proc/self/status: getrusage's ru_maxrss is NOT used there, because
    Linux carries the maximum across fork+exec, so a child process started by a large parent
    reports the parent's size (every small runtime showed the orchestrator's 233 MiB). macOS
    and others: ru_maxrss (bytes on macOS). The matrix runs each runtime in its own process, so
    this is that runtime's peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def children_peak_rss_bytes() -> int:
    """ru_maxrss of finished child processes (the Swift CLI), in bytes. An upper bound on Linux:
    it includes the spawning Python's size at fork, carried across exec."""
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log(softmax(x)) over the last axis, in float64 (max subtracted first: no overflow)."""
    x = np.asarray(x, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def parity(
    run: GenerationRun, reference: GenerationRun, exposes_logits: bool = True,
    logprobs: bool = False,
) -> dict[str, Any]:
    """Greedy agreement (%) and max |logit difference| against the reference run.

    agreement: share of positions where both runs chose the same token (free-running, so after
    a first divergence the histories differ and later positions usually disagree too).
    max_abs_logit_err: over the positions up to and including the first divergence, where both
    runtimes had seen the same tokens, so the logits are comparable. ``logprobs``: ``run`` gave
    log-probabilities (``Runtime.returns_logprobs``), so both sides are compared after
    :func:`log_softmax` (idempotent on log-probabilities).
    """
    n = min(len(run.tokens), len(reference.tokens))
    same = [a == b for a, b in zip(run.tokens[:n], reference.tokens[:n], strict=True)]
    first_diff = same.index(False) if False in same else n
    out: dict[str, Any] = {
        "greedy_agreement_pct": 100.0 * sum(same) / n,
        "first_divergence": first_diff,
        "max_abs_logit_err": None,
    }
    if exposes_logits and run.logits and reference.logits:
        upto = min(first_diff + 1, n, len(run.logits), len(reference.logits))
        space = log_softmax if logprobs else np.asarray
        out["max_abs_logit_err"] = float(max(
            np.abs(space(run.logits[i]) - space(reference.logits[i])).max() for i in range(upto)
        ))
    return out


def file_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a file, or the sum over a folder's files."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def cache_dir() -> Path:
    """Where exported files (ONNX, GGUF, float32 copies) are kept between runs: build/cache/
    (ignored by git), or ``LABKIT_RUNTIME_CACHE`` when set (tests point it at a temporary folder)."""
    env = os.environ.get("LABKIT_RUNTIME_CACHE")
    if env:
        return Path(env)
    from labkit.core import paths

    return paths.build_dir() / "cache"


def weights_key(model_dir: Path) -> str:
    """A short key for a model folder's weights (name, size and mtime of each safetensors file)."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]
