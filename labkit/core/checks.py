"""Argument checks: one wording for "this parameter must be ..." across the lab.

Each check returns the value it accepted (so ``n = positive_int(n, "n")`` reads naturally) and
raises ``ValueError`` (``TypeError`` for a wrong type where the caller asked for it) naming the
owner, the parameter, what was expected and what came. ``bool`` is refused where an integer is
expected: ``True`` is an ``int`` to Python but never a count a user meant.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def _prefix(owner: str | None) -> str:
    return f"{owner}: " if owner else ""


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers count)."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: Any, name: str, owner: str | None = None) -> int:
    """``value`` as an int >= 1, or ValueError."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{_prefix(owner)}{name} must be a positive integer, got {value!r}")
    return int(value)


def nonnegative_int(value: Any, name: str, owner: str | None = None) -> int:
    """``value`` as an int >= 0, or ValueError."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{_prefix(owner)}{name} must be an integer >= 0, got {value!r}")
    return int(value)


def finite_float(
    value: Any,
    name: str,
    owner: str | None = None,
    *,
    positive: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """``value`` as a finite float (optionally > 0, or within [minimum, maximum]), or ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            ok = False
        else:
            ok = math.isfinite(number)
    if not ok:
        raise ValueError(f"{_prefix(owner)}{name} must be a finite number, got {value!r}")
    if positive and not number > 0:
        raise ValueError(f"{_prefix(owner)}{name} must be > 0, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{_prefix(owner)}{name} must be >= {minimum:g}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{_prefix(owner)}{name} must be <= {maximum:g}, got {value!r}")
    return number


def one_of(value: Any, name: str, choices: Iterable[Any], owner: str | None = None) -> Any:
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    allowed = list(choices)
    if value not in allowed:
        listed = ", ".join(repr(c) for c in allowed)
        raise ValueError(f"{_prefix(owner)}{name} must be one of {listed}; got {value!r}")
    return value


def output_path(path: Any, name: str, owner: str | None = None, *, folder: bool = False) -> Path:
    """``path`` as a Path where a file (or, ``folder=True``, a folder) can be written: refuses a
    non-path, an existing entry of the other kind, and a parent that is a file, before anything
    is computed (a writer that fails at its final rename has done all its work for nothing)."""
    if not isinstance(path, str | os.PathLike) or not os.fspath(path):
        raise TypeError(f"{_prefix(owner)}{name} must be a path, got {path!r}")
    out = Path(path)
    if not folder and out.is_dir():
        raise ValueError(f"{_prefix(owner)}{name} {str(out)!r} is a folder; give a file path")
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"{_prefix(owner)}{name} {str(out)!r} is a file; give a folder path")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{_prefix(owner)}{name} {str(out)!r}: {str(parent)!r} is a file, "
                         f"not a folder")
    return out


def option(check: Callable[..., Any], convert: Callable[[str], Any] = int,
           **kwargs: Any) -> Callable[[str], Any]:
    """An argparse ``type=``: the text converted (int by default), then ``check``ed, so
    ``--jobs 0`` or ``--timeout -5`` stops at parsing with the check's own words, e.g.
    ``type=option(positive_int)``, ``type=option(finite_float, float, positive=True)``."""
    import argparse

    words = {int: "an integer", float: "a number"}.get(convert, convert.__name__)

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
        try:
            return check(value, "the value", **kwargs)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__
    return parse
