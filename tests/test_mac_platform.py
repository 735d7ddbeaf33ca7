"""The macOS logic that Linux can check, with the platform faked: version parsing, the pre-flight,
the machine id, Core ML's and Swift's version gates, BLAS threads, torch.compile's OpenMP, the
OpenMP guard (and where the lab calls it), the Apple DRAM floor, per-device tolerances and speed
claims.

Nothing here needs a Mac: ``platform.system`` / ``platform.mac_ver`` / subprocess answers are
monkeypatched. What only a Mac can check is in the other ``tests/test_mac_*.py`` files, skipped
here with "needs macOS N"; the last test runs them off a Mac and holds them to that.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from labkit.core import env, preflight, tolerances
from labkit.core.paths import root

PREFLIGHT = Path(preflight.__file__)


@pytest.fixture(autouse=True)
def fresh_fingerprint():
    env._fingerprint.cache_clear()
    yield
    env._fingerprint.cache_clear()


def _mac(monkeypatch: pytest.MonkeyPatch, version: str = "15.1") -> None:
    monkeypatch.setattr(env.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(env.platform, "mac_ver", lambda: (version, ("", "", ""), "arm64"))


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(("text", "version"), [
    ("15.1.1", (15, 1, 1)), ("14", (14,)), (" 6.0.3 ", (6, 0, 3)), ("", None), (None, None),
    ("Xcode 16", None), ("16.2 (16C5032a)", (16, 2)),
])
def test_parse_version(text, version) -> None:
    assert preflight.parse_version(text) == version


def test_macos_version_from_mac_ver(monkeypatch: pytest.MonkeyPatch) -> None:
    _mac(monkeypatch, "14.5")
    assert env.macos_version() == (14, 5)
    assert env.macos_at_least((14, 0)) and not env.macos_at_least((15, 0))


def test_macos_version_asks_sw_vers_when_python_sees_the_compat_answer(monkeypatch) -> None:
    _mac(monkeypatch, "10.16")  # a Python built against an old SDK
    asked = []

    def output(cmd, env=None):
        asked.append((cmd, env and env.get("SYSTEM_VERSION_COMPAT")))
        return "15.2"

    monkeypatch.setattr(preflight, "_output", output)
    assert preflight.macos_version() == (15, 2)
    assert asked == [(["/usr/bin/sw_vers", "-productVersion"], "0")]


def test_macos_version_is_none_off_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(env.platform, "system", lambda: "Linux")
    assert env.macos_version() is None and not env.macos_at_least((10, 0))


# --------------------------------------------------------------------------- the pre-flight


def _facts(**kw) -> preflight.Facts:
    base = dict(system="Darwin", machine="arm64", python=(3, 11, 7), executable="/opt/homebrew/bin/python3.11",
                macos=(15, 1), apple_silicon=True)
    return preflight.Facts(**{**base, **kw})


def _by_check(findings: list[preflight.Finding]) -> dict[str, preflight.Finding]:
    return {f.check: f for f in findings}


def test_preflight_passes_a_supported_mac_and_this_machine() -> None:
    assert all(f.level == "ok" for f in preflight.check(_facts()))
    assert all(f.level == "ok" for f in preflight.check(_facts(macos=(14, 0))))
    assert preflight.run().can_set_up  # this box: Linux, Python 3.11


def test_preflight_stops_apples_python_39_with_a_better_one() -> None:
    apple = _facts(python=(3, 9, 6), executable="/usr/bin/python3")
    python = _by_check(preflight.check(apple))["python"]
    assert python.level == "stop" and "Command Line Tools" in python.found and "3.10-3.12" in python.found
    assert python.fix == "brew install python@3.12 && make setup PYTHON=/opt/homebrew/bin/python3.12"
    better = _by_check(preflight.check(apple, ["/opt/homebrew/bin/python3.12"]))["python"]
    assert better.fix == "make setup PYTHON=/opt/homebrew/bin/python3.12"
    assert not preflight.Report(preflight.check(apple)).can_set_up


def test_preflight_stops_an_x86_64_python_on_apple_silicon() -> None:
    rosetta = _facts(machine="x86_64", translated=True, executable="/usr/local/bin/python3.11")
    arch = _by_check(preflight.check(rosetta))["arch"]
    assert arch.level == "stop" and "Rosetta" in arch.found
    assert arch.fix == "/opt/homebrew/bin/brew install python@3.12 && make setup PYTHON=/opt/homebrew/bin/python3.12"
    universal = _by_check(preflight.check(_facts(machine="x86_64", translated=True, universal=True)))
    assert universal["arch"].fix == "arch -arm64 make setup"  # python.org's universal2 binary
    assert _by_check(preflight.check(rosetta, ["/opt/homebrew/bin/python3.12"]))["arch"].fix == (
        "make setup PYTHON=/opt/homebrew/bin/python3.12")


def test_preflight_stops_intel_macs_and_old_macos() -> None:
    intel = _by_check(preflight.check(_facts(machine="x86_64", apple_silicon=False)))["arch"]
    assert intel.level == "stop" and "2.2.2" in intel.found
    old = _by_check(preflight.check(_facts(macos=(13, 6))))["os"]
    assert old.level == "stop" and "macOS 14+" in old.found and "Software Update" in old.fix


def test_preflight_warns_on_new_pythons_and_stops_without_venv() -> None:
    new = _by_check(preflight.check(_facts(python=(3, 13, 1))))["python"]
    assert new.level == "warn"
    assert preflight.Report(preflight.check(_facts(python=(3, 13, 1)))).can_set_up
    linux = _facts(system="Linux", machine="x86_64", macos=None, apple_silicon=False, has_venv=False,
                   python=(3, 11, 2))
    venv = _by_check(preflight.check(linux))["venv"]
    assert venv.level == "stop" and venv.fix == "sudo apt-get install python3.11-venv"


def test_preflight_facts_on_a_faked_rosetta_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    _mac(monkeypatch, "15.1")
    monkeypatch.setattr(preflight.platform, "machine", lambda: "x86_64")
    answers = {"hw.optional.arm64": "1", "sysctl.proc_translated": "1"}
    monkeypatch.setattr(preflight, "sysctl", answers.get)
    monkeypatch.setattr(preflight, "_output", lambda cmd, env=None: "x86_64 arm64")  # lipo -archs
    facts = preflight.Facts.here()
    assert facts.apple_silicon and facts.translated and facts.universal and facts.macos == (15, 1)
    assert _by_check(preflight.check(facts))["arch"].level == "stop"


def test_preflight_is_standalone_and_parses_as_python_38() -> None:
    """make setup runs it with Apple's 3.9 (or Ubuntu 20.04's 3.8) before any dependency exists."""
    tree = ast.parse(PREFLIGHT.read_text(), feature_version=(3, 8))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    # no site-packages at all (-S -I): what a bare system Python has
    done = subprocess.run([sys.executable, "-S", "-I", str(PREFLIGHT)], capture_output=True, text=True)
    assert done.returncode == 0 and "ok   python" in done.stdout, done.stdout + done.stderr


def test_preflight_stops_a_real_python_39() -> None:
    old = shutil.which("python3.9") and subprocess.run(
        ["python3.9", "-c", "print(1)"], capture_output=True).returncode == 0
    exe = "python3.9" if old else next((str(p) for p in Path.home().glob(".pyenv/versions/3.9*/bin/python3.9")), None)
    if not exe:
        pytest.skip("no Python 3.9 on this machine (pyenv install 3.9 to run this)")
    done = subprocess.run([exe, str(PREFLIGHT)], capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "STOP python Python 3.9" in done.stdout and "fix: " in done.stdout


def test_makefile_runs_the_preflight_before_the_venv() -> None:
    text = (root() / "Makefile").read_text()
    recipe = text.split("$(STAMP): pyproject.toml requirements-nodeps.txt\n", 1)[1]
    assert recipe.index("labkit/core/preflight.py") < recipe.index("-m venv")


# --------------------------------------------------------------------------- the machine id

_IOREG = '''+-o AGXAcceleratorG14X  <class AGXAcceleratorG14X, id 0x1000003c1, registered>
    {
      "model" = "Apple M2 Pro"
      "gpu-core-count" = 19
      "IOClass" = "AGXAcceleratorG14X"
    }'''


def _fake_mac_hardware(monkeypatch: pytest.MonkeyPatch, gpu_cores: int = 19, perf=(8, 4)) -> list:
    _mac(monkeypatch)
    calls: list[list[str]] = []
    answers = {"machdep.cpu.brand_string": "Apple M2 Pro", "hw.perflevel0.physicalcpu": str(perf[0]),
               "hw.perflevel1.physicalcpu": str(perf[1]), "hw.perflevel0.l1dcachesize": "131072",
               "hw.perflevel0.l2cachesize": "16777216"}

    def run(cmd, timeout=10.0):
        calls.append(cmd)
        if cmd[0].endswith("ioreg"):
            return _IOREG.replace("19", str(gpu_cores))
        return answers.get(cmd[-1])

    monkeypatch.setattr(env, "_run", run)
    return calls


def test_parse_gpu_cores() -> None:
    assert env.parse_gpu_cores(_IOREG) == 19
    assert env.parse_gpu_cores("") is None and env.parse_gpu_cores(None) is None


def test_mac_fingerprint_has_gpu_cores_and_the_core_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_mac_hardware(monkeypatch)
    fp = env.fingerprint()
    assert fp["apple_chip"] == "Apple M2 Pro" and fp["gpu"] == "Apple GPU, 19 cores"
    assert (fp["gpu_cores"], fp["cores_performance"], fp["cores_efficiency"]) == (19, 8, 4)
    sysctls = [c for c in calls if "sysctl" in c[0]]
    assert sysctls and all(c[0] == "/usr/sbin/sysctl" for c in sysctls), "sysctl by its full path"


def test_two_macs_that_differ_only_in_gpu_cores_get_two_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mac_hardware(monkeypatch, gpu_cores=24)
    small = env.machine_id()
    env._fingerprint.cache_clear()
    _fake_mac_hardware(monkeypatch, gpu_cores=32)
    assert env.machine_id() != small
    env._fingerprint.cache_clear()
    _fake_mac_hardware(monkeypatch, gpu_cores=32, perf=(10, 4))
    assert len({small, env.machine_id()}) == 2


def test_the_mac_id_does_not_depend_on_torchs_mps_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    _fake_mac_hardware(monkeypatch)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with_mps = env.machine_id()
    env._fingerprint.cache_clear()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert env.machine_id() == with_mps


def _id_before_mac_fields(info: dict) -> str:
    """The machine id as it was computed before the macOS fields existed (written out here)."""
    keys = ("cpu", "cores_physical", "cores_logical", "ram_gb", "system", "arch", "apple_chip", "gpu")
    identity = {k: info.get(k) for k in keys}
    identity["ram_gb"] = round(identity["ram_gb"]) if identity["ram_gb"] is not None else None
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


@pytest.mark.skipif(platform.system() != "Linux", reason="Linux machines' ids")
def test_linux_machine_ids_do_not_change() -> None:
    fp = env.fingerprint()
    assert fp["system"] == "Linux", "run on Linux"
    assert "gpu_cores" not in fp and env.machine_id() == _id_before_mac_fields(fp)
    for path in sorted((root() / "data" / "results" / "machines").glob("*.json")):
        if path.name.count(".") == 1:  # <id>.json: a fingerprint
            stored = json.loads(path.read_text())
            if stored.get("system") != "Darwin":
                assert env.hardware_id(stored) == stored["machine_id"] == path.stem, path


# --------------------------------------------------------------------------- Apple DRAM floor


def test_dram_rows_on_apple_silicon_skip_the_system_level_cache(monkeypatch) -> None:
    import pandas as pd

    monkeypatch.setattr(env, "_apple_chip", lambda: "Apple M2 Max")
    monkeypatch.setattr(env, "cpu_cache_sizes", lambda: {"L1d": 131072, "L2": 16 * 2**20})
    df = pd.DataFrame({"size_bytes": [2**k for k in range(24, 29)], "gb_per_s": [1.0] * 5})
    assert env.dram_rows(df)["size_bytes"].min() == env.APPLE_DRAM_MIN_BYTES  # 128 MiB and up
    monkeypatch.setattr(env, "_apple_chip", lambda: None)
    assert env.dram_rows(df)["size_bytes"].min() == 64 * 2**20  # a quarter of the largest


# --------------------------------------------------------------------------- Core ML gates


@pytest.mark.parametrize(("version", "runs"), [
    ("13.6", ""), ("14.5", "ab"), ("15.0", "abcdef"), ("26.1", "abcdef"),
])
def test_coreml_steps_run_from_the_macos_they_need(monkeypatch, version: str, runs: str) -> None:
    pytest.importorskip("coremltools")
    from labkit.export import coreml as cx

    _mac(monkeypatch, version)
    for step in cx.STEPS:
        reason = cx.coreml_unavailable(step)
        assert (reason is None) == (step in runs), (version, step, reason)
        if reason:
            assert reason.startswith(f"needs macOS {'15.0' if step in cx.STATEFUL else '14.0'}")
            assert "Software Update" in reason
    whole = cx.coreml_unavailable()
    assert (whole is None) == (runs == "abcdef")


def test_coreml_gates_off_macos_and_without_coremltools(monkeypatch) -> None:
    from labkit.runtimes.coreml_rt import CoreML

    monkeypatch.setattr(env.platform, "system", lambda: "Linux")
    assert CoreML.available().startswith("needs macOS")
    _mac(monkeypatch, "14.6")
    assert "needs macOS 15.0 (Core ML states" in CoreML.available()
    _mac(monkeypatch, "15.1")
    monkeypatch.setattr(env, "_installed", lambda module: module != "coremltools")
    assert CoreML.available() == "coremltools not installed: pip install 'labkit[coreml]'"


def test_the_ladder_targets_macos14_where_it_can() -> None:
    pytest.importorskip("coremltools")
    from labkit.export import coreml as cx

    assert {s: cx.DEPLOYMENT[s] for s in "ab"} == {"a": "macOS14", "b": "macOS14"}
    assert all(cx.DEPLOYMENT[s] == "iOS18" for s in cx.STATEFUL)
    assert cx.MIN_MACOS["c"] == env.COREML_STATEFUL_MACOS
    with pytest.raises(ValueError, match="step must be one of"):
        cx.coreml_unavailable("z")


# --------------------------------------------------------------------------- Swift gates


def _swift(monkeypatch, version: str | None, xcode: dict | None = None) -> None:
    _mac(monkeypatch)
    monkeypatch.setattr(env.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(env, "swift_version", lambda: version)
    monkeypatch.setattr(env, "xcode_info", lambda: xcode or {})


def test_the_swift_shim_is_not_proof_of_swift_6(monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.ports import swift

    _swift(monkeypatch, "5.10")
    reason = swift.available()
    assert reason.startswith("needs Swift 6.0+") and "Xcode 16" in reason and "5.10" in reason
    _swift(monkeypatch, None, {"license_ok": False})
    assert swift.available() == "the Xcode licence is not accepted: sudo xcodebuild -license accept"
    _swift(monkeypatch, None, {"license_ok": True})
    assert "xcode-select --install" in swift.available()
    _swift(monkeypatch, "6.0.3")
    assert swift.available() is None  # Accelerate ships with macOS


def test_swift_test_needs_xctest_from_a_full_xcode(monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.ports import swift

    clt = {"developer_dir": "/Library/Developer/CommandLineTools", "xctest": False, "xcode": None,
           "xcode_app": None}
    _swift(monkeypatch, "6.0.3", clt)
    reason = swift.xctest_unavailable()
    assert reason.startswith("needs Xcode 16+ (XCTest is not in the Command Line Tools")
    assert "sudo xcode-select -s /Applications/Xcode.app/Contents/Developer" in reason
    with pytest.raises(RuntimeError, match="XCTest"):
        swift.swift_test("/nowhere")
    # Xcode 16 installed but the Command Line Tools selected: swift test points DEVELOPER_DIR at it
    _swift(monkeypatch, "6.0.3", {**clt, "xcode": "16.2", "xcode_app": "/Applications/Xcode.app"})
    monkeypatch.delenv("DEVELOPER_DIR", raising=False)
    assert swift.xctest_unavailable() is None
    assert swift._developer_env()["DEVELOPER_DIR"] == "/Applications/Xcode.app/Contents/Developer"
    _swift(monkeypatch, "6.0.3", {**clt, "xcode": "15.4", "xcode_app": "/Applications/Xcode.app"})
    assert "found Xcode 15.4" in swift.xctest_unavailable()


def test_package_swift_declares_the_tools_version_env_checks() -> None:
    from labkit.ports import swift

    first = (swift.SWIFT_DIR / "Package.swift").read_text().splitlines()[0]
    assert preflight.parse_version(first.split(":")[-1]) == env.SWIFT_TOOLS_MIN, first


def _fake_cli(monkeypatch, info: dict) -> dict:
    from labkit.ports import swift

    seen: dict = {}

    def run_measured(cmd, environ, timeout):
        seen.update(cmd=cmd, env=environ)
        return 0, json.dumps(info) + "\n", "", 123456

    monkeypatch.setattr(swift, "build", lambda release=True: Path("/fake/lmport"))
    monkeypatch.setattr(swift, "_run_measured", run_measured)
    return seen


def test_accelerate_gets_its_thread_count_through_veclib(monkeypatch, tmp_path: Path) -> None:
    from labkit.ports import swift

    (tmp_path / "config.json").write_text("{}")
    info = {"prompt_tokens": [1], "tokens": [2], "prefill_s": 0.1, "decode_s": 0.2, "load_s": 0.0,
            "blas": "Accelerate", "note": "Accelerate chooses its own thread count; --threads 3 was not applied"}
    seen = _fake_cli(monkeypatch, info)
    r = swift.run(tmp_path, [1], 1, threads=3)
    assert seen["env"]["VECLIB_MAXIMUM_THREADS"] == "3" and seen["env"]["OPENBLAS_NUM_THREADS"] == "3"
    assert "--threads" in seen["cmd"]
    assert r.threads == 3 and "VECLIB_MAXIMUM_THREADS" in r.note and r.peak_rss_bytes == 123456
    seen = _fake_cli(monkeypatch, {**info, "blas": "OpenBLAS", "note": None, "blas_threads": 2})
    r = swift.run(tmp_path, [1], 1, threads=2)
    assert r.threads == 2 and r.note is None


def test_the_cli_peak_is_its_own_process(tmp_path: Path) -> None:
    from labkit.ports import swift

    code, out, err, peak = swift._run_measured([sys.executable, "-c", "print('hi')"], {}, 30)
    assert (code, out, err) == (0, "hi\n", "") and peak > 2**20
    with pytest.raises(subprocess.TimeoutExpired):
        swift._run_measured([sys.executable, "-c", "import time; time.sleep(30)"], {}, 0.5)


# --------------------------------------------------------------------------- torch.compile, OpenMP


def test_torch_compile_says_brew_install_libomp_on_a_mac(monkeypatch, tmp_path: Path) -> None:
    from labkit.runtimes import torch_rt

    monkeypatch.setattr(torch_rt, "_BREW_LIBOMP", (str(tmp_path / "nobrew"),))
    reason = torch_rt.macos_openmp_missing({}, "Darwin")
    assert reason is not None and "brew install libomp" in reason
    (tmp_path / "omp" / "include").mkdir(parents=True)
    (tmp_path / "omp" / "include" / "omp.h").write_text("")
    assert torch_rt.macos_openmp_missing({"OMP_PREFIX": str(tmp_path / "omp")}, "Darwin") is None
    assert torch_rt.macos_openmp_missing({"CXX": "/opt/homebrew/bin/g++-14"}, "Darwin") is None
    assert torch_rt.macos_openmp_missing({}, "Linux") is None
    monkeypatch.setattr(torch_rt, "macos_openmp_missing", lambda: "brew install libomp")
    assert torch_rt.TorchCompile.available() == "brew install libomp"
    assert torch_rt.TorchEager.available() is None


def _wheels(folder: Path, names: list[str]) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    return folder


def test_openmp_guard_allows_the_duplicate_libomp_on_macos_only(monkeypatch, tmp_path: Path) -> None:
    mac = _wheels(tmp_path / "mac", ["torch/lib/libomp.dylib", "sklearn/.dylibs/libomp.dylib",
                                      "faiss/.dylibs/libomp.dylib", "numpy/.dylibs/libopenblas.dylib"])
    libs = env.openmp_libraries([mac], "Darwin")
    assert [p.relative_to(mac).as_posix() for p in libs] == [
        "faiss/.dylibs/libomp.dylib", "sklearn/.dylibs/libomp.dylib", "torch/lib/libomp.dylib"]
    assert env.openmp_clash(libs, "Darwin") and not env.openmp_clash(libs[:1], "Darwin")
    linux = _wheels(tmp_path / "linux", ["torch/lib/libgomp.so.1", "faiss_cpu.libs/libgomp-e985.so.1.0.0"])
    assert len(env.openmp_libraries([linux], "Linux")) == 2
    assert not env.openmp_clash(env.openmp_libraries([linux], "Linux"), "Linux")

    monkeypatch.delenv(env.OPENMP_ENV, raising=False)
    monkeypatch.setattr(env, "openmp_libraries", lambda: libs)
    monkeypatch.setattr(env.platform, "system", lambda: "Linux")
    assert env.openmp_guard() is None and env.OPENMP_ENV not in env.os.environ
    monkeypatch.setattr(env.platform, "system", lambda: "Darwin")
    assert "3 libomp copies" in env.openmp_guard()
    assert env.os.environ[env.OPENMP_ENV] == "TRUE"


def test_faiss_and_scikit_learn_are_imported_behind_the_openmp_guard(monkeypatch) -> None:
    """Not only conftest: notebooks 10 and 03 import faiss and scikit-learn beside torch with no
    pytest around, so the lab's own first imports run the guard (and faiss one thread on a Mac)."""
    from labkit.quant import palettize
    from labkit.studies import rag_on_device as rag

    calls: list[str] = []
    monkeypatch.setattr(env, "openmp_guard", lambda: calls.append("guard"))
    index = SimpleNamespace(add=lambda vectors: calls.append("add"), ntotal=2)
    fake_faiss = SimpleNamespace(IndexFlatIP=lambda dim: index,
                                 omp_set_num_threads=lambda n: calls.append(f"faiss threads {n}"))
    monkeypatch.setitem(sys.modules, "faiss", fake_faiss)
    monkeypatch.setattr(env.platform, "system", lambda: "Linux")
    rag.FaissIndex(np.eye(2, dtype=np.float32))
    assert calls == ["guard", "add"]  # Linux: faiss keeps its threads
    calls.clear()
    _mac(monkeypatch)
    rag.FaissIndex(np.eye(2, dtype=np.float32))
    assert calls == ["guard", "faiss threads 1", "add"]

    calls.clear()  # a fresh once-per-process import of KMeans, so this test sees it
    monkeypatch.setattr(palettize, "_kmeans_class", functools.cache(palettize._kmeans_class.__wrapped__))
    lut, _ = palettize.kmeans_lut(np.array([0.0, 0.1, 5.0, 5.1], dtype=np.float32), 1)
    palettize.kmeans_lut(np.array([1.0, 2.0], dtype=np.float32), 1)
    assert calls == ["guard"]  # once per process, before scikit-learn's import
    assert sorted(lut.tolist()) == pytest.approx([0.05, 5.05])


# --------------------------------------------------------------------------- tolerances, claims


def test_device_kinds_and_per_device_bounds() -> None:
    assert [tolerances.device_kind(d) for d in ("cpu", "cuda:1", "mps", "gpu", "Metal")] == [
        "cpu", "cuda", "mps", "mps", "mps"]
    with pytest.raises(ValueError, match="unknown device"):
        tolerances.device_kind("tpu")
    assert tolerances.LONG_DECODE.at("mps") > tolerances.LONG_DECODE.at("cpu")
    assert tolerances.ATTENTION.at("cuda") == tolerances.ATTENTION.at("cpu") < tolerances.ATTENTION.at("mps")
    assert tolerances.EXACT.at("cpu") == 0 < tolerances.EXACT.at("mps")
    for name in dir(tolerances):
        value = getattr(tolerances, name)
        if isinstance(value, (tolerances.Tolerance, tolerances.SpeedClaim)):
            assert len(value.why) > 20, f"{name} needs a reason"


def test_speed_claims_are_asserted_where_physical_and_reported_elsewhere() -> None:
    claim = tolerances.CACHE_SPEEDUP
    assert claim.verdict("cpu", False) is False and claim.verdict("cpu", True) is True
    assert claim.verdict("mps", False) is None and claim.verdict("cuda:0", True) is None


def test_kv_cache_claims_report_speed_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd
    import torch

    from labkit.studies import kv_cache as ks

    monkeypatch.setattr(ks, "tensor_bytes", lambda _cache: 0)
    monkeypatch.setattr(ks, "kv_cache_bytes_for_config", lambda *_args: 0)
    timings = pd.DataFrame({"cache": ["on", "off"], "prompt_len": [8, 8], "total_s": [2.0, 1.0],
                            "tpot_ms": [5.0, 4.0]})  # the cache slower: a launch-bound GPU
    update = pd.DataFrame({"length": [64], "concat_us": [2.0], "inplace_us": [1.0]})
    kw = dict(equality={"tokens_identical": True, "logit_gap": 0.0}, dynamic={"gap": 5e-5, "steps": 4},
              bytes_check={"formula": 1, "real": 1, "shape": (1,), "expected_shape": (1,)},
              timings=timings, apple_bytes=int(1.07e9), model_cfg=None, window=4,
              variants_cfg={"MHA": None, "GQA": None, "MQA": None},
              variants={"update": update, "window_cache": None, "window_bytes": [0], "same_tokens": True,
                        "e2e": {"concat": (None, torch.zeros(3))}},
              versus={"same_tokens": True, "table": [1]})
    on_cpu, on_mps = ({c: ok for c, ok, _ in ks.claims(**kw, device=d)} for d in ("cpu", "mps"))
    speed = [c for c in on_cpu if "faster" in c or "slower" in c]
    assert speed and all(on_cpu[c] is False for c in speed)
    assert all(on_mps[c] is None for c in speed)
    gap_cpu = next(c for c in on_cpu if "DynamicCache" in c)
    gap_mps = next(c for c in on_mps if "DynamicCache" in c)
    assert on_cpu[gap_cpu] is False and on_mps[gap_mps] is True  # 5e-5: past 1e-5, within 1e-4


def test_flash_attention_bound_of_a_run() -> None:
    from labkit.studies import flash_attention as fa

    cpu = fa.Setup(1, 2, 8, True)
    assert fa.tolerance(cpu) == tolerances.ATTENTION.at("cpu") == fa.TOLERANCE
    assert fa.tolerance(fa.Setup(1, 2, 8, True, mlx_device="gpu")) == tolerances.ATTENTION.at("mps")
    assert fa.tolerance(fa.Setup(1, 2, 8, True, device="cuda")) == tolerances.ATTENTION.at("cuda")


def test_notebook_04_default_bound_is_the_other_runtime_tolerance() -> None:
    nb = json.loads((root() / "notebooks" / "04_swift_port_parity.ipynb").read_text())
    params = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    scope: dict = {}
    exec("".join(params["source"]), scope)  # noqa: S102 - the notebook's own parameters cell
    assert scope["LOGIT_TOL"] == tolerances.OTHER_RUNTIME.at("cpu")  # the Swift port runs on a CPU


# --------------------------------------------------------------------------- default devices


def test_embed_loads_minilm_on_the_cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from labkit.models import encoder, loader

    asked = {}

    def fake_load(name, **kw):
        asked.update(name=name, **kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(encoder, "_DEFAULT", None)
    monkeypatch.setattr(loader, "load", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        encoder.embed(["a"])
    assert asked == {"name": "minilm", "device": "cpu"}


#: Test files that still load models with the default device="auto" (MPS on a Mac, CUDA on a
#: GPU box) while building their inputs on the CPU; none left: every test names its device.
PENDING_CPU_LOADS: set[str] = set()


def _loads_without_device(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
             and n.module in ("labkit.models", "labkit.models.loader") for a in n.names if a.name == "load"}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
            and n.func.id in names and not any(k.arg == "device" for k in n.keywords)]


def test_tests_load_their_models_on_a_named_device() -> None:
    """device="auto" is MPS on a Mac: a test that then builds its inputs on the CPU fails there."""
    found = {p.name: lines for p in sorted(Path(__file__).parent.glob("test_*.py"))
             if (lines := _loads_without_device(p))}
    assert set(found) <= PENDING_CPU_LOADS, {k: v for k, v in found.items() if k not in PENDING_CPU_LOADS}
    fixed = PENDING_CPU_LOADS - set(found)
    assert not fixed, f"{fixed} load on a named device now: remove them from PENDING_CPU_LOADS"


# --------------------------------------------------------------------------- the Mac suite off a Mac

#: The tests only a Mac can run (each skipped elsewhere with what it needs)
MAC_SUITE = ("test_mac_coreml.py", "test_mac_mlx.py", "test_mac_mps.py", "test_mac_swift.py",
             "test_mac_system.py")


def _names_what_it_needs(reason: str) -> bool:
    """conftest.needs_macos' words ("needs macOS 14 on Apple silicon (...); this is Linux"), or a
    package the module cannot import, with its install line ("needs mlx: pip install ...")."""
    if reason.startswith("needs macOS ") and " on Apple silicon" in reason:
        return reason.endswith(f"; this is {platform.system()}")
    package = re.match(r"needs ([\w.-]+): pip install ", reason)
    return package is not None and importlib.util.find_spec(package[1].replace("-", "_")) is None


@pytest.mark.slow
@pytest.mark.skipif(platform.system() == "Darwin", reason="on a Mac the Mac suite runs for real")
def test_off_a_mac_the_mac_suite_skips_everything_and_says_what_it_needs() -> None:
    """Off a Mac nothing of the Mac suite may pass (it would check nothing of a Mac) or fail, and
    each skip must tell a reader what to get: macOS on Apple silicon, or the missing package."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--color=no",
         *(f"tests/{name}" for name in MAC_SUITE)],
        cwd=repo, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    outcomes = {word: int(n) for n, word in re.findall(r"(\d+) ([a-z]+)", last)}
    assert done.returncode == 0 and outcomes.get("skipped", 0) > 0, out
    assert set(outcomes) <= {"skipped", "warning", "warnings"}, out  # no passed, failed, xfailed...
    skips = re.findall(r"^SKIPPED \[(\d+)\] ([^\s:]+)(?::\d+)?: (.*)$", done.stdout, re.MULTILINE)
    assert sum(int(n) for n, _, _ in skips) == outcomes["skipped"], out
    assert {Path(path).name for _, path, _ in skips} == set(MAC_SUITE), out
    unclear = sorted({reason for _, _, reason in skips if not _names_what_it_needs(reason)})
    assert not unclear, unclear
