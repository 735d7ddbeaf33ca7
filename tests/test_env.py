"""labkit.core.env: device choice, fingerprint and machine id, bandwidth probe, optional runtimes."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from labkit.core import env


@pytest.fixture(autouse=True)
def fresh_fingerprint() -> Iterator[None]:
    """Each test computes the fingerprint anew, so monkeypatched probes take effect."""
    env._fingerprint.cache_clear()
    yield
    env._fingerprint.cache_clear()


def _fake_devices(monkeypatch: pytest.MonkeyPatch, *, mps: bool, cuda: bool, count: int = 1) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count if cuda else 0)


# --------------------------------------------------------------------------- pick_device


@pytest.mark.parametrize(
    ("mps", "cuda", "expected"),
    [(False, False, "cpu"), (False, True, "cuda"), (True, False, "mps"), (True, True, "mps")],
)
def test_auto_prefers_mps_then_cuda_then_cpu(
    monkeypatch: pytest.MonkeyPatch, mps: bool, cuda: bool, expected: str
) -> None:
    _fake_devices(monkeypatch, mps=mps, cuda=cuda)
    assert env.pick_device() == expected
    assert env.pick_device("auto") == expected


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:", "cuda:x", "", "metal", None, 0])
def test_pick_device_refuses_unknown_names(bad: object) -> None:
    with pytest.raises(ValueError, match=r"device must be one of .*'cpu'.*'mps'"):
        env.pick_device(bad)  # type: ignore[arg-type]


def test_pick_device_explicit_unavailable_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_devices(monkeypatch, mps=False, cuda=False)
    assert env.pick_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match=r"device='cuda'.*no CUDA device"):
        env.pick_device("cuda")
    with pytest.raises(RuntimeError, match=r"device='mps'.*"):
        env.pick_device("mps")


def test_pick_device_checks_cuda_index(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_devices(monkeypatch, mps=False, cuda=True, count=1)
    assert env.pick_device("cuda") == "cuda"
    assert env.pick_device("cuda:0") == "cuda:0"
    with pytest.raises(RuntimeError, match=r"1 CUDA device"):
        env.pick_device("cuda:1")


def test_pick_device_mps_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_devices(monkeypatch, mps=True, cuda=False)
    assert env.pick_device("mps") == "mps"


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_fields_and_stable_id() -> None:
    first = env.fingerprint()
    env._fingerprint.cache_clear()  # recompute from scratch: the id must not depend on luck
    second = env.fingerprint()
    assert first["machine_id"] == second["machine_id"] == env.machine_id()
    assert re.fullmatch(r"[0-9a-f]{12}", first["machine_id"])
    for key in ("cpu", "cores_physical", "cores_logical", "ram_gb", "os", "system", "arch",
                "apple_chip", "gpu", "caches", "versions"):
        assert key in first
    assert set(first["versions"]) == {
        "python", "torch", "transformers", "numpy", "coremltools", "mlx", "xllamacpp", "llama.cpp",
        "swift",
    }
    assert first["versions"]["torch"] == torch.__version__
    assert first["versions"]["numpy"] is not None
    assert first["cores_logical"] >= 1
    assert first["ram_gb"] > 0


def test_fingerprint_returns_a_copy() -> None:
    info = env.fingerprint()
    info["versions"]["torch"] = "changed"
    info["cpu"] = "changed"
    assert env.fingerprint()["cpu"] != "changed"
    assert env.fingerprint()["versions"]["torch"] != "changed"


def test_machine_id_ignores_library_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    before = env.machine_id()
    env._fingerprint.cache_clear()
    monkeypatch.setattr(env, "_dist_version", lambda name: "99.0")
    assert env.fingerprint()["versions"]["torch"] == "99.0"
    assert env.machine_id() == before


def test_machine_id_changes_with_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    before = env.machine_id()
    env._fingerprint.cache_clear()
    monkeypatch.setattr(env, "_cpu_model", lambda: "Some Other CPU 9000")
    assert env.machine_id() != before


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Swift version 6.3.1 (swift-6.3.1-RELEASE)\nTarget: x86_64-unknown-linux-gnu", "6.3.1"),
        ("swift-driver version: 1.115 Apple Swift version 6.0.3 (swiftlang-6.0.3.1.10 "
         "clang-1600.0.30.1)\nTarget: arm64-apple-macosx15.0", "6.0.3"),
        ("command not found", None),
    ],
)
def test_parse_swift_version(text: str, expected: str | None) -> None:
    assert env.parse_swift_version(text) == expected


def test_git_revision(tmp_path: Path) -> None:
    assert env.git_revision(tmp_path) == "unknown"  # not a repository
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    assert env.git_revision(tmp_path) == "unknown"  # no commit yet
    (tmp_path / "f.txt").write_text("a")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert env.git_revision(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("ignored by the dirty check")
    assert env.git_revision(tmp_path) == head
    (tmp_path / "f.txt").write_text("b")
    assert env.git_revision(tmp_path) == f"{head}+dirty"


def test_a_runs_own_outputs_do_not_make_the_tree_dirty(tmp_path: Path) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    for rel in ("labkit/x.py", "data/results/s/m.jsonl", "figures/f.svg", "docs/index.html"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("a")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    head = env.git_revision(tmp_path)
    for rel in ("data/results/s/m.jsonl", "figures/f.svg", "docs/index.html"):
        (tmp_path / rel).write_text("written by the run")
    assert env.git_revision(tmp_path) == head  # a reproduce run writes these: still clean
    (tmp_path / "labkit/x.py").write_text("edited code")
    assert env.git_revision(tmp_path) == f"{head}+dirty"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("32K", 32768), ("1024K\n", 2**20), ("8M", 8 * 2**20), ("65536", 65536), ("big", None)],
)
def test_parse_cache_size(text: str, expected: int | None) -> None:
    assert env._parse_cache_size(text) == expected


def test_cpu_cache_sizes_from_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env.platform, "system", lambda: "Linux")
    for i, (level, kind, size) in enumerate(
        [(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K"),
         (3, "Unified", "32768K")]
    ):
        folder = tmp_path / f"index{i}"
        folder.mkdir()
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    assert env.cpu_cache_sizes(tmp_path) == {"L1d": 48 * 1024, "L2": 2 * 2**20, "L3": 32 * 2**20}
    assert env.cpu_cache_sizes(tmp_path / "missing") == {}


def test_cpu_cache_sizes_on_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env.platform, "system", lambda: "Darwin")
    answers = {"hw.perflevel0.l1dcachesize": "131072", "hw.perflevel0.l2cachesize": "16777216"}
    monkeypatch.setattr(env, "_run", lambda cmd, timeout=10.0: answers.get(cmd[-1]))
    assert env.cpu_cache_sizes() == {"L1d": 131072, "L2": 16777216}  # Apple silicon: no L3


# --------------------------------------------------------------------------- bandwidth


def test_copy_bandwidth_small_sizes_positive() -> None:
    df = env.copy_bandwidth([16 * 1024, 64 * 1024], repeats=2)
    assert list(df.columns) == env.COPY_COLUMNS
    assert (df["gb_per_s_p90"] <= df["gb_per_s_best"]).all()  # the fastest round bounds them all
    assert df["size_bytes"].tolist() == [16 * 1024, 64 * 1024]
    for col in ("gb_per_s", "gb_per_s_p10", "gb_per_s_p90"):
        assert (df[col] > 0).all() and df[col].map(pd.notna).all()
    assert (df["gb_per_s_p10"] <= df["gb_per_s"]).all()
    assert (df["gb_per_s"] <= df["gb_per_s_p90"]).all()


def test_default_sizes_span_16kib_to_256mib() -> None:
    sizes = env.default_copy_sizes()
    assert sizes[0] == 16 * 1024 and sizes[-1] == 256 * 1024**2
    assert all(b == 2 * a for a, b in zip(sizes, sizes[1:], strict=False))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"sizes_bytes": []}, "sizes_bytes"), ({"sizes_bytes": [0]}, "sizes_bytes"),
     ({"sizes_bytes": [1.5]}, "sizes_bytes"), ({"sizes_bytes": [64], "repeats": 0}, "repeats")],
)
def test_copy_bandwidth_validates(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        env.copy_bandwidth(**kwargs)


def test_peak_copy_bandwidth_uses_buffers_beyond_the_caches() -> None:
    mib = 2**20
    df = pd.DataFrame({"size_bytes": [mib * k for k in (1, 16, 32, 64, 128, 256)],
                       "gb_per_s": [100.0, 60.0, 40.0, 12.0, 10.0, 11.0]})
    # LLC 32 MiB: sizes >= 32 MiB and >= 256/4 MiB -> 64, 128, 256 -> median of 12, 10, 11
    assert env.peak_copy_bandwidth_gbs(df, llc_bytes=32 * mib) == pytest.approx(11.0)
    # A 100 MiB LLC leaves 128 and 256 MiB -> median of 10, 11
    assert env.peak_copy_bandwidth_gbs(df, llc_bytes=100 * mib) == pytest.approx(10.5)
    # No cache known: the quarter-of-largest rule alone
    assert env.peak_copy_bandwidth_gbs(df, llc_bytes=0) == pytest.approx(11.0)
    small = df[df["size_bytes"] <= 64 * mib]
    assert env.peak_copy_bandwidth_gbs(small, llc_bytes=0) == pytest.approx(40.0)  # 16, 32, 64
    assert env.peak_copy_bandwidth_gbs(small, llc_bytes=32 * mib) == pytest.approx(26.0)
    with pytest.warns(UserWarning, match="not DRAM"):
        assert env.peak_copy_bandwidth_gbs(small, llc_bytes=512 * mib) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="size_bytes"):
        env.peak_copy_bandwidth_gbs(pd.DataFrame({"gb_per_s": [1.0]}))
    with pytest.raises(ValueError, match="empty"):
        env.peak_copy_bandwidth_gbs(df.iloc[:0])


def test_peak_copy_bandwidth_of_the_fastest_rounds() -> None:
    mib = 2**20
    df = pd.DataFrame({"size_bytes": [mib * k for k in (1, 64, 128, 256)],
                       "gb_per_s": [90.0, 12.0, 10.0, 11.0], "gb_per_s_best": [99.0, 20, 21, 22]})
    assert env.peak_copy_bandwidth_gbs(df, llc_bytes=32 * mib, column="gb_per_s_best") == 21.0
    assert env.dram_rows(df, llc_bytes=32 * mib)["size_bytes"].tolist() == [64 * mib, 128 * mib,
                                                                          256 * mib]
    with pytest.raises(ValueError, match="no column"):
        env.peak_copy_bandwidth_gbs(df, llc_bytes=0, column="gb_per_s_worst")


def test_peak_copy_bandwidth_defaults_to_this_machines_caches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(env, "cpu_cache_sizes", lambda: {"L1d": 32 * 1024, "L2": 2**20})
    df = pd.DataFrame({"size_bytes": [2**19, 2**20, 2**21], "gb_per_s": [90.0, 50.0, 20.0]})
    assert env.peak_copy_bandwidth_gbs(df) == pytest.approx(35.0)  # 1 MiB and 2 MiB rows


# --------------------------------------------------------------------------- optional runtimes

RUNTIMES = {"torch-cpu", "mps", "cuda", "coreml-predict", "mlx", "swift", "llama.cpp",
            "onnxruntime"}


def test_optional_runtimes_keys_and_values() -> None:
    reasons = env.optional_runtimes()
    assert set(reasons) == RUNTIMES
    assert reasons["torch-cpu"] is None  # torch is a core dependency
    for value in reasons.values():
        assert value is None or (isinstance(value, str) and value)


def test_optional_runtimes_reasons_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env.platform, "system", lambda: "Linux")
    monkeypatch.setattr(env, "_installed", lambda module: module == "torch")
    monkeypatch.setattr(env.shutil, "which", lambda name: None)
    _fake_devices(monkeypatch, mps=False, cuda=False)
    reasons = env.optional_runtimes()
    assert reasons["torch-cpu"] is None
    assert reasons["coreml-predict"] == "needs macOS (Core ML predictions run only on macOS)"
    assert reasons["mlx"] == "mlx not installed: pip install 'labkit[mlx]'"
    assert reasons["swift"].startswith("swift not on PATH")
    assert "no CUDA device" in reasons["cuda"]
    assert "macOS" in reasons["mps"]
    assert "pip install xllamacpp" in reasons["llama.cpp"]
    assert "labkit[onnx]" in reasons["onnxruntime"]


def test_optional_runtimes_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(env, "macos_version", lambda: (15, 1))  # Core ML states need 15
    monkeypatch.setattr(env, "swift_toolchain_reason", lambda: None)
    monkeypatch.setattr(env, "_installed", lambda module: True)
    monkeypatch.setattr(env.shutil, "which", lambda name: f"/usr/bin/{name}")
    _fake_devices(monkeypatch, mps=True, cuda=True)
    assert all(v is None for v in env.optional_runtimes().values())


def test_optional_runtimes_without_coremltools_on_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(env, "macos_version", lambda: (15, 1))
    monkeypatch.setattr(env, "_installed", lambda module: module != "coremltools")
    assert env.optional_runtimes()["coreml-predict"] == (
        "coremltools not installed: pip install 'labkit[coreml]'"
    )


def test_llamacpp_build_names_package_release_and_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The llama.cpp build (xllamacpp is a dependency): package, version, the llama.cpp release
    its version names, the source commit; read without importing the 100 MB extension."""
    import importlib.metadata
    import sys

    build = env.llamacpp_build()
    assert build is not None
    assert build["package"] == "xllamacpp"
    assert build["version"] == importlib.metadata.version("xllamacpp")
    assert build["llama.cpp"] == "b" + build["version"].rsplit(".", 1)[-1]
    assert build["commit"] is None or re.fullmatch(r"[0-9a-f]{12}", build["commit"])
    assert env.fingerprint()["versions"]["llama.cpp"] == build["llama.cpp"]
    code = ("import sys; from labkit.core import env; env.fingerprint(); env.llamacpp_build(); "
            "assert 'xllamacpp' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setattr(env, "_dist_version", lambda name: None)
    assert env.llamacpp_build() is None
