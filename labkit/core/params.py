"""Notebook parameters, checked against the defaults of the notebook's ``parameters`` cell.

Why: papermill passes ``-p QUICK no`` as the string "no", which is truthy, so a quick run was
recorded as a full one; ``-p MAX_BUFFER_MB 64MB`` failed cells later with "'<=' not supported
between 'int' and 'str'"; a misspelt name is only a warning in papermill's log. The defaults
already say what each parameter is, so a value is held to its default (the rules, also in
ARCHITECTURE.md's notebook contract):

* its type: ``bool`` for a bool default (True/False, never "no"), ``int`` for an int (not a
  bool), a finite ``int`` or ``float`` for a float, ``str``, ``list`` (or tuple; each element of
  the type the default's elements share), ``dict``; a ``None`` default takes anything;
* ``None`` is taken for any parameter whose comment mentions ``None`` ("None = torch's default");
* a comment listing values as ``a | b | c`` names the only values allowed (each element, for a
  list), provided the default is one of them;
* a name the cell does not define is refused: it would change nothing.

Two places check, with the same rules: ``labkit reproduce`` before it starts a notebook
(:func:`check_values` on quick.yml's and models.yml's values: a bad one fails that notebook,
nothing runs, nothing is recorded), and the notebook itself, for papermill's own ``-p``, in the
cell after the parameters cell::

    from labkit.core.params import check_parameters
    check_parameters(globals())

:func:`check_parameters` reads the kernel's input history (``In``): papermill runs the
parameters cell, then the cell it injected (its first line is ``# Parameters``), then this one,
so both the defaults and what was passed are there as source, and no notebook needs a ``def``.
Run by hand in Jupyter (nothing injected) it checks nothing and returns ``{}``.
"""

from __future__ import annotations

import ast
import io
import math
import re
import tokenize
from dataclasses import dataclass
from typing import Any

#: ``a | b | c`` in a parameter's comment: the values it may take
_CHOICES = re.compile(r"(?<![\w.\-])([\w.\-]+(?:[ \t]*\|[ \t]*[\w.\-]+)+)")
_MENTIONS_NONE = re.compile(r"\bNone\b")
#: the first line of the cell papermill injects (papermill.parameterize: comment "Parameters")
INJECTED_HEADER = "# Parameters"


@dataclass(frozen=True)
class Param:
    """One parameter of a parameters cell: its default and what its comment allows."""

    name: str
    default: Any
    choices: tuple[str, ...] | None = None
    none_ok: bool = False


def _comments(source: str) -> dict[int, str]:
    """Line number -> the comment on that line."""
    found: dict[int, str] = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                found[tok.start[0]] = tok.string.lstrip("#").strip()
    except (tokenize.TokenError, IndentationError):
        pass
    return found


def _targets(node: ast.Assign) -> list[tuple[str, ast.expr]]:
    """(name, value) pairs of ``A = 1`` and ``A, B = 1, 2``; [] for anything else."""
    if len(node.targets) != 1:
        return []
    target, value = node.targets[0], node.value
    if isinstance(target, ast.Name):
        return [(target.id, value)]
    if (isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
            and len(target.elts) == len(value.elts)
            and all(isinstance(t, ast.Name) for t in target.elts)):
        return [(t.id, v) for t, v in zip(target.elts, value.elts, strict=True)]
    return []


def _assignments(source: str, *, strict: bool) -> list[tuple[ast.Assign, list]] | None:
    """The cell's assignments with their (name, value) pairs; None when it does not parse, or
    (``strict``: papermill's injected cell) holds anything but assignments."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return None
    if strict and (not body or not all(isinstance(node, ast.Assign) for node in body)):
        return None
    return [(node, _targets(node)) for node in body if isinstance(node, ast.Assign)]


def _choices(comment: str, default: Any) -> tuple[str, ...] | None:
    """The ``a | b | c`` list of a comment, if the default (each of its elements) is in it."""
    match = _CHOICES.search(comment)
    if match is None:
        return None
    choices = tuple(c.strip() for c in match.group(1).split("|"))
    values = default if isinstance(default, list | tuple) else [default]
    return choices if values and all(v in choices for v in values) else None


def parse(source: str, *, unpack: bool = True) -> dict[str, Param]:
    """The parameters a parameters cell defines: each name bound to a literal (``A = 1``, and
    with ``unpack`` also ``A, B = 1, 2``), with its comment's allowed values. Names bound to
    anything else, and other statements, are left out (they are computed, not passed)."""
    nodes = _assignments(source, strict=False)
    if nodes is None:
        return {}
    comments = _comments(source)
    out: dict[str, Param] = {}
    for node, pairs in nodes:
        if len(pairs) > 1 and not unpack:
            continue
        comment = " ".join(comments.get(n, "") for n in range(node.lineno, node.end_lineno + 1))
        for name, value in pairs:
            try:
                default = ast.literal_eval(value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            out[name] = Param(name, default, _choices(comment, default),
                              bool(_MENTIONS_NONE.search(comment)))
    return out


def defaults(source: str, *, unpack: bool = True) -> dict[str, Any]:
    """{name: default} of a parameters cell (see :func:`parse`)."""
    return {name: p.default for name, p in parse(source, unpack=unpack).items()}


# --------------------------------------------------------------------------- the rules


def _kind(default: Any) -> str | None:
    """The kind a value must have for this default (None: any)."""
    if default is None:
        return None
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "str"
    if isinstance(default, list | tuple):
        return "list"
    if isinstance(default, dict):
        return "dict"
    return None


_KIND_WORDS = {"bool": "a bool (True or False)", "int": "an int", "float": "a number",
               "str": "a str", "list": "a list", "dict": "a dict"}


def _has_kind(value: Any, kind: str | None) -> bool:
    if kind is None:
        return True
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "list":
        return isinstance(value, list | tuple)
    return isinstance(value, {"str": str, "dict": dict}[kind])


def _element_kind(default: list | tuple) -> str | None:
    """The kind every element must have: the one the default's elements share (ints and floats
    together: numbers), or None for an empty or mixed default."""
    kinds = {_kind(v) for v in default}
    if kinds == {"int", "float"}:
        return "float"
    return kinds.pop() if len(kinds) == 1 else None


def _check_one(p: Param, value: Any, where: str) -> None:
    """TypeError or ValueError naming the parameter, its value and what was expected."""
    if value is None and p.none_ok:
        return
    kind = _kind(p.default)
    shown = f"parameter {p.name} = {value!r} ({type(value).__name__})"
    if not _has_kind(value, kind):
        raise TypeError(f"{shown}: expected {_KIND_WORDS[kind]} like its default "
                        f"{p.default!r}{where}")
    if kind == "float" and not math.isfinite(value):
        raise ValueError(f"{shown}: expected a finite number{where}")
    elements = list(value) if kind == "list" else [value]
    element_kind = _element_kind(p.default) if kind == "list" else kind
    for i, element in enumerate(elements):
        at = f": element {i} {element!r}" if kind == "list" else ""
        if kind == "list" and not _has_kind(element, element_kind):
            raise TypeError(f"{shown}{at} ({type(element).__name__}): expected "
                            f"{_KIND_WORDS[element_kind]} like the default's elements "
                            f"{p.default!r}{where}")
        if p.choices is not None and element not in p.choices:
            listed = ", ".join(repr(c) for c in p.choices)
            raise ValueError(f"{shown}{at}: expected one of {listed} (the values its comment "
                             f"in the parameters cell names){where}")


def check_values(spec: dict[str, Param], values: dict[str, Any], where: str = "") -> None:
    """Every value of ``values`` held to its parameter in ``spec`` (see the module docstring);
    ``where`` names the notebook in the messages."""
    suffix = f" ({where})" if where else ""
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]} = {values[unknown[0]]!r}: the "
                         f"parameters cell defines {', '.join(spec) or 'none'}{suffix}")
    for name, value in values.items():
        _check_one(spec[name], value, suffix)


def _history(namespace: dict[str, Any]) -> list[str]:
    history = namespace.get("In") or namespace.get("_ih") or []
    return [h for h in history if isinstance(h, str)]


def check_parameters(namespace: dict[str, Any]) -> dict[str, Any]:
    """In a notebook, after the parameters cell: the values papermill injected, checked against
    the parameters cell's defaults; returns them ({} when nothing was injected).

    ``namespace`` is the notebook's ``globals()``: the input history ``In`` gives the two cells'
    sources and the namespace the injected values as the kernel evaluated them.
    """
    history = _history(namespace)
    for i in range(1, len(history) - 1):
        cell = history[i]
        if cell.lstrip().split("\n", 1)[0].strip() != INJECTED_HEADER:
            continue
        nodes = _assignments(cell, strict=True)
        if nodes is None:
            continue
        spec = parse(history[i - 1])
        names = [name for _, pairs in nodes for name, _ in pairs]
        values = {name: namespace[name] for name in names if name in namespace}
        check_values(spec, values, "papermill's parameters against the parameters cell")
        return values
    return {}
