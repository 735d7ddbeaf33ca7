"""The Swift port (swift/, its ``lmport`` CLI) through ``labkit.ports.swift``.

The CLI is a process per generation, not a library: it cannot be stepped token by token from
Python. So this adapter overrides ``timed_generate`` with the CLI's own in-process timers
(``prefill_s``, ``decode_s``: process start and weight loading excluded), and ``prefill`` /
``decode_step`` replay the whole history through the CLI (correct logits, meaningless time:
the matrix never times them). A folder of one model.safetensors in F32, F16 or BF16 is read as it
is (the CLI computes in float32 and widens on load: a 7B fp16 folder needs no 27 GB copy); any
other layout is converted to float32 once (build/cache/swift/).

Threads: ``threads`` caps the BLAS (OpenBLAS on Linux; Accelerate on macOS through
VECLIB_MAXIMUM_THREADS, see ``swift.blas_thread_env``); the note beside the numbers says which
and how. ``cli_peak_rss_bytes`` is the CLI process's own peak RSS (``os.wait4``), the one the
matrix reports (``runtime_benchmark.peak_rss``): ``RUSAGE_CHILDREN`` also holds the ``swift build``
that ``load`` ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from labkit.runtimes import base
from labkit.runtimes.base import GenerationRun, Runtime, file_bytes


class SwiftPort(Runtime):
    """The lab's Swift Llama (OpenBLAS on Linux, Accelerate on macOS), float32 weights."""

    name: ClassVar[str] = "swift"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.device = "cpu"
        self.history: list[int] = []
        self.cli_peak_rss_bytes: int | None = None

    @classmethod
    def available(cls) -> str | None:
        from labkit.ports import swift as swiftport

        return swiftport.available()

    def load(self, model_dir: Path) -> None:
        from labkit.ports import swift as swiftport

        self._check_available()
        model_dir = Path(model_dir)
        if swiftport.reads_as_stored(model_dir):  # the CLI widens F16/BF16 to float32 itself
            self.dir = model_dir
        else:
            self.dir = base.cache_dir() / "swift" / f"{model_dir.name}-{base.weights_key(model_dir)}-float32"
            if not (self.dir / "model.safetensors").is_file():
                swiftport.convert_weights(model_dir, self.dir, "float32")
        swiftport.build(release=True)
        self.note = ""

    def _generate(self, ids: list[int], n_new: int, logits: bool):
        from labkit.ports import swift as swiftport

        return swiftport.run(self.dir, ids, n_new, dump=True if logits else None, threads=self.threads)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.history = list(ids)
        return self._generate(self.history, 1, True).logits[0]

    def decode_step(self, token: int) -> np.ndarray:
        self.history.append(int(token))
        return self._generate(self.history, 1, True).logits[0]

    def timed_generate(self, prompt: list[int], n_new: int, keep_logits: bool = False) -> GenerationRun:
        r = self._generate(list(prompt), n_new, keep_logits)
        self.cli_peak_rss_bytes = max(self.cli_peak_rss_bytes or 0, r.peak_rss_bytes or 0) or None
        self.note = f"BLAS: {r.blas}" + (f" ({r.note})" if r.note else "")  # recorded: no numbers
        steps = max(len(r.tokens) - 1, 1)
        per_step = r.decode_s / steps  # the CLI reports the total; spread evenly
        kept = [np.asarray(x, dtype=np.float32) for x in r.logits] if keep_logits else []
        return GenerationRun(r.prefill_s, [per_step] * steps, list(r.tokens)[:n_new], kept)

    def model_bytes(self) -> int | None:
        return file_bytes(self.dir / "model.safetensors")
