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


def _check_value(metric: str, value: Any) -> int | float:
    """A finite real number as a plain Python int/float; bools and strings refused."""
    is_number = isinstance(value, int | float | np.integer | np.floating)
    if isinstance(value, bool | np.bool_) or not is_number:
        raise ValueError(
            f"value for metric {metric!r} must be a finite int or float, got {value!r} "
            f"(type {type(value).__name__}); convert tensors with .item()"
        )
    plain = value.item() if isinstance(value, np.generic) else value
    if isinstance(plain, float) and not math.isfinite(plain):
        raise ValueError(f"value for metric {metric!r} must be finite, got {plain!r}")
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
    try:
        text = json.dumps(params, sort_keys=True, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"params for metric {metric!r} must be JSON-serialisable with finite numbers: {exc}"
        ) from exc
    return json.loads(text)


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of one file; a corrupt line raises with the file and line number."""
    rows = []
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline, not an empty record
    for number, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: corrupt results line ({exc}): {line[:80]!r}") from exc
        if not isinstance(obj, dict) or set(obj) != set(RECORD_KEYS):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}:{number}: a record needs exactly keys {RECORD_KEYS}, got {got}")
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


def load_results(study: str | None = None) -> pd.DataFrame:
    """All records of ``study`` from every machine (every study if None) as a DataFrame.

    Columns: RECORD_KEYS (``created`` as a UTC datetime, ``params`` as dicts), then the machine's
    fingerprint flattened with prefix ``machine_`` (machine_cpu, machine_os, machine_gpu,
    machine_ram_gb, machine_versions_torch, ...). A corrupt line raises with its file and line;
    a machine without a fingerprint file gives a warning and empty machine_ columns.
    """
    import pandas as pd

    root = paths.results_dir()
    if study is None:
        folders = sorted(
            p for p in root.glob("*") if p.is_dir() and p.name != MACHINES_FOLDER
        ) if root.exists() else []
    else:
        folders = [root / _check_study(study)]
    rows: list[dict[str, Any]] = []
    for folder in folders:
        for path in sorted(folder.glob("*.jsonl")):
            rows.extend(_read_jsonl(path))

    df = pd.DataFrame(rows, columns=list(RECORD_KEYS))
    df["created"] = pd.to_datetime(df["created"], utc=True, format="ISO8601")
    if df.empty:
        return df

    machines = []
    for machine in sorted(df["machine"].unique()):
        info = load_machine(machine)
        if info is None:
            warnings.warn(
                f"no fingerprint file for machine {machine!r} under {root / MACHINES_FOLDER}",
                stacklevel=2,
            )
            info = {}
        info = {k: v for k, v in info.items() if k != "machine_id"}
        machines.append({"machine": machine, **_flatten("machine_", info)})
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
