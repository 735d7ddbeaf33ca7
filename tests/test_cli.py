"""The `labkit` command: each subcommand parses, and bad input exits non-zero with a reason."""

from __future__ import annotations

import pytest

from labkit.lab import bench, cli


def test_info_prints_fingerprint_and_runtimes(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "optional runtimes" in out and "coreml-predict" in out


def test_bench_lists_every_registered_benchmark(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in bench.BENCHMARKS:
        assert name in out


def test_bench_unknown_name_and_unaccepted_flag_fail(capsys):
    assert cli.main(["bench", "no-such-bench"]) == 2
    assert "unknown benchmark" in capsys.readouterr().out
    assert cli.main(["bench", "bandwidth", "--model", "tiny-llama"]) == 2
    assert "takes no --model" in capsys.readouterr().out


def test_every_benchmark_resolves_to_a_function():
    for name in bench.BENCHMARKS:
        assert callable(bench.resolve(name)), name


def test_train_arguments_pass_through(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_reproduce_with_no_match_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_ROOT", str(tmp_path))
    (tmp_path / "notebooks").mkdir()
    assert cli.main(["reproduce", "--only", "99"]) == 2
