"""PyTorch adapters: eager (labkit's Llama + the fast decode loop), torch.compile, and CUDA.

* ``torch-eager``: prefill is labkit's readable ``Llama`` writing a preallocated ``KVCache``;
  each decode step is ``labkit.inference.fast_decode.FastDecoder.step`` (same math, fused q/k/v and gate/up, no module
  dispatch), i.e. what a careful eager loop costs, not the slowest one could write.
* ``torch-compile``: the same two functions through ``torch.compile`` (inductor). The decode
  step is written with static shapes (:class:`StaticStep`): it attends over the whole
  preallocated cache with a mask, the position is a tensor, so one graph serves every position
  (a Python-int position would recompile per token). Prefill is compiled with dynamic shapes,
  one graph for every prompt length; warm-up runs pay for compilation, never the timed ones.
* ``torch-fast``: the eager adapter with every lever of the fast decode loop (``[in, out]``
  weights, matrix-product attention for the one new query): the top of study 12's ladder.
* ``torch-cuda``: the eager adapter on ``cuda`` (available() says why not when there is none).

The reference of the parity column is ``torch-eager`` in float32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from labkit.runtimes.base import Runtime


class TorchEager(Runtime):
    """labkit's Llama in eager PyTorch (float32 unless ``dtype`` says otherwise)."""

    name: ClassVar[str] = "torch-eager"
    #: FastDecoder options of the decode step (a subclass turns levers on)
    levers: ClassVar[dict] = {}

    def __init__(self, device: str = "cpu", dtype: str = "float32", threads: int | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self.model: Any = None

    @classmethod
    def available(cls) -> str | None:
        import importlib.util

        return None if importlib.util.find_spec("torch") else "torch not installed"

    def load(self, model_dir: Path) -> None:
        import torch

        from labkit.inference.fast_decode import FastDecoder
        from labkit.inference.kv_cache import KVCache
        from labkit.models import load

        self._check_available()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        loaded = load(Path(model_dir), device=self.device, dtype=self.dtype)
        self.model = loaded.model
        self.cache = KVCache.for_model(self.model, max_len=self.model.config.max_position_embeddings)
        self.decoder = FastDecoder(self.model, **self.levers)
        self._prefill = self.model  # TorchCompile swaps in the compiled forward
        self._sync = _sync_for(self.device)

    def _logits(self, t: Any) -> np.ndarray:
        self._sync()
        return t.float().cpu().numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            self.cache.reset()
            x = torch.tensor([ids], device=self.device)
            return self._logits(self._prefill(x, cache=self.cache)[0, -1])

    def decode_step(self, token: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.tensor([token], device=self.device)
            return self._logits(self.decoder.step(x, self.cache)[0])

    def model_bytes(self) -> int | None:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def _sync_for(device: str):
    from labkit.core.timing import device_sync

    return device_sync(device)


class TorchCuda(TorchEager):
    """The eager adapter on a CUDA GPU (float32 by default; pass dtype="float16" for half)."""

    name: ClassVar[str] = "torch-cuda"

    def __init__(self, device: str = "cuda", dtype: str = "float32", threads: int | None = None) -> None:
        super().__init__(device=device, dtype=dtype, threads=threads)

    @classmethod
    def available(cls) -> str | None:
        reason = TorchEager.available()
        if reason:
            return reason
        import torch

        if not torch.cuda.is_available():
            return f"no CUDA device (torch {torch.__version__}; run on a GPU machine)"
        return None


class TorchFast(TorchEager):
    """torch-eager with every lever of the fast decode loop on (study 12's top rung)."""

    name: ClassVar[str] = "torch-fast"
    levers: ClassVar[dict] = {"fuse": True, "transpose": True, "attention": "matmul"}
    note = "FastDecoder with [in, out] weights and matmul attention"


class StaticStep:
    """The FastDecoder's static-shape step over this runtime's KV cache (``static_step``: all
    ``max_len`` slots, masked beyond a 0-d position tensor), the callable torch.compile gets."""

    def __init__(self, decoder: Any, cache: Any) -> None:
        self.d = decoder
        self.cache = cache

    def __call__(self, token: Any, pos: Any) -> Any:
        return self.d.static_step(token, pos, self.cache)


class TorchCompile(TorchEager):
    """torch.compile (inductor) of the prefill forward and of a static-shape decode step."""

    name: ClassVar[str] = "torch-compile"
    note = "inductor; first calls per shape compile (warm-up, untimed)"

    @classmethod
    def available(cls) -> str | None:
        return super().available() or macos_openmp_missing()

    def load(self, model_dir: Path) -> None:
        import os

        import torch

        from labkit.runtimes.base import cache_dir

        # A private inductor cache: the shared /tmp one can hold a half-written kernel from a
        # killed run ("file too short"), which breaks every later compile that hits it.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        super().load(model_dir)
        self._prefill = torch.compile(self.model, dynamic=True)
        self._step = torch.compile(StaticStep(self.decoder, self.cache))

    def decode_step(self, token: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pos = torch.tensor(self.cache.length, device=self.device)
            x = torch.tensor([token], device=self.device)
            out = self._step(x, pos)
            self.cache.advance(1)
            return self._logits(out[0])


#: where inductor finds omp.h on macOS (torch/_inductor/cpp_builder.py, in its order)
_BREW_LIBOMP = ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp")


def macos_openmp_missing(environ: dict[str, str] | None = None, system: str | None = None) -> str | None:
    """On macOS, why torch.compile's C++ kernels cannot build, else None (elsewhere: None).

    Inductor compiles its CPU kernels with OpenMP; Apple's clang has no ``omp.h``, so it looks
    in $OMP_PREFIX, then conda's llvm-openmp ($CONDA_PREFIX), then Homebrew's libomp. Without
    one every compile fails with "CppCompileError: 'omp.h' file not found", which says nothing
    about the fix.
    """
    import os
    import platform

    environ = os.environ if environ is None else environ
    if (system or platform.system()) != "Darwin":
        return None
    if environ.get("CXX") and "clang" not in Path(environ["CXX"]).name:
        return None  # another compiler (e.g. Homebrew's g++) brings its own OpenMP
    prefixes = [environ.get("OMP_PREFIX"), environ.get("CONDA_PREFIX"), *_BREW_LIBOMP]
    if any(p and (Path(p) / "include" / "omp.h").is_file() for p in prefixes):
        return None
    return ("torch.compile needs OpenMP's omp.h on macOS (Apple clang has none): brew install libomp "
            "(or conda install llvm-openmp, or set OMP_PREFIX)")
