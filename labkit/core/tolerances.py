"""Tolerances: how far two computations of the same thing may differ, and why. One source.

Tests and notebooks take their bounds from here (``tol.SAME_MATH.at("cpu")``), so a bound is
stated once, with its reason, and a bound that must differ by device (a GPU kernel sums in
another order than a CPU BLAS) differs here and nowhere else. Values are maximum absolute
differences unless the name says otherwise.

Why these sizes (float32 has a 24-bit mantissa, so one rounding is ~6e-8 relative):

* the same float32 math on another code path (cached vs uncached, fused vs unfused projections,
  ours vs transformers on the same kernels) differs only in summation order: ~1e-6 on logits of
  size ~10 after a few layers, so 1e-5 on a CPU. GPU kernels (MPS, CUDA: other reductions,
  TF32 off) get 1e-4.
* the same float32 math over a long decode (128 steps, cached vs uncached) on logits up to ~25
  (a trained 8-layer model, or random weights scaled up for decisive greedy choices): the
  rounding grows with the logits and the steps (1.4e-5 on the shipped tiny-llama, CPU), so 1e-4.
* another runtime or language on the same float32 weights (Swift with BLAS, ONNX Runtime,
  OpenVINO, MLX) reorders every matrix product: 1e-4.
* llama.cpp's F32 GGUF path quantizes nothing but accumulates in its own kernels and keeps
  its own RoPE tables: 1e-3.
* float16 compute (Core ML's precision) of float16 weights rounds every activation: 0.05 on
  logits of std ~1.
* a float16 Core ML package read back and run in float32 differs by fp16 rounding of weights:
  0.05 logits; 8-bit weight quantization likewise 0.05; 4-bit 1.0 (a check that nothing is
  broken, not of quality: quality is measured in notebook 03).

Per device: a GPU bound differs from the CPU one only where its kernels reorder sums (cuBLAS
and Metal split reductions over thread blocks; torch keeps TF32 off for float32 matmuls) or
choose kernels by layout (MPS SDPA takes a fast path for contiguous inputs). CUDA bounds were
checked on an H200 (the records under data/results name the machine); the MPS bounds have not
run on a Mac yet: ``tests/test_mac_*.py`` measure them on the first one (``make test``).

Speed: a claim that one way is faster holds only where the hardware makes it physical (a cached
decode step beats re-running the prompt on a CPU, where compute scales with tokens; a 27 M model
on a GPU is launch-bound, so both cost about one launch per layer). :class:`SpeedClaim` says
where a claim is asserted; elsewhere a notebook reports it (``verdict`` gives None) and moves on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEVICES = ("cpu", "cuda", "mps")
#: other names of the Apple GPU: MLX says "gpu" (Metal), Core ML's units run on it too
_ALIASES = {"gpu": "mps", "metal": "mps"}


def device_kind(device: str) -> str:
    """"cpu", "cuda" or "mps" for a torch device name ("cuda:0"), MLX's "gpu" or "metal"."""
    kind = _ALIASES.get(str(device).split(":")[0].lower(), str(device).split(":")[0].lower())
    if kind not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    return kind


@dataclass(frozen=True)
class Tolerance:
    """A bound with its reason, per device kind (``cpu``, ``cuda``, ``mps``)."""

    cpu: float
    why: str
    gpu: float | None = None  # cuda and mps; defaults to the CPU bound
    per_device: dict[str, float] = field(default_factory=dict)

    def at(self, device: str = "cpu") -> float:
        """The bound on ``device`` ("cpu", "cuda", "mps", "cuda:0"-style names, MLX's "gpu")."""
        kind = device_kind(device)
        if kind in self.per_device:
            return self.per_device[kind]
        if kind == "cpu" or self.gpu is None:
            return self.cpu
        return self.gpu

    def __float__(self) -> float:
        return self.cpu


SAME_MATH = Tolerance(
    1e-5, "the same float32 math on another code path: only summation order differs", gpu=1e-4
)
EXACT = Tolerance(0.0, "the same kernels on the same values in the same order: bit-identical",
                  gpu=1e-6)
OTHER_RUNTIME = Tolerance(1e-4, "float32 weights through another runtime or language (BLAS order)")
GGUF_F32 = Tolerance(1e-3, "llama.cpp's F32 path: its own kernels and RoPE tables")
FP16_WEIGHTS = Tolerance(0.05, "float16 weights run in float32: fp16 rounding of every weight")
INT8_WEIGHTS = Tolerance(0.05, "8-bit weights: a sanity bound; quality is measured in notebook 03")
INT4_WEIGHTS = Tolerance(1.0, "4-bit weights: a sanity bound; quality is measured in notebook 03")
ATTENTION = Tolerance(
    1e-5, "exact attention, reordered (tiled online softmax vs SDPA): outputs are convex "
    "combinations of V, so errors stay at float32 rounding; CUDA's SDPA stays below 2e-6 (an "
    "H200's records), the Metal kernels of MPS SDPA and MLX are new and unmeasured here",
    gpu=1e-4, per_device={"cuda": 1e-5}
)
LONG_DECODE = Tolerance(
    1e-4, "the same float32 math on another code path over a 128-token decode on logits up to "
    "~25: rounding grows with the logits' size and the number of steps; on a GPU the cached "
    "one-query step and the uncached whole-prefix forward run different kernels (chosen by "
    "shape), each summing in its own order, so 10x", gpu=1e-3
)
FP16_COMPUTE = Tolerance(
    0.05, "float16 compute (Core ML's precision) of float16 weights: every activation rounded "
    "to fp16 (logits of std ~1)"
)
#: Greedy tokens of two code paths agree only where no step is a near-tie: a top-2 margin under
#: this many logits may flip on a GPU's other summation order (both choices are then right).
NEAR_TIE = Tolerance(0.0, "a CPU's summation order is fixed: tokens must be identical",
                     gpu=1e-3)
RUNTIME_MATRIX = Tolerance(
    2e-3, "float32 weights through every runtime of the benchmark matrix over a 64-token greedy "
    "decode on any model it runs (the real 30-layer smollm2 too): BLAS order and each runtime's "
    "own RoPE and softmax kernels; llama.cpp's F32 path keeps its own bound"
)


@dataclass(frozen=True)
class SpeedClaim:
    """A claim that one way is faster, with the devices where the hardware makes it physical.

    ``verdict(device, holds)`` is ``holds`` where the claim is asserted and None elsewhere (the
    notebook prints what it measured and asserts nothing): a claim calibrated on a CPU does not
    fail a Mac's run, and a CPU's run still catches a regression.
    """

    why: str
    devices: tuple[str, ...] = ("cpu",)

    def asserted_on(self, device: str) -> bool:
        return device_kind(device) in self.devices

    def verdict(self, device: str, holds: bool) -> bool | None:
        return bool(holds) if self.asserted_on(device) else None


CACHE_SPEEDUP = SpeedClaim(
    "a cached decode step computes one token where the uncached one recomputes the whole prefix: "
    "on a CPU time grows with the tokens; a small model on a GPU is launch-bound at short prompts"
)
PREFILL_SCALES = SpeedClaim(
    "a prefill computes every prompt token: on a CPU its time grows with them, so a longer prompt "
    "or a recomputed shared prefix costs more; a small model on a GPU is launch-bound below a few "
    "hundred tokens, where one more token costs next to nothing"
)
