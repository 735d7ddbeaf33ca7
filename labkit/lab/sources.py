"""What a site was built from, and whether it still matches: ``site-sources.json``.

The published site (``docs/``, what a static host such as GitHub Pages serves) is committed, so
a reader of the repository sees every notebook with its outputs. A committed site can go stale,
or be built from a run nobody could repeat; so every build records the sha256 of each file it
read (the notebooks' sources, the executed notebooks, which it also copies into the site, the
results files and the figures) beside the run's summary, and :func:`verify` checks a site
against the checkout: every source unchanged, nothing added since, every executed notebook made
from the committed source. :func:`publish_problems` says why a run may not be published (quick
parameters, a failed or missing notebook, uncommitted notebooks or code).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labkit.core import paths
from labkit.core.files import atomic_write_json, sha256_file

SOURCES_FILE = "site-sources.json"
INJECTED = "injected-parameters"  # papermill's tag on the cell it adds


@dataclass(frozen=True)
class Source:
    """One file the site was built from. ``path`` is relative to the lab root; ``copy`` is where
    the site holds a copy (executed notebooks, figures), relative to the site."""

    role: str  # "notebook", "executed", "results" or "figure"
    path: str
    sha256: str
    copy: str | None = None
    source: str | None = None  # for an executed notebook: the notebook it was run from


def relative(path: Path) -> str:
    """``path`` relative to the lab root (POSIX), or absolute when it lies outside it."""
    try:
        return Path(path).resolve().relative_to(paths.root().resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def source(role: str, path: Path, copy: str | None = None, of: Path | None = None) -> Source:
    return Source(role, relative(path), sha256_file(path), copy, relative(of) if of else None)


def run_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The parts of build/reproduce-summary.json a reader of the site needs."""
    return {
        "quick": summary.get("quick"),
        "finished": summary.get("finished"),
        "machine": summary.get("machine"),
        "notebooks": [{k: n.get(k) for k in ("name", "status", "seconds")}
                      for n in summary.get("notebooks", [])],
    }


def write(site: Path, sources: list[Source], summary: dict[str, Any]) -> Path:
    out = site / SOURCES_FILE
    atomic_write_json(out, {
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run_summary(summary),
        "sources": [asdict(s) for s in sorted(sources, key=lambda s: (s.role, s.path))],
    }, indent=1)
    return out


def cells_of(nb: Any) -> list[tuple[str, str]]:
    """(type, source) of every cell but papermill's injected parameters: what was run."""
    return [(c.cell_type, c.source) for c in nb.cells
            if INJECTED not in c.get("metadata", {}).get("tags", [])]


def made_from(executed: Path, notebook: Path) -> bool:
    """True when the executed notebook holds exactly the cells of ``notebook``."""
    import nbformat

    return cells_of(nbformat.read(executed, as_version=4)) == cells_of(nbformat.read(notebook, as_version=4))


def _results_files(root: Path) -> set[str]:
    results = root / "data" / "results"
    found = set(results.glob("*/*.jsonl")) | set(results.glob("machines/*.json"))
    return {p.relative_to(root).as_posix() for p in found}


def _check_entry(s: Source, site: Path, root: Path) -> list[str]:
    if Path(s.path).is_absolute() or ".." in Path(s.path).parts:
        return [f"{s.path}: built from a file outside the lab's checkout"]
    if s.role == "executed":  # build/ is not committed: check the site's own copy instead
        copy = site / (s.copy or "")
        if not s.copy or not copy.is_file():
            return [f"{s.path}: its copy {s.copy} is missing from the site"]
        if sha256_file(copy) != s.sha256:
            return [f"{s.copy}: differs from the executed notebook the site was built from"]
        if s.source and (root / s.source).is_file() and not made_from(copy, root / s.source):
            return [f"{s.copy}: its cells differ from {s.source} (run from another version)"]
        return []
    target = root / s.path
    if not target.is_file():
        return [f"{s.path}: recorded as a source but not in the checkout"]
    if sha256_file(target) != s.sha256:
        return [f"{s.path}: changed since the site was built (rebuild it)"]
    return []


def verify(site: Path, root: Path | None = None, notebooks: list[Path] | None = None,
           *, require_full: bool = False) -> list[str]:
    """Why ``site`` does not match the checkout at ``root`` (empty: it does).

    ``notebooks``: the lab's notebooks, each of which must be a recorded source (default: every
    ``NN_*.ipynb`` under root/notebooks). ``require_full``: a quick run's site is refused.
    """
    root = root or paths.root()
    path = site / SOURCES_FILE
    if not path.is_file():
        return [f"{path}: missing (the site records what it was built from)"]
    record = json.loads(path.read_text())
    sources = [Source(**s) for s in record["sources"]]
    problems = [p for s in sources for p in _check_entry(s, site, root)]
    if require_full and record["run"].get("quick") is not False:
        problems.append("built from a quick run (or from no run): publish a full run only")
    recorded = {s.path for s in sources}
    wanted = notebooks if notebooks is not None else sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    problems += [f"{relative(p)}: a notebook the site was not built from" for p in wanted
                 if relative(p) not in recorded]
    problems += [f"{p}: results added since the site was built" for p in sorted(_results_files(root) - recorded)]
    return problems


def _git_dirty(root: Path, folders: tuple[str, ...]) -> str | None:
    """The uncommitted changes under ``folders`` (None when clean), or why git could not say."""
    try:
        out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", *folders],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"git status failed: {exc}"
    if out.returncode != 0:
        return f"git status failed: {out.stderr.strip()[:200]}"
    return out.stdout.strip() or None


def publish_problems(summary: dict[str, Any], runs: list[tuple[str, Path, Path]],
                     root: Path | None = None) -> list[str]:
    """Why this run's site may not be published (empty: it may).

    ``runs``: (name, notebook source, executed copy) of every run the lab expects (each notebook,
    and each model of notebooks/models.yml). A published site shows one clean, complete, full run
    of the committed notebooks and code.
    """
    root = root or paths.root()
    if not summary:
        return ["no run summary (build/reproduce-summary.json): run make reproduce first"]
    problems = []
    if summary.get("quick"):
        problems.append("the run used quick parameters: publish a full run (make reproduce)")
    if os.environ.get("LABKIT_OUTPUT_ROOT"):
        problems.append("LABKIT_OUTPUT_ROOT is set: the site must show the committed figures/ and data/results/")
    status = {n["name"]: n["status"] for n in summary.get("notebooks", [])}
    for name, notebook, executed in runs:
        if status.get(name) != "ok":
            problems.append(f"{name}: {status.get(name, 'not run')} in the last run")
        elif not executed.is_file():
            problems.append(f"{name}: no executed copy at {relative(executed)}")
        elif not made_from(executed, notebook):
            problems.append(f"{name}: executed from another version of {relative(notebook)}")
    dirty = _git_dirty(root, ("notebooks", "labkit"))
    if dirty:
        problems.append(f"uncommitted changes to the notebooks or labkit: {dirty.splitlines()[:5]}")
    return problems
