"""llama.cpp adapter through llama-cpp-python, on GGUF files written by ``labkit.export.gguf``.

One class per file type (F32, F16, Q8_0, Q4_0), each converting the model folder once into
build/cache/gguf/. ``n_batch`` = ``n_ubatch`` = 512 so pp512 runs as one batch, as llama-bench's
default; logits of the last position only (``logits_all=False``; llama-cpp-python then leaves
``Llama.scores`` empty, so they are read from the context with ``llama_get_logits_ith(ctx, -1)``).

The KV cache: llama.cpp stores K and V in F16 by default, which alone moves the logits by
~1e-2 (measured on tiny-llama: 8.4e-3 max |dlogit| with an F16 cache, 1.3e-5 with F32). The F32
file therefore runs with an F32 cache (``type_k = type_v = GGML_TYPE_F32``): the F32 row is the
"same arithmetic as torch" check. The F16/Q8_0/Q4_0 rows keep llama.cpp's default F16 cache, as
llama-bench and ollama run them; the note on each record says which.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from labkit.runtimes import base
from labkit.runtimes.base import Runtime, file_bytes

GGML_TYPE_F32 = 0  # ggml's enum value for float32 (ggml.h)


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
        self.dtype = {"F32": "float32", "F16": "float16"}.get(self.file_type, self.file_type.lower())
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
        if self.file_type == "F32":
            kwargs.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        self.note = (f"KV cache {'F32' if self.file_type == 'F32' else 'F16 (default)'}; "
                     "weights read into memory (use_mmap=False)")
        # Not mmap (llama.cpp's default): every other runtime here holds its weights in process
        # memory, so llama.cpp does too. Decode streams every weight per token, so it is
        # bandwidth-bound and noisy on a shared VM: on the 2-core build box tiny-llama F32 decoded
        # at 125-180 tok/s (1 thread) from one process to the next, with mmap and without; the
        # cause is not established. Compare runtimes within one run, as the matrix does.
        self.llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=512, n_ubatch=512,
                         logits_all=False, verbose=False, use_mmap=False, **kwargs)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.array(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)), dtype=np.float32)

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
