"""The layout's rules, checked: imports point down, notebooks orchestrate, functions stay short.

ARCHITECTURE.md states the rules; this file is what keeps them true:

* every ``labkit`` module imports only from layers below its own (core <- models <- inference,
  train <- quant <- export, ports <- runtimes <- studies <- lab), or from its own package; a
  study never imports another study;
* every notebook has its study module (``NN_slug.ipynb`` -> ``labkit/studies/slug.py``), no
  ``def`` or ``class``, no code cell over 25 lines, at most 150 code lines, and reader-facing
  text without issue numbers;
* no function in labkit runs over 80 lines;
* ``import labkit`` and the light modules (paths, files, checks, tolerances, config, sizes, the
  CLI's parser) load no heavy library.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "labkit"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

#: A layer may import the layers with a lower rank (and its own package).
RANK = {"core": 0, "models": 1, "inference": 2, "train": 2, "quant": 3, "export": 4, "ports": 4,
        "runtimes": 5, "studies": 6, "lab": 7}
MAX_FUNCTION_LINES = 80
MAX_CELL_LINES = 25
MAX_NOTEBOOK_LINES = 150


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imported(node: ast.AST) -> list[str]:
    """Dotted labkit modules (or module.name) an import statement names."""
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        base = node.module.split(".")
        if base[0] != "labkit":
            return []
        if len(base) <= 2:  # "from labkit.pkg import x": x may be a module of pkg
            return [".".join([*base, a.name]) for a in node.names]
        return [node.module]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "labkit"]
    return []


def _violations(path: Path) -> list[str]:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if len(parts) < 2 or parts[0] not in RANK:
        return []
    layer = parts[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        for name in _imported(node):
            q = name.split(".")
            if len(q) < 2 or q[1] not in RANK:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
            if q[1] == layer:
                sibling = len(q) > 2 and (PACKAGE / "studies" / f"{q[2]}.py").is_file()
                if layer == "studies" and sibling and q[2] != parts[1]:
                    found.append(f"{where} (a study never imports another study)")
            elif RANK[q[1]] >= RANK[layer]:
                found.append(f"{where} ({layer} may import only layers below it)")
    return found


def test_imports_point_down() -> None:
    bad = [v for path in _modules() for v in _violations(path)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    fake = PACKAGE / "models" / "_probe_upward.py"
    fake.write_text("def f():\n    from labkit.studies import kv_cache\n")
    try:
        assert _violations(fake), "an import from models/ into studies/ must be reported"
    finally:
        fake.unlink()


def test_every_layer_folder_exists_and_says_what_it_is() -> None:
    for layer in RANK:
        init = PACKAGE / layer / "__init__.py"
        assert init.is_file(), f"labkit/{layer}/ is a layer of ARCHITECTURE.md"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring"
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    assert top == ["__init__.py", "__main__.py"], f"modules at the package root: {top}"


def _functions(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_over_80_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {name} ({n} lines)"
            for p in _modules() for name, n in _functions(p) if n > MAX_FUNCTION_LINES]
    assert not long, "split these into functions of one idea each:\n" + "\n".join(long)


def _cells(path: Path, kind: str) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c.get("source", [])) for c in nb["cells"] if c["cell_type"] == kind]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_orchestrates(path: Path) -> None:
    code = _cells(path, "code")
    lines = [len(src.splitlines()) for src in code]
    defs = [ln.strip() for src in code for ln in src.splitlines()
            if ln.lstrip().startswith(("def ", "class ", "async def "))]
    assert not defs, f"{path.name}: def/class belong in its study module: {defs}"
    assert max(lines) <= MAX_CELL_LINES, f"{path.name}: a code cell of {max(lines)} lines"
    assert sum(lines) <= MAX_NOTEBOOK_LINES, f"{path.name}: {sum(lines)} code lines"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_its_study_module(path: Path) -> None:
    slug = path.stem.split("_", 1)[1]
    assert (PACKAGE / "studies" / f"{slug}.py").is_file(), f"{path.name}: no labkit/studies/{slug}.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_reader_facing_text_has_no_issue_numbers(path: Path) -> None:
    text = "\n".join(_cells(path, "markdown") + _cells(path, "code"))
    # the lab's own issues ("issue 7", "the issue's target"); upstream citations carry their
    # repository and a '#' ("gpustack issue #1375") and stay
    found = re.findall(r"(?i)\bissues?\s+\d+\b|the issue's", text)
    assert not found, f"{path.name}: speak of the study, not of issues: {found}"


def test_import_labkit_is_light() -> None:
    code = ("import sys, labkit, labkit.core.paths, labkit.core.files, labkit.core.checks, "
            "labkit.core.tolerances, labkit.models.config, labkit.models.sizes, labkit.lab.cli\n"
            "heavy = [m for m in ('torch', 'transformers', 'pandas', 'matplotlib', 'coremltools')"
            " if m in sys.modules]\nprint(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"light imports pulled in: {out.stdout.strip()}"
