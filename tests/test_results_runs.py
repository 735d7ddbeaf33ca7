"""labkit.core.results runs: every record says which run made it, under what load, with how
many threads; select_runs gives a figure one complete clean run per machine, never a mix.

Every test writes under tmp_path through LABKIT_ROOT, never into the real data/results/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from labkit.core import env, paths, results
from labkit.core.results import LEGACY_RECORD_KEYS, RUN_KEYS, load_results, record


@pytest.fixture(autouse=True)
def lab_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    monkeypatch.delenv("LABKIT_OUTPUT_ROOT", raising=False)
    monkeypatch.delenv(results.RUN_ID_ENV, raising=False)
    monkeypatch.delenv(results.RUN_LOADAVG_ENV, raising=False)
    results._fingerprints_written.clear()
    results._git_rev_cache.clear()
    # a quiet machine, whatever this one is doing (tests that want load set it)
    monkeypatch.setattr(results, "loadavg", lambda: 0.1)
    monkeypatch.setattr(results, "_PROCESS_START_LOADAVG", 0.1)
    return tmp_path


def results_file(study: str, machine: str | None = None) -> Path:
    return paths.results_dir() / study / f"{machine or env.machine_id()}.jsonl"


def in_run(monkeypatch: pytest.MonkeyPatch, run_id: str, git_rev: str = "abc1234",
           loadavg_start: float = 0.1) -> None:
    """Make the next records belong to ``run_id`` at revision ``git_rev``."""
    monkeypatch.setenv(results.RUN_ID_ENV, run_id)
    monkeypatch.setenv(results.RUN_LOADAVG_ENV, repr(loadavg_start))
    monkeypatch.setattr(results, "_git_rev", lambda: git_rev)


def test_a_record_carries_its_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    rec = record("s1", "m", 1.0, "ms")
    assert tuple(rec)[-len(RUN_KEYS):] == RUN_KEYS
    assert rec["run_id"] == results.current_run()[0]
    assert rec["threads"] == torch.get_num_threads()
    assert record("s1", "m", 2.0, "ms", threads=3)["threads"] == 3
    assert record("s1", "m", 3.0, "ms")["run_id"] == rec["run_id"]  # one id per process
    with pytest.raises(ValueError, match="threads"):
        record("s1", "m", 1.0, "ms", threads=0)
    assert rec["loadavg"] == 0.1 and rec["loadavg_start"] == 0.1 and rec["noisy"] is False
    monkeypatch.setattr(results, "loadavg", lambda: 99.0)
    assert record("s1", "m", 4.0, "ms")["noisy"] is True  # others are busy now


def test_a_runner_hands_its_run_to_the_records(monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = results.start_run()
    try:
        assert results.run_env()[results.RUN_ID_ENV] == run_id
        rec = record("s1", "m", 1.0, "ms")
        assert rec["run_id"] == run_id
        assert results.start_run() != run_id  # every call is a new run
    finally:
        monkeypatch.delenv(results.RUN_ID_ENV)
    in_run(monkeypatch, "20260101T000000Z-abcdef", loadavg_start=7.5)
    rec = record("s1", "m", 1.0, "ms")
    assert rec["run_id"] == "20260101T000000Z-abcdef" and rec["loadavg_start"] == 7.5


def test_run_ids_sort_by_time() -> None:
    first, second = results.new_run_id(), results.new_run_id()
    assert len(first) == len(second) == len("20260101T000000Z-abcdef")
    assert first[:16] <= second[:16]


@pytest.mark.parametrize(
    ("start", "load", "threads", "cores", "noisy"),
    [(0.5, 2.5, 2, 2, False),   # our own two threads make the load
     (1.5, 2.5, 2, 2, True),    # busy when the run started
     (0.5, 4.0, 2, 2, True),    # others pile on during the run
     (0.5, 1.6, None, 2, False),
     (None, None, 1, 2, False),
     (9.0, 9.0, 1, None, False)],  # cores unknown: never noisy
)
def test_noisy_means_others_used_more_than_half_the_cores(start, load, threads, cores, noisy) -> None:
    assert results.is_noisy(start, load, threads, cores) is noisy


def test_a_busy_start_marks_the_records_noisy(monkeypatch: pytest.MonkeyPatch) -> None:
    in_run(monkeypatch, "busy", loadavg_start=99.0)
    assert record("s1", "m", 1.0, "ms")["noisy"] is True
    df = load_results("s1")
    assert df["run_noisy"].tolist() == [True]


def test_legacy_records_load_as_one_run_per_revision() -> None:
    record("s1", "m", 1.0, "ms")
    legacy = {k: v for k, v in record("s1", "m", 2.0, "ms").items() if k in LEGACY_RECORD_KEYS}
    with results_file("s1").open("a") as f:
        for rev in ("aaa1111+dirty", "aaa1111", "bbb2222"):
            f.write(json.dumps(dict(legacy, git_rev=rev)) + "\n")
    df = load_results("s1")
    old = df[df["run_id"].str.startswith(results.LEGACY_RUN_PREFIX)]
    assert sorted(old["run_id"]) == ["legacy-aaa1111", "legacy-aaa1111+dirty", "legacy-bbb2222"]
    assert old["dirty"].tolist() == [True, False, False]
    assert old["threads"].isna().all() and not old["run_noisy"].any()


def three_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """old (clean), new (clean), newest (dirty) on this machine; one run on another machine."""
    for run_id, rev, value in (("old", "a1", 1.0), ("new", "b2", 2.0), ("newest", "c3+dirty", 3.0)):
        in_run(monkeypatch, run_id, rev)
        record("s1", "m", value, "ms", params={"n": 1})
        record("s1", "m", value + 0.5, "ms", params={"n": 2})
    other = "feedbeef0000"
    row = dict(record("s1", "m", 9.0, "ms"), machine=other, run_id="theirs", git_rev="d4")
    results_file("s1", other).write_text(json.dumps(row) + "\n")
    (paths.results_dir() / "machines" / f"{other}.json").write_text('{"cpu": "Apple M2"}')
    # the last record() above belongs to "newest"; drop it so each run has its two records
    lines = results_file("s1").read_text().splitlines()[:-1]
    results_file("s1").write_text("\n".join(lines) + "\n")
    monkeypatch.delenv(results.RUN_ID_ENV)  # this test process is now a run of its own


def test_select_runs_takes_the_latest_clean_run_of_each_machine(monkeypatch) -> None:
    three_runs(monkeypatch)
    df = load_results("s1")
    chosen = results.select_runs(df)
    ours = chosen[chosen["machine"] == env.machine_id()]
    assert set(ours["run_id"]) == {"new"} and sorted(ours["value"]) == [2.0, 2.5]
    assert set(chosen[chosen["machine"] == "feedbeef0000"]["run_id"]) == {"theirs"}
    assert set(results.select_runs(df, include_dirty=True)["run_id"]) == {"newest", "theirs"}
    assert set(results.select_runs(df, run_id="old")["value"]) == {1.0, 1.5}
    assert set(results.load_run("s1")["run_id"]) == {"new", "theirs"}
    runs = results.runs_table(df)
    assert list(runs["run_id"]) == ["old", "new", "newest", "theirs"]
    assert runs.set_index("run_id")["dirty"].to_dict() == {
        "old": False, "new": False, "newest": True, "theirs": False}
    assert runs["records"].tolist() == [2, 2, 2, 1]


def test_noisy_runs_are_left_out_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    three_runs(monkeypatch)
    in_run(monkeypatch, "loud", "e5", loadavg_start=50.0)
    record("s1", "m", 7.0, "ms")
    monkeypatch.delenv(results.RUN_ID_ENV)
    df = load_results("s1")
    ours = results.select_runs(df)
    assert set(ours[ours["machine"] == env.machine_id()]["run_id"]) == {"loud"}
    quiet = results.select_runs(df, include_noisy=False)
    assert set(quiet[quiet["machine"] == env.machine_id()]["run_id"]) == {"new"}


def test_a_registered_run_counts_once_its_study_ended_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    three_runs(monkeypatch)
    in_run(monkeypatch, "registered", "f6")
    results.note_run("s1", "running")
    record("s1", "m", 5.0, "ms")
    monkeypatch.setenv(results.RUN_ID_ENV, "someone-else")  # not the current run any more
    ours = lambda d: set(d[d["machine"] == env.machine_id()]["run_id"])  # noqa: E731
    assert ours(results.select_runs(load_results("s1"))) == {"new"}  # still running: incomplete
    monkeypatch.setenv(results.RUN_ID_ENV, "registered")
    results.note_run("s1", "failed")
    monkeypatch.setenv(results.RUN_ID_ENV, "someone-else")
    assert ours(results.select_runs(load_results("s1"))) == {"new"}
    monkeypatch.setenv(results.RUN_ID_ENV, "registered")
    results.note_run("s1", "ok")
    registry = results.load_run_registry(env.machine_id())
    assert registry["registered"]["studies"]["s1"]["status"] == "ok"
    monkeypatch.setenv(results.RUN_ID_ENV, "someone-else")
    assert ours(results.select_runs(load_results("s1"))) == {"registered"}
    with pytest.raises(ValueError, match="status"):
        results.note_run("s1", "done")


def test_the_current_run_is_always_eligible(monkeypatch: pytest.MonkeyPatch) -> None:
    three_runs(monkeypatch)
    in_run(monkeypatch, "newest")  # this process is the dirty run
    df = load_results("s1")
    ours = results.select_runs(df)
    assert set(ours[ours["machine"] == env.machine_id()]["run_id"]) == {"newest"}
    strict = results.select_runs(df, current=False)
    assert set(strict[strict["machine"] == env.machine_id()]["run_id"]) == {"new"}


def test_select_runs_of_nothing_is_empty() -> None:
    (paths.results_dir() / "nothing").mkdir(parents=True)  # a study with no records yet
    df = load_results("nothing")
    assert results.select_runs(df).empty and results.runs_table(df).empty
    assert isinstance(results.runs_table(df), pd.DataFrame)


def test_bench_is_one_registered_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.lab import bench

    def fake_bench(quick: bool = False, model: str = "x") -> list[dict]:
        return [record("s1", "m", 1.0, "ms")]

    monkeypatch.setattr(bench, "BENCHMARKS", {"fake": "fake_module:fake_bench"})
    monkeypatch.setattr(bench.importlib, "import_module",
                        lambda name: type("M", (), {"fake_bench": staticmethod(fake_bench)}))
    run = bench.resolve("fake")
    import inspect

    assert list(inspect.signature(run).parameters) == ["quick", "model"]
    first = run(quick=True)[0]["run_id"]
    second = run(quick=True)[0]["run_id"]
    assert first != second
    registry = results.load_run_registry(env.machine_id())
    assert registry[first]["studies"]["*"]["status"] == "ok"
    assert set(results.select_runs(load_results("s1"), current=False)["run_id"]) == {second}
