"""Run every notebook headlessly with papermill: the engine behind `make reproduce` and `make quick`.

Each notebook runs in its own papermill subprocess so that a crash, a hang (``--timeout``) or an
interrupt is contained: the runner carries on with the others, prints a summary, and exits
non-zero if any failed. Executed copies go to ``build/notebooks/``; figures and results are
written by the notebooks themselves through labkit (atomically), so an interrupted run leaves
earlier outputs intact.

Quick parameters live in one file, ``notebooks/quick.yml``: a top-level key per notebook stem
(``01_kv_cache: {PROMPT_LENS: [16, 64]}``). Every quick run also gets ``QUICK=True``.

Each notebook runs once with its own defaults (the embedded tiny-llama) and then once per model
that ``notebooks/models.yml`` lists for it, with ``MODEL`` set: the same study asked again on a
real checkpoint. Such a run is named ``<stem>@<model>`` (its executed copy, its skips, its
summary line), its figures get ``--<model>`` after their names, and quick mode adds the
parameters under ``<stem>@<model>`` in quick.yml to the notebook's own quick ones.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from labkit.core import params as params_mod
from labkit.core import paths
from labkit.core.checks import finite_float, option, positive_int
from labkit.core.files import atomic_write_json, remove_stale_temps, temp_sibling
from labkit.core.skips import clear_skips, read_skips

KERNEL_NAME = "labkit"
#: tqdm.auto's notice, on import in a kernel without ipywidgets, that it falls back to text bars
#: (transformers imports it): noise in every executed notebook, filtered by its message.
IPROGRESS_NOTICE = "ignore:IProgress not found"
#: the summary of the latest full run (every notebook), which the site reads
LATEST_SUMMARY = "reproduce-summary.json"


@dataclass
class NotebookRun:
    """What happened to one notebook in a reproduce run."""

    name: str
    status: str  # "ok", "failed" or "timeout"
    seconds: float
    figures: list[str] = field(default_factory=list)
    output: Path | None = None
    error: str | None = None
    skipped: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Job:
    """One execution of a notebook: with its own defaults, or with ``MODEL`` set to ``model``."""

    path: Path
    model: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem if self.model is None else f"{self.path.stem}@{model_slug(self.model)}"


def model_slug(model: str) -> str:
    """A file-name-safe tag for a model: its name, or a folder's last component."""
    tail = Path(model).name if ("/" in model or os.sep in model) else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", tail).strip("-.") or "model"


def read_table(path: Path, what: str) -> dict:
    """A notebooks/*.yml file as a mapping ({} if absent): invalid YAML or another top-level
    shape is an error naming the file (and the line), never a parser's '<unicode string>'."""
    import yaml

    if not path.exists():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        mark, start = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        if context and start is not None:
            problem += f" ({context} started at line {start.line + 1})"
        raise ValueError(f"{path}: invalid YAML{at}: {problem}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of notebook stem -> {what}, got "
                         f"{type(loaded).__name__} {loaded!r:.80}")
    return loaded


def model_table(stem: str, models_file: Path | None = None) -> dict[str, dict]:
    """The models notebooks/models.yml gives ``stem``, each with its full-run parameters.

    An entry is a list of names (``01_kv_cache: [smollm2-135m]``: the notebook's own defaults) or
    a mapping of name -> parameters (``03_quantization_error: {smollm2-135m: {CONTEXT: 256}}``):
    what a run on a model 4.7x larger than tiny-llama needs to fit the reproduce budget. Quick
    mode puts quick.yml's values on top.
    """
    path = models_file or paths.notebooks_dir() / "models.yml"
    models = read_table(path, "list of model names").get(stem) or []
    if isinstance(models, list) and all(isinstance(m, str) and m for m in models):
        return {m: {} for m in models}
    if isinstance(models, dict) and all(isinstance(m, str) and m for m in models):
        table = {}
        for model, params in models.items():
            params = params or {}
            if not isinstance(params, dict) or not all(
                    isinstance(k, str) and k.isidentifier() for k in params):
                raise ValueError(f"{path}: {stem!r} -> {model!r}: expected a mapping of parameter "
                                 f"name -> value, got {params!r:.80}")
            table[model] = dict(params)
        return table
    raise ValueError(f"{path}: models of {stem!r} must be a list of names or a mapping of name -> "
                     f"parameters, got {models!r}")


def model_runs(stem: str, models_file: Path | None = None) -> list[str]:
    """The models notebooks/models.yml lists for ``stem`` (each an extra run with MODEL set)."""
    return list(model_table(stem, models_file))


def jobs_for(notebooks: list[Path], *, with_models: bool = True) -> list[Job]:
    """Each notebook's own run, followed by its runs on the models of notebooks/models.yml."""
    jobs = []
    for path in notebooks:
        jobs.append(Job(path))
        if with_models:
            jobs += [Job(path, m) for m in model_runs(path.stem, path.parent / "models.yml")]
    return jobs


def discover(only: str | None = None, notebooks_dir: Path | None = None) -> list[Path]:
    """The lab's notebooks (``NN_slug.ipynb``), in order; ``only`` filters by substring or glob
    (comma-separated; an empty ``only`` is an error, not "all")."""
    folder = notebooks_dir or paths.notebooks_dir()
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if p.is_file())
    if only is not None:
        if not isinstance(only, str):
            raise TypeError(f"only must be a str of patterns or None, got {only!r}")
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        if not patterns:  # `--only "$UNSET"` must not mean "everything"
            raise ValueError(f"--only {only!r} names no notebook (an empty pattern); leave "
                             f"--only out to run them all")
        found = [
            p
            for p in found
            if any(fnmatch.fnmatch(p.stem, pat) or pat in p.stem for pat in patterns)
        ]
    return found


def quick_parameters(stem: str, quick_file: Path | None = None, model: str | None = None) -> dict:
    """Quick-mode parameters of one notebook from notebooks/quick.yml (always with QUICK=True);
    for a run on ``model``, those under ``<stem>@<model>`` on top."""
    path = quick_file or paths.notebooks_dir() / "quick.yml"
    table = read_table(path, "parameters")
    params: dict = {}
    for key in (stem, f"{stem}@{model}") if model else (stem,):
        entry = table.get(key)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {key!r}: expected a mapping of parameter -> value, "
                             f"got {type(entry).__name__} {entry!r:.80}")
        bad = [k for k in entry if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ValueError(f"{path}: entry {key!r}: parameter names must be Python names, "
                             f"got {bad[0]!r}")
        params.update(entry)
    params["QUICK"] = True
    return params


def check_tables(notebooks_dir: Path | None = None) -> None:
    """quick.yml and models.yml name only notebooks that exist (a misspelt stem would silently
    run a notebook at full size in quick mode, or never on its model)."""
    folder = notebooks_dir or paths.notebooks_dir()
    stems = {p.stem for p in discover(None, folder)}
    for name, what in (("quick.yml", "parameters"), ("models.yml", "list of model names")):
        path = folder / name
        for key in read_table(path, what):
            stem = str(key).split("@", 1)[0]
            if stem not in stems:
                raise ValueError(f"{path}: entry {key!r} names no notebook in {folder} "
                                 f"(known: {', '.join(sorted(stems))})")
            if name == "models.yml":
                model_runs(stem, path)


def parameters_source(path: Path) -> str:
    """The source of a notebook's cell tagged ``parameters`` ("" if it has none)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            return cell.source
    return ""


def default_parameters(path: Path) -> dict:
    """The literal defaults of a notebook's ``parameters`` cell (names bound to non-literals are skipped).

    Recorded as figure provenance, so a full run's figures say which parameters made them.
    """
    return params_mod.defaults(parameters_source(path), unpack=False)


def check_notebook_parameters(path: Path, values: dict, name: str | None = None) -> None:
    """``values`` held to the defaults of ``path``'s parameters cell (labkit.core.params):
    TypeError or ValueError naming the parameter, its value and what was expected."""
    spec = params_mod.parse(parameters_source(path))
    params_mod.check_values(spec, values, f"{name or path.stem}: {path.name}'s parameters cell")


def job_parameters(job: Job, quick: bool) -> dict:
    """What papermill passes to one execution, checked against the notebook's parameters cell:
    for a model run its models.yml parameters and ``MODEL``; in quick mode quick.yml's on top."""
    params: dict = {}
    if job.model is not None:
        params.update(model_table(job.path.stem, job.path.parent / "models.yml")
                      .get(job.model, {}))
    if quick:
        params.update(quick_parameters(job.path.stem, job.path.parent / "quick.yml", job.model))
    if job.model is not None:
        params["MODEL"] = job.model
    check_notebook_parameters(job.path, params, job.name)
    return params


def kernel_dir() -> Path:
    """A Jupyter data folder that holds only the runner's own kernelspec.

    Inside this interpreter's prefix (a venv's folder), so each venv has its own and a run with
    LABKIT_ROOT elsewhere finds the same one. Where the prefix is read-only (a system Python),
    a folder in the user's cache named after the interpreter's path.
    """
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "share" / "labkit-jupyter"
    key = hashlib.sha256(os.path.abspath(sys.executable).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "labkit" / f"jupyter-{key}"


def kernel_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with :func:`kernel_dir` first on JUPYTER_PATH, ahead of every other kernelspec."""
    rest = env.get("JUPYTER_PATH", "")
    return {**env, "JUPYTER_PATH": os.pathsep.join(p for p in (str(kernel_dir()), rest) if p)}


def ensure_kernel() -> str:
    """Write the ``labkit`` kernelspec for this very interpreter and return its name.

    Papermill must run the notebooks with the runner's Python and venv. Two traps: a venv's
    python is a symlink to the base interpreter, so comparing resolved paths makes every venv
    look alike; and a kernelspec of the same name in the user's folder (~/.local/share/jupyter)
    shadows one installed with ``--sys-prefix``. So the spec names ``sys.executable`` as it is
    (not resolved) and lives in :func:`kernel_dir`, which :func:`run_notebook` puts first on
    JUPYTER_PATH.
    """
    spec = kernel_dir() / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True, exist_ok=True)
    body = {
        "argv": [os.path.abspath(sys.executable), "-m", "ipykernel_launcher", "-f",
                 "{connection_file}"],
        "display_name": "Python (labkit)",
        "language": "python",
    }
    target = spec / "kernel.json"
    if not target.is_file() or json.loads(target.read_text()) != body:
        atomic_write_json(target, body, indent=1)
    return KERNEL_NAME


def _figures_since(stem: str, since: float, folder: Path) -> list[str]:
    prefix = stem.split("_", 1)[0] + "_"
    if not folder.exists():
        return []
    return sorted(
        p.name
        for p in folder.glob(f"{prefix}*.png")
        if p.stat().st_mtime >= since - 1.0
    )


def _last_error(stderr: str) -> str:
    """The informative tail of papermill's stderr: the exception lines, not the progress noise."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if "Error" in lines[i] or "Exception" in lines[i]:
            return "\n".join(lines[i : i + 3])[-600:]
    return "\n".join(lines[-3:])[-600:]


def notebook_env(name: str, effective: dict, *, quick: bool, model: str | None) -> dict[str, str]:
    """The environment a notebook's kernel runs in: this run's id, the notebook's name and
    parameters (for figure provenance), quick mode, headless plotting, fixed hashing, no
    progress bars; a model run's figure variant; quick runs write under build/quick."""
    from labkit.core import results

    env = kernel_env(dict(os.environ))
    env.update(
        **results.run_env(),  # the notebook's records belong to this run
        LABKIT_NOTEBOOK=name,
        LABKIT_PARAMS=json.dumps(effective, sort_keys=True, default=str),
        LABKIT_QUICK="1" if quick else "0",
        MPLBACKEND="Agg",
        PYTHONHASHSEED="0",
        TQDM_DISABLE="1",  # no progress bars in executed notebooks (tqdm and every library on it)
        PYTHONWARNINGS=",".join(w for w in (env.get("PYTHONWARNINGS"), IPROGRESS_NOTICE) if w),
    )
    env.pop("LABKIT_VARIANT", None)
    if model is not None:
        env["LABKIT_VARIANT"] = model_slug(model)
    if quick and "LABKIT_OUTPUT_ROOT" not in os.environ:
        # Smoke runs must not overwrite the committed full-parameter figures and results.
        env["LABKIT_OUTPUT_ROOT"] = str(paths.build_dir() / "quick")
    return env


def run_notebook(
    path: Path,
    *,
    quick: bool,
    timeout: float | None = None,
    out_dir: Path | None = None,
    kernel: str = KERNEL_NAME,
    model: str | None = None,
) -> NotebookRun:
    """Execute one notebook with papermill in a subprocess; never raises for a notebook failure.

    ``model``: run it with ``MODEL`` set to that model (a run named ``<stem>@<model>``). Its
    parameters (quick.yml's, MODEL) are checked against the parameters cell first: a bad one
    fails the run before papermill starts, so nothing is recorded. The executed copy is written
    to a temporary sibling and renamed when papermill ends (the next run removes the temporary
    of a runner that was killed).
    """
    if timeout is not None:
        finite_float(timeout, "timeout", "run_notebook", positive=True)
    stem = path.stem
    name = Job(path, model).name
    try:  # before anything runs or is written: a bad value fails this notebook only
        params = job_parameters(Job(path, model), quick)
    except (TypeError, ValueError) as exc:
        return NotebookRun(name=name, status="failed", seconds=0.0,
                           error=f"parameters refused, nothing ran: {exc}")
    out_dir = out_dir or paths.build_dir() / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)  # executed copies of a runner that was killed
    final = out_dir / f"{name}.ipynb"
    scratch = temp_sibling(final)  # a folder, so papermill's output keeps its .ipynb name
    scratch.mkdir()
    partial = scratch / final.name
    effective = {**default_parameters(path), **params}

    from labkit.core import results

    env = notebook_env(name, effective, quick=quick, model=model)
    figures = Path(env.get("LABKIT_OUTPUT_ROOT") or paths.root()) / "figures"
    cmd = [
        sys.executable, "-m", "papermill", str(path), str(partial),
        "--kernel", kernel, "--language", "python", "--cwd", str(path.parent), "--no-progress-bar",
        "--parameters_yaml", json.dumps(params),
    ]
    clear_skips(name)
    run_results = figures.parent / "data" / "results"  # where the notebook writes its records
    # The study's run is complete once its own execution ended ok and no model run of it
    # failed: a model run notes only a failure, so it never turns a failed study "ok".
    if model is None:
        results.note_run(stem, "running", results_dir=run_results)
    start = time.time()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        status = "ok" if proc.returncode == 0 else "failed"
        error = None if status == "ok" else _last_error(proc.stderr)
    except subprocess.TimeoutExpired:
        status, error = "timeout", f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - t0
    if model is None or status != "ok":
        results.note_run(stem, status, results_dir=run_results)
    output = None
    if partial.exists():
        os.replace(partial, final)
        output = final
    shutil.rmtree(scratch, ignore_errors=True)
    return NotebookRun(
        name=name, status=status, seconds=seconds, figures=_figures_since(stem, start, figures),
        output=output, error=error, skipped=read_skips(name),
    )


def reproduce(
    *,
    quick: bool = False,
    only: str | None = None,
    jobs: int = 1,
    timeout: float | None = None,
    progress: bool = True,
    with_models: bool = True,
) -> list[NotebookRun]:
    """Run the selected notebooks (``jobs`` at a time), each also on the models of
    notebooks/models.yml unless ``with_models`` is False; one NotebookRun per execution.

    One call is one run: every record the notebooks write carries its run id (see
    ``labkit.core.results.start_run``). Every argument, quick.yml and models.yml are checked
    before the first notebook starts.
    """
    positive_int(jobs, "jobs", "reproduce")
    if timeout is not None:
        finite_float(timeout, "timeout", "reproduce", positive=True)
    notebooks = discover(only)
    if not notebooks:
        raise FileNotFoundError(
            f"no notebook matches {only!r} in {paths.notebooks_dir()}" if only
            else f"no notebooks found in {paths.notebooks_dir()}"
        )
    check_tables(notebooks[0].parent)
    todo = jobs_for(notebooks, with_models=with_models)
    for job in todo:  # a bad value stops the run before any notebook starts
        job_parameters(job, quick)
    kernel = ensure_kernel()
    from labkit.core import results

    results.start_run()
    runs: list[NotebookRun] = []

    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), disable=not progress, transient=False,
    ) as bar:
        task = bar.add_task("quick" if quick else "reproduce", total=len(todo))

        def one(job: Job) -> NotebookRun:
            run = run_notebook(job.path, quick=quick, timeout=timeout, kernel=kernel,
                               model=job.model)
            bar.console.print(f"{'ok  ' if run.ok else 'FAIL'} {escape(run.name)} "
                              f"({run.seconds:.0f} s)")
            bar.advance(task)
            return run

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            runs = list(pool.map(one, todo))
    return runs


def summary_table(runs: list[NotebookRun]):
    """A rich Table: notebook, status, seconds, figures written, error (texts escaped: an
    error or a skip reason with brackets would otherwise be read as rich markup and lost)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="labkit reproduce")
    for col in ("notebook", "status", "seconds", "figures", "skipped", "error"):
        table.add_column(col)
    for r in runs:
        style = "green" if r.ok else "red"
        table.add_row(
            escape(r.name), f"[{style}]{escape(r.status)}[/{style}]", f"{r.seconds:.1f}",
            str(len(r.figures)),
            escape("; ".join(f"{s['part']} ({s['reason']})" for s in r.skipped)),
            escape((r.error or "").splitlines()[-1][:80]) if r.error else "",
        )
    return table


def write_summary(runs: list[NotebookRun], quick: bool, *, run_id: str | None = None,
                  full: bool = True) -> Path:
    """build/reproduce-summary-<run id>.json: what one run ran, how each notebook ended, what it
    wrote (for the site and CI logs). A ``full`` run (no --only) also becomes
    build/reproduce-summary.json, the copy the site reads: a partial run never replaces it.
    Returns the run's own file."""
    from labkit.core import results

    run_id = run_id or results.current_run()[0]  # the run reproduce() started
    from labkit.core import env

    fp = env.fingerprint()
    out = paths.build_dir() / f"reproduce-summary-{run_id}.json"
    payload = {
        "run_id": run_id,
        "full": full,
        "quick": quick,
        "machine": {k: fp.get(k) for k in ("machine_id", "cpu", "system", "os", "apple_chip", "gpu")},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary_file": out.name,
        "notebooks": [
            {"name": r.name, "status": r.status, "seconds": round(r.seconds, 2),
             "figures": r.figures, "skipped": r.skipped, "error": r.error,
             "output": str(r.output) if r.output else None}
            for r in runs
        ],
    }
    atomic_write_json(out, payload)
    if full:
        atomic_write_json(paths.build_dir() / LATEST_SUMMARY, payload)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="quick parameters from notebooks/quick.yml")
    parser.add_argument("--only", metavar="PATTERN",
                        help="notebook stems to run: substring or glob, comma-separated (not empty)")
    parser.add_argument("--jobs", type=option(positive_int), default=1,
                        help="notebooks run at once (default 1)")
    parser.add_argument("--timeout", type=option(finite_float, float, positive=True),
                        default=None, metavar="SECONDS", help="limit per notebook (default none)")
    parser.add_argument("--no-models", action="store_true",
                        help="skip the extra runs on the models of notebooks/models.yml")


def main_from_args(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=False)
    try:
        runs = reproduce(quick=args.quick, only=args.only, jobs=args.jobs, timeout=args.timeout,
                         with_models=not getattr(args, "no_models", False))
    except (FileNotFoundError, TypeError, ValueError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        return 2
    summary = write_summary(runs, args.quick, full=args.only is None)
    console.print(summary_table(runs))
    failed = [r for r in runs if not r.ok]
    for r in failed:
        console.print(f"[red]{escape(r.name)}: {escape(r.status)}[/red]\n{escape(str(r.error))}"
                      f"\n  executed copy: {escape(str(r.output))}")
    console.print(f"{len(runs) - len(failed)} passed, {len(failed)} failed; summary: "
                  f"{escape(str(summary))}")
    return 1 if failed else 0
