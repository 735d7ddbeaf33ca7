"""Argument checks: one wording for "this parameter must be ..." across the lab.

Each check returns the value it accepted (so ``n = positive_int(n, "n")`` reads naturally) and
raises ``ValueError`` (``TypeError`` for a wrong type where the caller asked for it) naming the
owner, the parameter, what was expected and what came. ``bool`` is refused where an integer is
expected: ``True`` is an ``int`` to Python but never a count a user meant.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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
