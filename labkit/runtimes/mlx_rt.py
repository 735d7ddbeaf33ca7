"""MLX adapter: mlx-lm's Llama reading the HF folder, weights cast to float32.

On Linux, MLX (the ``mlx[cpu]`` wheel) runs on the CPU only, with a reference BLAS that uses one
thread (a 1024x1024 matmul: about 600 ms vs 27 ms in torch on this machine, per issue 10): its
numbers here say nothing about MLX on Apple silicon, where the same code runs on the GPU. The
note travels with every record.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from labkit.runtimes.base import Runtime


class MlxRuntime(Runtime):
    """mlx-lm's model and prompt cache; float32 so the parity column compares like with like."""

    name: ClassVar[str] = "mlx"

    def __init__(self, dtype: str = "float32", threads: int | None = None) -> None:
        self.dtype = dtype
        self.threads = threads
        on_mac = platform.system() == "Darwin" and platform.machine() == "arm64"
        self.device = "gpu" if on_mac else "cpu"
        self.note = "" if on_mac else "Linux: MLX on the CPU with a single-threaded reference BLAS"

    @classmethod
    def rounds_here(cls, rounds: int) -> int:
        """One process off Apple silicon: the CPU backend's reference BLAS (163-198 s a process
        in 08's matrix on the lab's box, 38 % of a round) measures nothing about MLX on Metal;
        its parity and one speed row are what it adds there."""
        on_mac = platform.system() == "Darwin" and platform.machine() == "arm64"
        return rounds if on_mac else min(rounds, 1)

    @classmethod
    def available(cls) -> str | None:
        for mod, pip in (("mlx", "mlx"), ("mlx_lm", "mlx-lm")):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} not installed: pip install {pip}"
        return None

    def load(self, model_dir: Path) -> None:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        self._check_available()
        if self.device == "cpu":
            mx.set_default_device(mx.cpu)
        self.model, _ = load_model(Path(model_dir))
        self.model.set_dtype(getattr(mx, self.dtype))
        mx.eval(self.model.parameters())
        self.cache: Any = None

    def _run(self, ids: list[int]) -> np.ndarray:
        import mlx.core as mx

        logits = self.model(mx.array([ids]), cache=self.cache)[0, -1]
        mx.eval(logits)
        return np.array(logits.astype(mx.float32))

    def prefill(self, ids: list[int]) -> np.ndarray:
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        return self._run(ids)

    def decode_step(self, token: int) -> np.ndarray:
        return self._run([token])

    def model_bytes(self) -> int | None:
        from mlx.utils import tree_flatten

        return int(sum(v.nbytes for _, v in tree_flatten(self.model.parameters())))
