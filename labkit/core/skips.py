"""Say plainly when part of a study cannot run here, and carry that into the run's summary.

A notebook calls ``skip("Core ML prediction", "needs macOS")`` instead of silently leaving a
cell empty. The line is printed in the notebook ("skipped: Core ML prediction: needs macOS")
and appended to ``build/skips/<notebook>.jsonl``, which ``labkit reproduce`` reads back into
its summary, so a reader of either sees what was not measured and why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from labkit.core import paths


def _skips_file(notebook: str) -> Path:
    return paths.build_dir() / "skips" / f"{notebook}.jsonl"


def skip(part: str, reason: str) -> str:
    """Report that ``part`` was not run here because of ``reason``; returns the printed line."""
    if not part or not reason:
        raise ValueError("skip() needs both the part that was skipped and the reason")
    line = f"skipped: {part}: {reason}"
    print(line)
    notebook = os.environ.get("LABKIT_NOTEBOOK")
    if notebook:
        path = _skips_file(notebook)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:  # one short line per call: append is atomic enough here
            fh.write(json.dumps({"part": part, "reason": reason}) + "\n")
    return line


def read_skips(notebook: str) -> list[dict]:
    """The skips a notebook reported in its last run (empty when none)."""
    path = _skips_file(notebook)
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def clear_skips(notebook: str) -> None:
    _skips_file(notebook).unlink(missing_ok=True)
