"""Results: one record per measured value, stored as JSON lines beside the machine's fingerprint.

Layout (under ``paths.results_dir()``, i.e. data/results/):

    <study>/<machine-id>.jsonl      one JSON object per line, keys exactly RECORD_KEYS
    machines/<machine-id>.json      the fingerprint of that machine (env.fingerprint())
    machines/<machine-id>.runs.json which study each run (`labkit reproduce`, `labkit bench`)
                                    finished, and how: what makes a run "complete"
    machines/<machine-id>.bandwidth.json   the read-bandwidth probe (labkit.core.bandwidth)

Why this shape: results from other machines (a reader's M2, a CUDA box) are committed beside ours
and appear in the same tables, each file written by one machine, so merges never conflict. An
append rewrites the file atomically (lock, copy + new lines into a temp file, os.replace), so an
interrupted run leaves the previous file whole, never a half line. Rewriting is O(file size) per
append, which is fine at the lab's scale (thousands of lines).

Runs: every record carries the run it belongs to (``run_id``: one per ``labkit reproduce`` or
``labkit bench`` call, handed to the notebooks in $LABKIT_RUN_ID; a process started without it
is a run of its own), the thread count, the load average at the run's start and at the record's
time, and ``noisy`` (the machine was busy). A figure or an assert must draw on one run per
machine, never a mix: :func:`select_runs` picks it (the latest complete clean run by default).
Records written before runs existed load as one legacy run per (machine, git revision).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import secrets
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labkit.core import env, paths
from labkit.core.checks import one_of, positive_int
from labkit.core.files import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import pandas as pd

#: The keys of a record written before runs existed (every record committed until then).
LEGACY_RECORD_KEYS = (
    "study", "metric", "value", "unit", "runtime", "device", "model", "params", "machine",
    "git_rev", "created",
)
#: What a record says about the run that made it (see the module docstring).
RUN_KEYS = ("run_id", "threads", "loadavg_start", "loadavg", "noisy")
RECORD_KEYS = LEGACY_RECORD_KEYS + RUN_KEYS
#: Columns load_results derives: ``dirty`` (git_rev ends in +dirty), ``run_noisy`` (any record
#: of the run is noisy).
DERIVED_KEYS = ("dirty", "run_noisy")
MACHINES_FOLDER = "machines"
RUN_ID_ENV = "LABKIT_RUN_ID"
RUN_LOADAVG_ENV = "LABKIT_RUN_LOADAVG"
LEGACY_RUN_PREFIX = "legacy-"
RUN_STATUSES = ("running", "ok", "failed", "timeout")
_KEYS, _LEGACY_KEYS = set(RECORD_KEYS), set(LEGACY_RECORD_KEYS)
_STUDY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_GIT_REV_TTL_S = 60.0
_git_rev_cache: dict[str, tuple[float, str]] = {}
_fingerprints_written: set[tuple[str, bytes]] = set()
_pending_run_note: str | None = None


# --------------------------------------------------------------------------- validation


def _check_study(study: Any) -> str:
    if not isinstance(study, str) or not _STUDY_PATTERN.match(study) or study == MACHINES_FOLDER:
        raise ValueError(
            f"study must be a non-empty name of letters, digits, '_', '-', '.' (it becomes a "
            f"folder under data/results/; {MACHINES_FOLDER!r} is reserved), got {study!r}"
        )
    return study


def _check_value(metric: str, value: Any, hint: str = "; convert tensors with .item()") -> int | float:
    """A finite real number as a plain Python int/float; bools and strings refused."""
    is_number = isinstance(value, int | float | np.integer | np.floating)
    if isinstance(value, bool | np.bool_) or not is_number:
        raise ValueError(
            f"value for metric {metric!r} must be a finite int or float, got {value!r} "
            f"(type {type(value).__name__}){hint}"
        )
    plain = value.item() if isinstance(value, np.generic) else value
    if isinstance(plain, float) and not math.isfinite(plain):
        raise ValueError(f"value for metric {metric!r} must be finite, got {plain!r}")
    if isinstance(plain, int) and abs(plain) > sys.float_info.max:
        raise ValueError(f"value for metric {metric!r} is beyond the float range "
                         f"(|value| > {sys.float_info.max:.3g}): every reader turns it into inf")
    return plain


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _check_params(metric: str, params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"params for metric {metric!r} must be a dict, got {type(params).__name__}")
    _check_param_tree(metric, params, "params")
    try:
        text = json.dumps(params, sort_keys=True, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"params for metric {metric!r} must be JSON-serialisable with finite numbers: {exc}"
        ) from exc
    return json.loads(text)


def _check_param_tree(metric: str, obj: Any, where: str) -> None:
    """Keys are strings (JSON would turn ``1`` into ``"1"``, so a reader's ``params[1]`` never
    matches) and integers fit a float (a reader gets inf otherwise), at every depth."""
    if isinstance(obj, dict):
        for key, val in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"params for metric {metric!r}: key {key!r} of {where} is of "
                                 f"type {type(key).__name__}; keys must be str (JSON stores "
                                 f"{str(key)!r}, which a reader's params[{key!r}] never matches)")
            _check_param_tree(metric, val, f"{where}[{key!r}]")
    elif isinstance(obj, list | tuple):
        for i, val in enumerate(obj):
            _check_param_tree(metric, val, f"{where}[{i}]")
    elif isinstance(obj, int) and not isinstance(obj, bool) and abs(obj) > sys.float_info.max:
        raise ValueError(f"params for metric {metric!r}: {where} is beyond the float range")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"params for metric {metric!r}: {where} is {obj!r}; numbers must be "
                         f"finite (JSON has no NaN or infinity)")


def _check_str(name: str, value: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}str, got {value!r}")
    return value


#: record()'s arguments past the first four, with their defaults (record_many's dicts too).
_RECORD_DEFAULTS: dict[str, Any] = {"runtime": "torch", "device": "cpu", "model": "", "params": None,
                                    "threads": None}
_RECORD_REQUIRED = ("study", "metric", "value", "unit")


def _build_record(args: dict[str, Any]) -> dict[str, Any]:
    """The record of :func:`record`'s arguments ``args`` (by name), every field checked."""
    unknown = sorted(set(args) - set(_RECORD_REQUIRED) - set(_RECORD_DEFAULTS))
    missing = [k for k in _RECORD_REQUIRED if k not in args]
    if unknown or missing:
        raise TypeError(f"unknown {unknown}, missing {missing}; record() takes "
                        f"{list(_RECORD_REQUIRED) + list(_RECORD_DEFAULTS)}")
    a = {**_RECORD_DEFAULTS, **args}
    study, metric, value, unit = (a[k] for k in _RECORD_REQUIRED)
    runtime, device, model, params, threads = (a[k] for k in _RECORD_DEFAULTS)
    _check_study(study)
    _check_str("metric", metric)
    clean_value = _check_value(metric, value)
    _check_str("unit (use '1' for a dimensionless value)", unit)
    _check_str("runtime", runtime)
    _check_str("device", device)
    _check_str("model", model, allow_empty=True)
    if threads is not None:
        threads = positive_int(threads, "threads")
    return {
        "study": study,
        "metric": metric,
        "value": clean_value,
        "unit": unit,
        "runtime": runtime,
        "device": device,
        "model": model,
        "params": _check_params(metric, params),
        "machine": env.machine_id(),
        "git_rev": _git_rev(),
        "created": _now(),
        **_run_fields(threads),
    }


def _git_rev() -> str:
    """env.git_revision() of the lab root, remembered for a minute (record() is called often)."""
    where = str(paths.root())
    now = time.monotonic()
    cached = _git_rev_cache.get(where)
    if cached and now - cached[0] < _GIT_REV_TTL_S:
        return cached[1]
    rev = env.git_revision(Path(where))
    _git_rev_cache[where] = (now, rev)
    return rev


# --------------------------------------------------------------------------- runs


def loadavg() -> float | None:
    """This machine's 1-minute load average, or None where the OS has none (Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


_PROCESS_START_LOADAVG = loadavg()  # at import: the start of a run this process makes itself
_process_run_id: str | None = None


def new_run_id() -> str:
    """A fresh run id: the UTC start time (so ids sort by time) and 6 random hex digits."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def start_run() -> str:
    """Begin a run (one ``labkit reproduce`` or ``labkit bench`` call) and return its id.

    The id and the load average now go into $LABKIT_RUN_ID and $LABKIT_RUN_LOADAVG, so every
    notebook or benchmark it starts (child processes inherit the environment) files its records
    under this run. The runner then says what became of each study with :func:`note_run`.
    """
    run_id = new_run_id()
    load = loadavg()
    os.environ[RUN_ID_ENV] = run_id
    os.environ[RUN_LOADAVG_ENV] = "" if load is None else repr(load)
    return run_id


def note_run(study: str, status: str, *, results_dir: Path | None = None) -> None:
    """Enter in the run registry of ``results_dir`` (default: this process's results folder)
    that ``study`` is "running", or ended "ok", "failed" or "timeout", in the current run.

    Why: a crashed notebook leaves half its records; :func:`select_runs` counts a registered
    run as complete for a study only once it ended "ok" there. ``study`` "*" stands for every
    study of the run (a benchmark, whose studies are known only from its records).
    """
    if study != "*":
        _check_study(study)
    one_of(status, "status", RUN_STATUSES, "note_run")
    run_id, start = current_run()

    def update(registry: dict[str, Any]) -> None:
        entry = registry.setdefault(run_id, {"loadavg_start": start, "studies": {}})
        entry["studies"][study] = {"status": status, "at": _now()}

    update_machine_file("runs", update, results_dir)


def note_run_at_first_record(study: str | None) -> None:
    """Enter ``study`` as "running" in the current run when the first record is written, not
    now (None: forget it). Why: a benchmark refused before it measures anything (a bad
    --model) then leaves the lab folder exactly as it was, while one that crashes after its
    first record is still registered, so :func:`select_runs` never takes it as complete."""
    global _pending_run_note
    _pending_run_note = None if study is None else ("*" if study == "*" else _check_study(study))


def run_registered() -> bool:
    """Whether the current run is in this machine's run registry."""
    return current_run()[0] in load_run_registry(env.machine_id())


def _note_pending_run() -> None:
    global _pending_run_note
    if _pending_run_note is not None:
        study, _pending_run_note = _pending_run_note, None
        note_run(study, "running")


def current_run() -> tuple[str, float | None]:
    """(run id, load average at the run's start) of this process: $LABKIT_RUN_ID when a runner
    set it, else an id of this process's own, made once (its start: when results was imported)."""
    global _process_run_id
    given = os.environ.get(RUN_ID_ENV)
    if given:
        raw = os.environ.get(RUN_LOADAVG_ENV, "")
        try:
            return given, float(raw) if raw else None
        except ValueError:
            return given, None
    if _process_run_id is None:
        _process_run_id = new_run_id()
    return _process_run_id, _PROCESS_START_LOADAVG


def run_env() -> dict[str, str]:
    """The environment variables that make a child process part of the current run."""
    run_id, start = current_run()
    return {RUN_ID_ENV: run_id, RUN_LOADAVG_ENV: "" if start is None else repr(start)}


def _torch_threads() -> int | None:
    """torch's intra-op thread count if this process loaded torch (None: it ran no torch code)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def is_noisy(loadavg_start: float | None, load: float | None, threads: int | None,
             cores: int | None) -> bool:
    """Whether other work competed with a run: its start load, or the load now less this
    process's own threads, exceeds half the cores. Unknown loads or cores never count as noisy."""
    if not cores:
        return False
    busy_at_start = loadavg_start is not None and loadavg_start > cores / 2
    others_now = load is not None and load - (threads or 1) > cores / 2
    return busy_at_start or others_now


def _run_fields(threads: int | None) -> dict[str, Any]:
    run_id, start = current_run()
    threads = _torch_threads() if threads is None else threads
    load = loadavg()
    cores = env.fingerprint().get("cores_logical")
    return {"run_id": run_id, "threads": threads, "loadavg_start": start, "loadavg": load,
            "noisy": is_noisy(start, load, threads, cores)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock on a sidecar ``.<name>.lock`` so concurrent appenders take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _append_lines(path: Path, lines: list[str]) -> None:
    _note_pending_run()
    with locked(path):
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"  # a hand-edited file without a final newline
        atomic_write_bytes(path, old + "".join(line + "\n" for line in lines).encode("utf-8"))


def _ensure_fingerprint_file() -> Path:
    """Write data/results/machines/<id>.json if missing or different (e.g. after an upgrade)."""
    info = env.fingerprint()
    path = paths.results_dir() / MACHINES_FOLDER / f"{info['machine_id']}.json"
    data = (json.dumps(info, indent=2, sort_keys=True) + "\n").encode("utf-8")
    key = (str(path), data)
    if key in _fingerprints_written and path.exists():
        return path
    if not path.exists() or path.read_bytes() != data:
        atomic_write_bytes(path, data)
    _fingerprints_written.add(key)
    return path


def machine_file(machine: str, kind: str = "", results_dir: Path | None = None) -> Path:
    """data/results/machines/<machine>[.<kind>].json: the fingerprint (kind ""), the run
    registry ("runs") or the bandwidth probe ("bandwidth") of one machine."""
    folder = (results_dir or paths.results_dir()) / MACHINES_FOLDER
    return folder / (f"{machine}.{kind}.json" if kind else f"{machine}.json")


def load_machine_file(machine: str, kind: str) -> dict[str, Any]:
    """The object in :func:`machine_file` ``(machine, kind)`` ({} when absent); a corrupt file
    raises naming it."""
    return _read_json(machine_file(machine, kind))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def update_machine_file(kind: str, update: Any, results_dir: Path | None = None) -> dict[str, Any]:
    """Read-modify-write this machine's ``kind`` file under its lock: ``update(obj)`` changes
    the dict in place; the result is written atomically and returned."""
    path = machine_file(env.machine_id(), kind, results_dir)
    with locked(path):
        obj = _read_json(path)
        update(obj)
        atomic_write_json(path, obj, indent=1)
    return obj


def load_run_registry(machine: str) -> dict[str, Any]:
    """The runs of ``machine`` that a runner noted: {run_id: {loadavg_start, studies: {study:
    {status, at}}}} ({} if none)."""
    return load_machine_file(machine, "runs")


def _results_file(study: str, machine: str) -> Path:
    return paths.results_dir() / study / f"{machine}.jsonl"


def _to_line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------- public API


def record(
    study: str,
    metric: str,
    value: int | float,
    unit: str,
    *,
    runtime: str = "torch",
    device: str = "cpu",
    model: str = "",
    params: dict[str, Any] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Validate and append one measured value to data/results/<study>/<machine-id>.jsonl.

    ``value`` must be a finite int/float (numpy scalars accepted, bools refused): a ValueError
    names the metric and the value otherwise. ``params`` (the knobs that produced the value,
    e.g. ``{"seq_len": 512}``) must be JSON-serialisable. ``threads`` is the thread count the
    value was measured with (default: torch's at this moment; None if torch is not loaded).
    Fills machine, git_rev, created (ISO 8601, UTC) and the run fields (run_id, loadavg_start,
    loadavg, noisy: see :func:`current_run`, :func:`is_noisy`), makes sure the machine's
    fingerprint file exists, and returns the record.
    """
    rec = _build_record(dict(study=study, metric=metric, value=value, unit=unit, runtime=runtime,
                             device=device, model=model, params=params, threads=threads))
    _ensure_fingerprint_file()
    _append_lines(_results_file(study, rec["machine"]), [_to_line(rec)])
    return rec


def record_many(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Record several values at once; each dict holds :func:`record`'s arguments by name.

    All are validated before anything is written, so one bad value refuses the whole batch, and
    each results file is rewritten once.
    """
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("records must be a list of dicts of record()'s arguments")
    built = []
    for i, kwargs in enumerate(records):
        try:
            built.append(_build_record(kwargs))
        except TypeError as exc:
            raise ValueError(f"records[{i}] has bad keys: {exc}") from exc
    if not built:
        return []
    _ensure_fingerprint_file()
    by_file: dict[Path, list[str]] = {}
    for rec in built:
        by_file.setdefault(_results_file(rec["study"], rec["machine"]), []).append(_to_line(rec))
    for path, lines in by_file.items():
        _append_lines(path, lines)
    return built


#: What load_results does with a bad line or file (see its docstring).
BAD_LINES = ("raise", "skip")


def _check_loaded(obj: Any, study: str) -> None:
    """A line read back passes the checks record() made when it was written (ValueError: why)."""
    if not isinstance(obj, dict) or set(obj) not in (_KEYS, _LEGACY_KEYS):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"a record needs exactly keys {RECORD_KEYS} (or, written before runs "
                         f"existed, {LEGACY_RECORD_KEYS}), got {got}")
    if _check_study(obj["study"]) != study:
        raise ValueError(f"a record of study {obj['study']!r} in the folder of study {study!r}")
    metric = _check_str("metric", obj["metric"])
    _check_value(metric, obj["value"], hint="")
    for key in ("unit", "runtime", "device", "machine", "git_rev"):
        _check_str(key, obj[key])
    _check_str("model", obj["model"], allow_empty=True)
    if not isinstance(obj["params"], dict):
        raise ValueError(f"params must be a JSON object, got {obj['params']!r}")
    _check_params(metric, obj["params"])
    created = obj["created"]
    try:
        datetime.fromisoformat(created)
    except (TypeError, ValueError):
        raise ValueError(f"created must be an ISO 8601 time such as "
                         f"'2026-01-31T12:00:00.000000+00:00', got {created!r}") from None


def _bad(where: str, reason: str, bad_lines: str) -> None:
    """Report one bad line or file: raise (the default) or warn that it is skipped."""
    if bad_lines == "raise":
        raise ValueError(f"{where}: {reason}")
    warnings.warn(f"{where}: {reason}; skipped", stacklevel=4)


def _read_jsonl(path: Path, bad_lines: str = "raise") -> list[dict[str, Any]]:
    """Every record of one file, each checked as record() checks it; a bad line is reported
    with the file and line number (raised, or skipped with a warning)."""
    rows = []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as exc:
        _bad(str(path), f"cannot read results file ({exc.strerror or exc})", bad_lines)
        return rows
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline, not an empty record
    study = path.parent.name
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _bad(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})", bad_lines)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            _bad(where, f"corrupt results line ({exc}): {line[:80]!r}", bad_lines)
            continue
        try:
            _check_loaded(obj, study)
        except ValueError as exc:
            _bad(where, str(exc), bad_lines)
            continue
        rows.append(obj)
    return rows


def _flatten(prefix: str, obj: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, val in obj.items():
        if isinstance(val, dict):
            flat.update(_flatten(f"{prefix}{key}_", val))
        else:
            flat[f"{prefix}{key}"] = val
    return flat


def load_machine(machine: str) -> dict[str, Any] | None:
    """The stored fingerprint of ``machine`` (None if that file is absent)."""
    path = paths.results_dir() / MACHINES_FOLDER / f"{machine}.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt machine fingerprint ({exc})") from exc


def _with_run_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Legacy rows get their run id; add ``dirty`` and ``run_noisy`` (DERIVED_KEYS)."""
    legacy = df["run_id"].isna()
    df.loc[legacy, "run_id"] = LEGACY_RUN_PREFIX + df.loc[legacy, "git_rev"].astype(str)
    df["dirty"] = df["git_rev"].astype(str).str.endswith("+dirty")
    noisy = df["noisy"].eq(True)
    df["run_noisy"] = noisy.groupby([df["machine"], df["run_id"]]).transform("any").astype(bool)
    return df



def known_studies() -> list[str]:
    """The studies load_results knows: those with a results folder, and every notebook's stem
    (a study that has not recorded yet is known, and loads as an empty table)."""
    root = paths.results_dir()
    folders = {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    notebooks = paths.notebooks_dir()
    stems = {p.stem for p in notebooks.glob("[0-9][0-9]_*.ipynb")} if notebooks.is_dir() else set()
    return sorted(n for n in folders | stems if n != MACHINES_FOLDER and _STUDY_PATTERN.match(n))


def _study_folders(study: str | None) -> list[Path]:
    root = paths.results_dir()
    known = known_studies()
    if study is None:
        return [root / name for name in known if (root / name).is_dir()]
    if _check_study(study) not in known:
        listed = ", ".join(known) or "none yet"
        raise ValueError(f"load_results: unknown study {study!r} (no folder under {root} and no "
                         f"notebook of that name); known studies: {listed}")
    return [root / study]


def _machine_columns(machines: list[str], bad_lines: str) -> list[dict[str, Any]]:
    """One row per machine: its fingerprint flattened with prefix ``machine_``."""
    out = []
    for machine in machines:
        path = paths.results_dir() / MACHINES_FOLDER / f"{machine}.json"
        try:
            info = load_machine(machine)
        except ValueError as exc:
            _bad(str(path), str(exc).removeprefix(f"{path}: "), bad_lines)
            info = {}
        if info is None:
            warnings.warn(
                f"no fingerprint file for machine {machine!r} under "
                f"{paths.results_dir() / MACHINES_FOLDER}", stacklevel=3,
            )
            info = {}
        info = {k: v for k, v in info.items() if k != "machine_id"}
        out.append({"machine": machine, **_flatten("machine_", info)})
    return out


def load_results(study: str | None = None, *, bad_lines: str = "raise") -> pd.DataFrame:
    """All records of ``study`` from every machine (every study if None) as a DataFrame.

    Columns: RECORD_KEYS (``created`` as a UTC datetime, ``params`` as dicts), DERIVED_KEYS,
    then the machine's fingerprint flattened with prefix ``machine_`` (machine_cpu, machine_os,
    machine_gpu, machine_ram_gb, machine_versions_torch, ...). A machine without a fingerprint
    file gives a warning and empty machine_ columns. Records written before runs existed get
    ``run_id`` "legacy-<git_rev>" (one run per machine and revision) and empty run fields.
    Every run is here, dirty and noisy ones included: a figure draws on :func:`select_runs` of
    this (or :func:`load_run`).

    Every line is checked as :func:`record` checked it when it was written (types, finite
    values, an ISO 8601 time, the study of its folder): a hand-edited NaN or a string value
    would otherwise load and break a table later, far from its file. A bad line (or an
    unreadable file, or a corrupt fingerprint) is reported as ``<file>:<line>: <reason>``:
    raised (``bad_lines="raise"``, the default) or skipped with a warning (``"skip"``). Only the
    folders of the study asked for are read, so one study's bad file never breaks another's
    table. An unknown study name is an error listing the known ones (:func:`known_studies`).
    """
    import pandas as pd

    if bad_lines not in BAD_LINES:
        raise ValueError(f"bad_lines must be one of {BAD_LINES}, got {bad_lines!r}")
    rows: list[dict[str, Any]] = []
    for folder in _study_folders(study):
        for path in sorted(folder.glob("*.jsonl")):
            rows.extend(_read_jsonl(path, bad_lines))

    df = _with_run_columns(pd.DataFrame(rows, columns=list(RECORD_KEYS)))
    df["created"] = pd.to_datetime(df["created"], utc=True, format="ISO8601")
    if df.empty:
        return df
    machines = _machine_columns(sorted(df["machine"].unique()), bad_lines)
    df = df.merge(pd.DataFrame(machines), on="machine", how="left")
    return df.sort_values("created", kind="stable").reset_index(drop=True)


def runs_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run of each study and machine in ``df`` (from :func:`load_results`): run_id,
    git_rev (the last), dirty and noisy (any record), complete (see :func:`select_runs`),
    current (this process's run), first and last record time, records; oldest first."""
    import pandas as pd

    cols = ["study", "machine", "run_id", "git_rev", "dirty", "noisy", "complete", "current",
            "first", "last", "records"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    table = df.groupby(["study", "machine", "run_id"], sort=False).agg(
        git_rev=("git_rev", "last"), dirty=("dirty", "any"), noisy=("run_noisy", "any"),
        first=("created", "min"), last=("created", "max"), records=("metric", "size"),
    ).reset_index()
    registries = {m: load_run_registry(m) for m in table["machine"].unique()}
    table["complete"] = [_completed(registries[r.machine], r.run_id, r.study)
                         for r in table.itertuples()]
    here, now = env.machine_id(), current_run()[0]
    table["current"] = (table["machine"] == here) & (table["run_id"] == now)
    return table[cols].sort_values("last", kind="stable").reset_index(drop=True)


def _completed(registry: dict[str, Any], run_id: str, study: str) -> bool:
    """A run no runner registered (legacy, or a notebook run by hand) counts as complete; a
    registered one once the study (or "*", the whole run) ended "ok"."""
    entry = registry.get(run_id)
    if entry is None:
        return True
    studies = entry.get("studies", {})
    status = studies.get(study) or studies.get("*") or {}
    return status.get("status") == "ok"


def select_runs(
    df: pd.DataFrame,
    *,
    include_dirty: bool = False,
    include_noisy: bool = True,
    run_id: str | None = None,
    current: bool = True,
) -> pd.DataFrame:
    """The records of one run per study and machine: the latest complete clean run.

    Why: records of every run accumulate in one file; a figure or an assert that mixes runs
    (another tree, another load) says nothing. A run is complete for a study when its runner
    noted that study "ok" (:func:`note_run`; unregistered runs count as complete), clean when
    no record's git_rev ends in +dirty. Dirty runs are left out unless ``include_dirty``, noisy
    ones (see :func:`is_noisy`) only if ``include_noisy`` is False. ``current`` (default) always
    lets this process's own run in, complete or not, clean or not: a notebook's figure shows what
    it just measured (its provenance says +dirty). ``run_id`` picks that run, wherever it is.
    """
    if df.empty:
        return df
    if run_id is not None:
        return df[df["run_id"] == run_id].reset_index(drop=True)
    runs = runs_table(df)
    ok = runs["complete"] & (include_dirty | ~runs["dirty"]) & (include_noisy | ~runs["noisy"])
    ok |= current & runs["current"]
    chosen = runs[ok].groupby(["study", "machine"]).tail(1)[["study", "machine", "run_id"]]
    return df.merge(chosen, on=["study", "machine", "run_id"]).reset_index(drop=True)


def load_run(study: str | None = None, **selection: Any) -> pd.DataFrame:
    """:func:`select_runs` of :func:`load_results`: one run per machine, ready for a figure."""
    return select_runs(load_results(study), **selection)


def latest(df: pd.DataFrame, **filters: Any) -> pd.DataFrame:
    """Rows matching ``filters`` (column=value), keeping only the newest record of each
    configuration (same study, metric, unit, runtime, device, model, machine and params).

    Why: rerunning a notebook appends; tables and figures usually want the latest value.
    """
    unknown = sorted(set(filters) - set(df.columns))
    if unknown:
        raise ValueError(f"latest(): no column(s) {unknown}; columns are {list(df.columns)}")
    for column, wanted in filters.items():
        if not df.empty and not (df[column] == wanted).any():
            values = sorted({str(v) for v in df[column]})
            shown = ", ".join(values[:20]) + (f", ... ({len(values)} in all)" if len(values) > 20 else "")
            raise ValueError(f"latest(): no record has {column}={wanted!r}; {column} values "
                             f"here: {shown}")
    sel = df
    for column, wanted in filters.items():
        sel = sel[sel[column] == wanted]
    if sel.empty:
        return sel.reset_index(drop=True)
    key_cols = ["study", "metric", "unit", "runtime", "device", "model", "machine"]
    keyed = sel.assign(_params_key=sel["params"].map(lambda p: json.dumps(p, sort_keys=True)))
    keyed = keyed.sort_values("created", kind="stable")
    newest = keyed.drop_duplicates(subset=[*key_cols, "_params_key"], keep="last")
    return newest.drop(columns="_params_key").reset_index(drop=True)


def machine_label(fingerprint: dict[str, Any]) -> str:
    """A reader's name for a machine: its Apple chip or CPU, its GPU, its OS."""
    chip = fingerprint.get("apple_chip") or fingerprint.get("cpu") or "unknown CPU"
    gpu = f", {fingerprint['gpu']}" if fingerprint.get("gpu") else ""
    return f"{chip}{gpu}, {fingerprint.get('system') or fingerprint.get('os') or ''}".strip(", ")


def across_machines(df: pd.DataFrame, metrics: list[str], by: tuple[str, ...] = ()) -> pd.DataFrame:
    """The newest record of each (machine, metric, *by) among ``metrics``: results from other
    machines beside ours, as every "other machines" table and figure draws them.

    Adds ``where``: what ran it, in words (the GPU for a cuda row, else the Apple chip or CPU,
    else the machine id), at most 40 characters, so two GPUs in one host stay apart.
    """
    import pandas as pd

    sel = df[df["metric"].isin(metrics)].copy()
    if sel.empty:
        return sel.assign(where=[])
    cpu = sel.get("machine_apple_chip", pd.Series(index=sel.index, dtype=object))
    cpu = cpu.fillna(sel.get("machine_cpu", pd.Series(index=sel.index, dtype=object)))
    gpu = sel.get("machine_gpu", pd.Series(index=sel.index, dtype=object))
    where = gpu.where(sel["device"].astype(str).str.startswith("cuda") & gpu.notna(), cpu)
    sel["where"] = where.fillna(sel["machine"]).astype(str).str.slice(0, 40)
    keys = ["machine", "where", "metric", *by]
    return sel.sort_values("created", kind="stable").groupby(keys).tail(1).reset_index(drop=True)
