"""labkit.core.results: record schema, validation, atomic appends, loading joined with fingerprints.

Every test writes under tmp_path through LABKIT_ROOT, never into the real data/results/.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from labkit.core import env, paths, results
from labkit.core.results import RECORD_KEYS, load_results, record


@pytest.fixture(autouse=True)
def lab_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)  # would redirect the writes
    results._fingerprints_written.clear()
    results._git_rev_cache.clear()
    return tmp_path


def results_file(study: str) -> Path:
    return paths.results_dir() / study / f"{env.machine_id()}.jsonl"


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_has_exactly_the_schema_keys(lab_root: Path) -> None:
    rec = record("s1", "latency", 1.25, "ms", runtime="torch", device="cpu", model="tiny",
                 params={"seq_len": 8})
    assert tuple(rec) == RECORD_KEYS
    assert rec["value"] == 1.25 and rec["params"] == {"seq_len": 8}
    assert rec["machine"] == env.machine_id()
    assert rec["git_rev"] == "unknown"  # tmp_path is not a git checkout
    created = datetime.fromisoformat(rec["created"])
    assert created.utcoffset() == timezone.utc.utcoffset(None)
    assert str(results_file("s1")).startswith(str(lab_root))
    assert lines_of(results_file("s1")) == [rec]


def test_two_appends_give_two_lines() -> None:
    first = record("s1", "m", 1, "ms")
    second = record("s1", "m", 2.5, "ms")
    assert lines_of(results_file("s1")) == [first, second]
    assert results_file("s1").read_bytes().endswith(b"\n")


def test_fingerprint_file_written_and_refreshed() -> None:
    record("s1", "m", 1, "ms")
    path = paths.results_dir() / "machines" / f"{env.machine_id()}.json"
    assert json.loads(path.read_text()) == env.fingerprint()
    path.write_text('{"stale": true}\n')
    results._fingerprints_written.clear()  # as in a new process
    record("s1", "m", 2, "ms")
    assert json.loads(path.read_text()) == env.fingerprint()


@pytest.mark.parametrize(
    "bad", [math.nan, math.inf, -math.inf, np.float32("nan"), "3.0", True, np.bool_(False), None,
            [1.0], np.array([1.0, 2.0])],
)
def test_bad_values_refused_and_nothing_written(bad: object) -> None:
    with pytest.raises(ValueError, match=r"value for metric 'tok_per_s'") as info:
        record("s1", "tok_per_s", bad, "tokens/s")  # type: ignore[arg-type]
    assert repr(bad if not isinstance(bad, np.floating) else bad.item()) in str(info.value)
    assert not results_file("s1").exists()


def test_numpy_scalars_become_plain_numbers() -> None:
    a = record("s1", "a", np.float32(1.5), "ms")
    b = record("s1", "b", np.int64(3), "count")
    assert a["value"] == 1.5 and type(a["value"]) is float
    assert b["value"] == 3 and type(b["value"]) is int


@pytest.mark.parametrize("study", ["", "a/b", "../up", "machines", ".hidden", 3])
def test_bad_study_refused(study: object) -> None:
    with pytest.raises(ValueError, match="study"):
        record(study, "m", 1.0, "ms")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"metric": ""}, "metric"), ({"unit": ""}, "unit"), ({"runtime": ""}, "runtime"),
     ({"device": 0}, "device"), ({"model": None}, "model")],
)
def test_bad_strings_refused(kwargs: dict, name: str) -> None:
    args = {"study": "s1", "metric": "m", "value": 1.0, "unit": "ms", **kwargs}
    with pytest.raises(ValueError, match=name):
        record(**args)


@pytest.mark.parametrize("params", [{"f": object()}, {"x": math.nan}, [1, 2]])
def test_bad_params_refused(params: object) -> None:
    with pytest.raises(ValueError, match="params"):
        record("s1", "m", 1.0, "ms", params=params)  # type: ignore[arg-type]


def test_params_numpy_scalars_normalised() -> None:
    rec = record("s1", "m", 1.0, "ms", params={"n": np.int32(4), "p": np.float64(0.5)})
    assert rec["params"] == {"n": 4, "p": 0.5}
    assert lines_of(results_file("s1"))[0]["params"] == {"n": 4, "p": 0.5}


def test_interrupted_write_leaves_old_file_and_no_temp(monkeypatch: pytest.MonkeyPatch) -> None:
    record("s1", "m", 1.0, "ms")
    before = results_file("s1").read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("simulated crash during replace")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", boom)
        with pytest.raises(OSError, match="simulated crash"):
            record("s1", "m", 2.0, "ms")
    assert results_file("s1").read_bytes() == before
    assert list(results_file("s1").parent.glob("*.tmp")) == []
    assert [p.name for p in results_file("s1").parent.iterdir() if p.suffix != ".lock"] == [
        results_file("s1").name
    ]


def test_load_results_joins_fingerprints() -> None:
    record("s1", "latency", 1.0, "ms", params={"n": 1})
    record("s2", "latency", 2.0, "ms")
    df = load_results("s1")
    assert len(df) == 1
    assert list(df.columns[: len(RECORD_KEYS)]) == list(RECORD_KEYS)
    fp = env.fingerprint()
    assert df.loc[0, "machine_cpu"] == fp["cpu"]
    assert df.loc[0, "machine_os"] == fp["os"]
    assert df.loc[0, "machine_ram_gb"] == fp["ram_gb"]
    assert df.loc[0, "machine_versions_python"] == fp["versions"]["python"]
    assert "machine_gpu" in df.columns and "machine_machine_id" not in df.columns
    assert df.loc[0, "params"] == {"n": 1}
    assert isinstance(df["created"].dtype, pd.DatetimeTZDtype)
    assert set(load_results()["study"]) == {"s1", "s2"}


def test_load_results_includes_other_machines() -> None:
    record("s1", "latency", 1.0, "ms")
    other = "feedbeef0000"
    row = dict(record("s1", "latency", 9.0, "ms"), machine=other)
    results_file("s1").with_name(f"{other}.jsonl").write_text(json.dumps(row) + "\n")
    (paths.results_dir() / "machines" / f"{other}.json").write_text(
        json.dumps({"machine_id": other, "cpu": "Apple M2", "gpu": "Apple GPU (MPS)"})
    )
    df = load_results("s1")
    assert len(df) == 3
    theirs = df[df["machine"] == other].iloc[0]
    assert theirs["machine_cpu"] == "Apple M2" and theirs["value"] == 9.0


def test_load_results_empty_has_record_columns() -> None:
    (paths.results_dir() / "nothing_here").mkdir(parents=True)  # a known study, no records yet
    df = load_results("nothing_here")
    assert df.empty and list(df.columns) == [*RECORD_KEYS, *results.DERIVED_KEYS]
    assert load_results().empty


def _after_one_record(line: str) -> None:
    """s1's results file: one good record, then ``line`` as the file's line 2."""
    record("s1", "m", 1.0, "ms")
    with results_file("s1").open("a") as f:
        f.write(line)


def test_corrupt_line_raises_with_path_and_line() -> None:
    _after_one_record('{"study": "s1", "metr\n')
    with pytest.raises(ValueError, match=rf"{results_file('s1').name}:2: corrupt"):
        load_results("s1")


def test_wrong_keys_line_raises() -> None:
    _after_one_record('{"study": "s1"}\n')
    with pytest.raises(ValueError, match=r":2: a record needs exactly keys"):
        load_results("s1")


def test_blank_line_is_not_skipped_silently() -> None:
    _after_one_record("\n")
    with pytest.raises(ValueError, match=r":2: corrupt"):
        load_results("s1")


def test_missing_fingerprint_warns() -> None:
    record("s1", "m", 1.0, "ms")
    (paths.results_dir() / "machines" / f"{env.machine_id()}.json").unlink()
    with pytest.warns(UserWarning, match="no fingerprint file"):
        df = load_results("s1")
    assert len(df) == 1


def test_record_many_is_all_or_nothing() -> None:
    out = results.record_many([
        {"study": "s1", "metric": "a", "value": 1.0, "unit": "ms"},
        {"study": "s1", "metric": "b", "value": 2, "unit": "count", "params": {"k": 1}},
    ])
    assert [r["metric"] for r in lines_of(results_file("s1"))] == ["a", "b"]
    assert out[1]["params"] == {"k": 1}
    with pytest.raises(ValueError, match="'c'"):
        results.record_many([
            {"study": "s1", "metric": "ok", "value": 1.0, "unit": "ms"},
            {"study": "s1", "metric": "c", "value": math.nan, "unit": "ms"},
        ])
    assert len(lines_of(results_file("s1"))) == 2
    with pytest.raises(ValueError, match=r"records\[0\]"):
        results.record_many([{"study": "s1", "metric": "x", "value": 1.0, "unit": "ms", "z": 1}])


def test_latest_keeps_newest_per_configuration() -> None:
    record("s1", "latency", 1.0, "ms", params={"n": 1})
    record("s1", "latency", 2.0, "ms", params={"n": 1})
    record("s1", "latency", 5.0, "ms", params={"n": 2})
    record("s1", "memory", 7.0, "MB", params={"n": 1})
    df = load_results("s1")
    newest = results.latest(df, metric="latency")
    assert sorted(newest["value"]) == [2.0, 5.0]
    assert len(results.latest(df)) == 3
    with pytest.raises(ValueError, match="no column"):
        results.latest(df, colour="red")


def _append_many(root: str, start: int) -> None:
    """A child's ten appends; module-level, so a "spawn" child can import it by name."""
    os.environ["LABKIT_ROOT"] = root
    for i in range(start, start + 10):
        record("concurrent", "i", i, "count")


def test_concurrent_appends_lose_nothing(lab_root: Path) -> None:
    record("concurrent", "i", -1, "count")  # the fingerprint file first: the children find it
    # spawn, not fork: forking after torch, Accelerate and the Objective-C runtime are loaded is
    # unsafe on macOS (and deprecated in a threaded process from Python 3.12)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(lab_root), s)) for s in (0, 100)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)  # a spawned child imports afresh (torch too, for the fingerprint)
        assert p.exitcode == 0
    values = sorted(r["value"] for r in lines_of(results_file("concurrent")))
    assert values == [-1, *range(10), *range(100, 110)]
