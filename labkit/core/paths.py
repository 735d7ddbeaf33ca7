"""Where the lab's folders live: one place, so notebooks, tests and the CLI agree.

The root is the repository checkout (the folder holding pyproject.toml). ``LABKIT_ROOT``
overrides it, which tests use to write figures and results into a temporary folder;
``LABKIT_OUTPUT_ROOT`` redirects only figures/ and data/results/ (quick runs use build/quick).
Shipped inputs (``data_dir()``: models, configs, data sets) always come from the checkout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # labkit/ (this file is labkit/core/paths.py)


def root() -> Path:
    """The lab's root folder (``LABKIT_ROOT`` if set, else the checkout holding labkit)."""
    env = os.environ.get("LABKIT_ROOT")
    if env:
        return Path(env).resolve()
    return _PACKAGE_DIR.parent


def data_dir() -> Path:
    """The shipped inputs (data/models, data/configs, data/rag, ...): always the checkout's.

    Unlike outputs, these do not follow ``LABKIT_ROOT``: a test that isolates its figures and
    results in a temporary folder still reads the same embedded models and data sets.
    """
    return _PACKAGE_DIR.parent / "data"


def models_dir() -> Path:
    """Embedded checkpoints, each an HF folder (config.json, model.safetensors, tokenizer.json)."""
    return data_dir() / "models"


def output_root() -> Path:
    """Where figures and results are written: the root, or ``LABKIT_OUTPUT_ROOT`` when set.

    Quick runs set it to ``build/quick`` so that a smoke run never overwrites the committed,
    full-parameter figures and results.
    """
    env = os.environ.get("LABKIT_OUTPUT_ROOT")
    return Path(env).resolve() if env else root()


def results_dir() -> Path:
    return output_root() / "data" / "results"


def figures_dir() -> Path:
    return output_root() / "figures"


def build_dir() -> Path:
    return root() / "build"


def notebooks_dir() -> Path:
    return root() / "notebooks"


def repo_models_dir() -> Path:
    """The shipped models always live in the checkout, even when LABKIT_ROOT points elsewhere."""
    return _PACKAGE_DIR.parent / "data" / "models"


def cache_dir() -> Path:
    """The lab's cache of derived files shared by every checkout of this user: converted models
    (keyed by their source's hash, so never stale). ``LABKIT_CACHE`` overrides it; otherwise
    ``$XDG_CACHE_HOME/labkit``, ``~/Library/Caches/labkit`` on macOS, ``~/.cache/labkit`` elsewhere.
    """
    env = os.environ.get("LABKIT_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "labkit"
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "labkit"
    return home / ".cache" / "labkit"


def configs_dir() -> Path:
    """data/configs: config.json files of models the lab plans for but never loads (no weights)."""
    return data_dir() / "configs"
