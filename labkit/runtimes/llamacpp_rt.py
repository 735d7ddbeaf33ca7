"""llama.cpp adapter through llama-cpp-python, on GGUF files written by ``labkit.export.gguf``.

One class per file type (F32, F16, Q8_0, Q4_0), each converting the model folder once into
build/cache/gguf/. ``n_batch`` = ``n_ubatch`` = 512 so pp512 runs as one batch, as llama-bench's
default; logits of the last position only (``logits_all=False``), read from ``Llama.scores``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from labkit.runtimes import base
from labkit.runtimes.base import Runtime, file_bytes


def gguf_path(model_dir: Path, file_type: str) -> Path:
    """The cached GGUF file of ``model_dir`` in ``file_type``, written on first use."""
    from labkit.export.gguf import export_gguf

    model_dir = Path(model_dir)
    path = base.cache_dir() / "gguf" / f"{model_dir.name}-{base.weights_key(model_dir)}-{file_type}.gguf"
    if not path.is_file():
        export_gguf(model_dir, path, file_type)
    return path


class LlamaCpp(Runtime):
    """llama.cpp (CPU build of llama-cpp-python) on one GGUF file type."""

    name: ClassVar[str] = "llama.cpp"
    file_type: ClassVar[str] = "F32"

    def __init__(self, threads: int | None = None, n_ctx: int = 1024) -> None:
        self.threads = threads
        self.n_ctx = n_ctx
        self.dtype = self.file_type.lower()
        self.device = "cpu"

    @classmethod
    def available(cls) -> str | None:
        for mod, pip in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")):
            if importlib.util.find_spec(mod) is None:
                return f"{pip} not installed: pip install 'labkit[llamacpp]' (llama-cpp-python builds llama.cpp from source)"
        return None

    def load(self, model_dir: Path) -> None:
        from llama_cpp import Llama

        self._check_available()
        self.path = gguf_path(Path(model_dir), self.file_type)
        kwargs: dict[str, Any] = {}
        if self.threads:
            kwargs.update(n_threads=int(self.threads), n_threads_batch=int(self.threads))
        self.llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=512, n_ubatch=512,
                         logits_all=False, verbose=False, **kwargs)

    def _last_logits(self) -> np.ndarray:
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._last_logits()

    def decode_step(self, token: int) -> np.ndarray:
        self.llm.eval([int(token)])
        return self._last_logits()

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """llama.cpp's token ids for ``text`` (special tokens in the text are not parsed)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))

    def model_bytes(self) -> int | None:
        return file_bytes(self.path)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


class LlamaCppF32(LlamaCpp):
    name: ClassVar[str] = "llama.cpp-f32"
    file_type: ClassVar[str] = "F32"


class LlamaCppF16(LlamaCpp):
    name: ClassVar[str] = "llama.cpp-f16"
    file_type: ClassVar[str] = "F16"


class LlamaCppQ8_0(LlamaCpp):  # noqa: N801 (the ggml type's name)
    name: ClassVar[str] = "llama.cpp-q8_0"
    file_type: ClassVar[str] = "Q8_0"


class LlamaCppQ4_0(LlamaCpp):  # noqa: N801
    name: ClassVar[str] = "llama.cpp-q4_0"
    file_type: ClassVar[str] = "Q4_0"
