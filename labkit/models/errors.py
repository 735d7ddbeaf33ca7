"""The one error type for a model that cannot be loaded.

``ModelLoadError`` subclasses ``ValueError`` so callers that already catch bad values keep
working, and every message names the file (or folder, or name) and what was expected, so a user
can fix the input without reading our code.
"""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(ValueError):
    """A model folder, config, checkpoint, tokenizer or name that cannot be loaded."""

    def __init__(self, source: str | Path, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")
