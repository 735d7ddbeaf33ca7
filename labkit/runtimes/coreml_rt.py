"""Core ML adapter: predictions need macOS, so on any other system ``available()`` says so.

On macOS it needs coremltools and the lab's Core ML exporter (``labkit.export.coreml``, the Core
ML issue's work); until that module exists, ``available()`` names it as missing rather than
pretending. Nothing here has been run on a Mac in this repository.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path
from typing import ClassVar

import numpy as np

from labkit.runtimes.base import Runtime


class CoreML(Runtime):
    name: ClassVar[str] = "coreml"

    @classmethod
    def available(cls) -> str | None:
        if platform.system() != "Darwin":
            return f"needs macOS (Core ML predictions run only on macOS; this is {platform.system()})"
        if importlib.util.find_spec("coremltools") is None:
            return "coremltools not installed: pip install 'labkit[coreml]'"
        if importlib.util.find_spec("labkit.export.coreml") is None:
            return "labkit.export.coreml (the Core ML exporter) is not in this checkout yet"
        return "the Core ML stateful-KV adapter is not written yet (labkit.runtimes.coreml_rt)"

    def load(self, model_dir: Path) -> None:
        self._check_available()

    def prefill(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError(self.available())

    def decode_step(self, token: int) -> np.ndarray:
        raise NotImplementedError(self.available())
