"""Core ML adapter: the stateful-KV package of ``labkit.export.coreml`` (ladder step "c").

``load`` converts the model folder's Llama once (fp16 weights, K/V as Core ML states; cached under
build/cache/coreml/ keyed by the weights) and opens it with the chosen compute units. The package
takes one query token per call (see ``labkit.export.coreml``: coremltools cannot lower a
flexible-length cache write), so ``prefill`` feeds the prompt token by token and pp is a
token-at-a-time rate; the note beside the numbers says so.

Predictions run only on macOS 15 and later (the package is specification 9: Core ML states):
elsewhere ``available()`` says why and what to install, and the matrix records a skip.
The feeding logic (positions, masks, state reset) lives in :class:`StatefulFeeder`, which takes
any ``predict(feeds, state)``; tests drive it with the very PyTorch module that is converted, so
everything but Core ML's own execution is checked on Linux too. Nothing here has been run on a
Mac in this repository yet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from labkit.runtimes import base
from labkit.runtimes.base import Runtime, file_bytes

#: predict(feeds, state) -> logits (any array-like holding vocab values)
Predict = Callable[[dict[str, np.ndarray], Any], Any]


class StatefulFeeder:
    """Drives a one-token stateful step: token ids in, last logits out, one position at a time.

    ``predict`` gets ``{"input_ids": [1, 1] int32, "position": [1] int32, "mask": [1, 1, 1, S]}``
    (the names ``labkit.export.coreml`` exports) and the state made by ``new_state()``.
    """

    def __init__(self, predict: Predict, new_state: Callable[[], Any], max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.predict, self.new_state, self.max_len = predict, new_state, max_len
        self.state: Any = None
        self.position = 0

    def step(self, token: int) -> np.ndarray:
        """Append ``token`` at the next position; its logits as float32 [vocab]."""
        from labkit.export.coreml import decode_mask

        if self.state is None:
            raise RuntimeError("prefill() first: there is no state to extend")
        if self.position >= self.max_len:
            raise ValueError(
                f"the package holds max_len={self.max_len} positions; position {self.position} "
                "does not fit (export with a larger max_len)"
            )
        feeds = {
            "input_ids": np.array([[token]], np.int32),
            "position": np.array([self.position], np.int32),
            "mask": decode_mask(self.position, self.max_len),
        }
        logits = np.asarray(self.predict(feeds, self.state), dtype=np.float32).reshape(-1)
        self.position += 1
        return logits

    def prefill(self, ids: list[int]) -> np.ndarray:
        """A fresh state (the cache emptied), then ``ids`` one by one; the last logits."""
        if not ids:
            raise ValueError("prefill needs at least one token")
        self.state, self.position = self.new_state(), 0
        for tok in ids:
            logits = self.step(int(tok))
        return logits


class CoreML(Runtime):
    """A converted stateful Core ML package, run by Core ML on ``compute_unit``."""

    name: ClassVar[str] = "coreml"
    dtype: str = "float16"

    def __init__(
        self, threads: int | None = None, compute_unit: str = "CPU_AND_NE", max_len: int | None = None
    ) -> None:
        from labkit.export.coreml import COMPUTE_UNITS

        if compute_unit not in COMPUTE_UNITS:
            raise ValueError(f"compute_unit must be one of {COMPUTE_UNITS}, got {compute_unit!r}")
        self.threads = threads  # Core ML schedules its own threads; kept for the record only
        self.compute_unit = compute_unit
        self.max_len = max_len
        self.device = compute_unit.lower()
        self.note = (
            f"Core ML {compute_unit}, fp16 stateful package (ladder step c); prompt fed one token "
            "per call, so pp is a token-at-a-time rate"
        )
        self.path: Path | None = None
        self.feeder: StatefulFeeder | None = None

    @classmethod
    def available(cls) -> str | None:
        from labkit.core import env

        return env.coreml_reason(env.COREML_STATEFUL_MACOS)  # step c: a stateful package

    def load(self, model_dir: Path) -> None:
        self._check_available()
        import coremltools as ct

        from labkit.export.coreml import convert
        from labkit.models import load

        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        max_len = int(self.max_len or config["max_position_embeddings"])
        out = base.cache_dir() / "coreml" / f"{model_dir.name}-{base.weights_key(model_dir)}-{max_len}"
        self.path = out / "step_c.mlpackage"
        if not self.path.exists():
            convert(load(model_dir, device="cpu").model, ["c"], out, max_len=max_len)
        mlmodel = ct.models.MLModel(
            str(self.path), compute_units=getattr(ct.ComputeUnit, self.compute_unit)
        )
        spec = mlmodel.get_spec().description
        names_in, out_name = {i.name for i in spec.input}, spec.output[0].name
        if names_in != {"input_ids", "position", "mask"}:
            raise RuntimeError(f"{self.path}: inputs {sorted(names_in)}, expected the feeder's "
                               "input_ids, position, mask (re-export the package)")

        def predict(feeds: dict[str, np.ndarray], state: Any) -> Any:
            return mlmodel.predict(feeds, state=state)[out_name]  # fed by name

        self.feeder = StatefulFeeder(predict, mlmodel.make_state, max_len)

    def prefill(self, ids: list[int]) -> np.ndarray:
        assert self.feeder is not None, "load() first"
        return self.feeder.prefill(list(ids))

    def decode_step(self, token: int) -> np.ndarray:
        assert self.feeder is not None, "load() first"
        return self.feeder.step(int(token))

    def model_bytes(self) -> int | None:
        return file_bytes(self.path) if self.path is not None and self.path.exists() else None
