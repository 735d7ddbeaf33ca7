"""ONNX Runtime adapter: the model exported by ``labkit.export.onnx`` (float32), CPU provider.

The KV cache lives outside the graph: each call feeds the previous call's ``present.*`` back as
``past.*`` and a mask one position longer. The export is cached under build/cache/onnx/ keyed by
the weights' size and mtime, so only the first run pays for it (about 1-2 minutes here).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from labkit.runtimes import base
from labkit.runtimes.base import Runtime, file_bytes


class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU execution provider on the exported graph."""

    name: ClassVar[str] = "onnxruntime"

    def __init__(self, device: str = "cpu", threads: int | None = None) -> None:
        self.device = device
        self.threads = threads

    @classmethod
    def available(cls) -> str | None:
        missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{' and '.join(missing)} not installed: pip install 'labkit[onnx]'"
        return None

    def load(self, model_dir: Path) -> None:
        import onnxruntime as ort

        from labkit.export.onnx import export_onnx, io_names, load_for_export

        self._check_available()
        model_dir = Path(model_dir)
        self.path = base.cache_dir() / "onnx" / f"{model_dir.name}-{base.weights_key(model_dir)}.onnx"
        if not self.path.is_file():
            export_onnx(load_for_export(model_dir), self.path)
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        cfg = __import__("json").loads((model_dir / "config.json").read_text())
        self.n_layers = int(cfg["num_hidden_layers"])
        self.kv_shape = (1, int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]), 0,
                         int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]))
        self.inputs, self.outputs = io_names(self.n_layers)
        self.past: list[Any] = []

    def _run(self, ids: list[int]) -> np.ndarray:
        past_len = self.past[0].shape[2]
        feed = {"input_ids": np.asarray([ids], dtype=np.int64),
                "attention_mask": np.ones((1, past_len + len(ids)), dtype=np.int64)}
        feed.update(zip(self.inputs[2:], self.past, strict=True))
        logits, *self.past = self.session.run(None, feed)
        return logits[0, -1]

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.past = [np.zeros(self.kv_shape, dtype=np.float32) for _ in range(2 * self.n_layers)]
        return self._run(ids)

    def decode_step(self, token: int) -> np.ndarray:
        return self._run([token])

    def model_bytes(self) -> int | None:
        return file_bytes(self.path)
