"""labkit.core.files (the one atomic writer), core.checks and core.tolerances."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from labkit.core import checks, files, tolerances


def test_atomic_write_replaces_whole_file_and_is_world_readable(tmp_path) -> None:
    target = tmp_path / "a" / "out.json"
    files.atomic_write_json(target, {"x": 1})
    files.atomic_write_json(target, {"x": 2})
    assert target.read_text() == '{\n  "x": 2\n}\n'
    assert oct(target.stat().st_mode & 0o777) == oct(files.FILE_MODE)
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path) -> None:
    target = tmp_path / "out.txt"
    files.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_writer_that_writes_nothing_is_an_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no file"), files.atomic_path(tmp_path / "x"):
        pass
    assert not (tmp_path / "x").exists()


def test_json_refuses_nan_and_writes_nothing(tmp_path) -> None:
    with pytest.raises(ValueError):
        files.atomic_write_json(tmp_path / "r.json", {"v": float("nan")})
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_swaps_whole_folders(tmp_path) -> None:
    target = tmp_path / "model"
    with files.atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(KeyError), files.atomic_dir(target) as d:
        (d / "b").write_text("half")
        raise KeyError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with files.atomic_dir(target) as d:
        (d / "c").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan = tmp_path / f".results.jsonl.{int(dead.stdout)}.0123abcd.tmp"
    orphan.write_bytes(b"x" * 100)
    live = tmp_path / f".other.{os.getpid()}.89abcdef.tmp"  # our own: still being written
    live.write_text("mine")
    files.atomic_write_text(tmp_path / "results.jsonl", "ok\n")
    assert not orphan.exists()
    assert live.exists()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, None])
def test_positive_int_refuses(bad) -> None:
    with pytest.raises(ValueError, match=r"^KVCache: max_len must be a positive integer, got "):
        checks.positive_int(bad, "max_len", "KVCache")


def test_checks_accept_and_return() -> None:
    import numpy as np

    assert checks.positive_int(np.int64(3), "n") == 3
    assert checks.nonnegative_int(0, "n") == 0
    assert checks.finite_float(1e-5, "eps", positive=True) == 1e-5
    assert checks.one_of("cpu", "device", ["cpu", "mps"]) == "cpu"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1e-5", None, True])
def test_finite_float_refuses(bad) -> None:
    with pytest.raises(ValueError, match="rope_theta must be a finite number"):
        checks.finite_float(bad, "rope_theta", positive=True)


def test_finite_float_ranges() -> None:
    with pytest.raises(ValueError, match="must be > 0, got -10000"):
        checks.finite_float(-10000, "rope_theta", positive=True)
    with pytest.raises(ValueError, match="must be <= 1"):
        checks.finite_float(2, "p", maximum=1)


def test_one_of_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="device must be one of 'cpu', 'mps'; got 'gpu'"):
        checks.one_of("gpu", "device", ["cpu", "mps"])


def test_tolerances_per_device() -> None:
    assert tolerances.SAME_MATH.at("cpu") == 1e-5
    assert tolerances.SAME_MATH.at("mps") == 1e-4
    assert tolerances.SAME_MATH.at("cuda:0") == 1e-4
    assert tolerances.OTHER_RUNTIME.at("mps") == tolerances.OTHER_RUNTIME.at("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        tolerances.SAME_MATH.at("tpu")


def test_sha256_file_reads_in_blocks_and_matches_hashlib(tmp_path) -> None:
    import hashlib

    data = bytes(range(256)) * (5 * 2**12 + 7)  # more than one 1 MiB block, not a multiple
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert files.sha256_file(path) == hashlib.sha256(data).hexdigest()
