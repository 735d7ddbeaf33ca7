"""Results: one record per measured value, stored as JSON lines beside the machine's fingerprint.

Layout (under ``paths.results_dir()``, i.e. data/results/):

    <study>/<machine-id>.jsonl      one JSON object per line, keys exactly RECORD_KEYS
    machines/<machine-id>.json      the fingerprint of that machine (env.fingerprint())

Why this shape: results from other machines (a reader's M2, a CUDA box) are committed beside ours
and appear in the same tables, each file written by one machine, so merges never conflict. An
append rewrites the file atomically (lock, copy + new lines into a temp file, os.replace), so an
interrupted run leaves the previous file whole, never a half line. Rewriting is O(file size) per
append, which is fine at the lab's scale (thousands of lines).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labkit.core import env, paths
from labkit.core.files import atomic_write_bytes

if TYPE_CHECKING:
    import pandas as pd

RECORD_KEYS = (
    "study", "metric", "value", "unit", "runtime", "device", "model", "params", "machine",
    "git_rev", "created",
)
MACHINES_FOLDER = "machines"
_STUDY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_GIT_REV_TTL_S = 60.0
_git_rev_cache: dict[str, tuple[float, str]] = {}
_fingerprints_written: set[tuple[str, bytes]] = set()


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


def _build_record(
    study: str,
    metric: str,
    value: Any,
    unit: str,
    *,
    runtime: str = "torch",
    device: str = "cpu",
    model: str = "",
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    _check_study(study)
    _check_str("metric", metric)
    clean_value = _check_value(metric, value)
    _check_str("unit (use '1' for a dimensionless value)", unit)
    _check_str("runtime", runtime)
    _check_str("device", device)
    _check_str("model", model, allow_empty=True)
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
        "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
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


# --------------------------------------------------------------------------- files


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
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
    with _locked(path):
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
) -> dict[str, Any]:
    """Validate and append one measured value to data/results/<study>/<machine-id>.jsonl.

    ``value`` must be a finite int/float (numpy scalars accepted, bools refused): a ValueError
    names the metric and the value otherwise. ``params`` (the knobs that produced the value,
    e.g. ``{"seq_len": 512}``) must be JSON-serialisable. Fills machine, git_rev and created
    (ISO 8601, UTC), makes sure the machine's fingerprint file exists, and returns the record.
    """
    rec = _build_record(
        study, metric, value, unit, runtime=runtime, device=device, model=model, params=params
    )
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
            built.append(_build_record(**kwargs))
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
    if not isinstance(obj, dict) or set(obj) != set(RECORD_KEYS):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"a record needs exactly keys {RECORD_KEYS}, got {got}")
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

    Columns: RECORD_KEYS (``created`` as a UTC datetime, ``params`` as dicts), then the machine's
    fingerprint flattened with prefix ``machine_`` (machine_cpu, machine_os, machine_gpu,
    machine_ram_gb, machine_versions_torch, ...). A machine without a fingerprint file gives a
    warning and empty machine_ columns.

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

    df = pd.DataFrame(rows, columns=list(RECORD_KEYS))
    df["created"] = pd.to_datetime(df["created"], utc=True, format="ISO8601")
    if df.empty:
        return df
    machines = _machine_columns(sorted(df["machine"].unique()), bad_lines)
    df = df.merge(pd.DataFrame(machines), on="machine", how="left")
    return df.sort_values("created", kind="stable").reset_index(drop=True)


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
