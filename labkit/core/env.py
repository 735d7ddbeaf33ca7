"""The machine we run on: device choice, hardware fingerprint, the copy-bandwidth staircase.

Why: every number the lab records depends on the hardware, so each record carries a machine id
and the machine's fingerprint is stored beside the results. The single-thread copy bandwidth over
buffer sizes shows the cache staircase (notebook 00); the roofline's denominator, the
multi-threaded read bandwidth, is :mod:`labkit.core.bandwidth`'s.

Heavy libraries (torch) are imported inside the functions that need them; optional ones
(coremltools, mlx, xllamacpp, onnxruntime) are only looked up, never imported, here.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labkit.core import preflight

if TYPE_CHECKING:
    import pandas as pd

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_ALLOWED_DEVICES = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"

# Distribution names whose versions the fingerprint reports (None where not installed).
_VERSIONED = ("torch", "transformers", "numpy", "coremltools", "mlx", "xllamacpp")

# The fingerprint fields that identify the hardware; library versions are left out on purpose so
# that upgrading torch keeps the machine id.
_IDENTITY_FIELDS = ("cpu", "cores_physical", "cores_logical", "ram_gb", "system", "arch",
                    "apple_chip", "gpu")
# On macOS only (so that no Linux id changes): two Macs with the same chip name, cores and RAM
# can differ in GPU cores (an M1 Max with 24 or 32) and performance/efficiency split.
_DARWIN_IDENTITY_FIELDS = ("gpu_cores", "cores_performance", "cores_efficiency")

#: Swift tools version swift/Package.swift declares (a test checks they agree): Xcode 16 / Swift 6
SWIFT_TOOLS_MIN = (6, 0)
#: Core ML states (``make_state``) and spec-9 packages (iOS18 target) load on macOS 15 only
COREML_STATEFUL_MACOS = (15, 0)


# --------------------------------------------------------------------------- device choice


def pick_device(device: str = "auto") -> str:
    """Resolve ``device`` to one torch can use here.

    ``"auto"`` picks ``"mps"`` (Apple GPU) if available, else ``"cuda"``, else ``"cpu"``. An
    explicit ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` is checked: a RuntimeError says why
    it cannot be used here rather than failing later inside a model.
    """
    if not isinstance(device, str) or not _DEVICE_PATTERN.match(device):
        raise ValueError(f"device must be one of {_ALLOWED_DEVICES}, got {device!r}")
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        if torch.backends.mps.is_available():
            return "mps"
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise RuntimeError(f"device='mps' requested but not available here: {_mps_reason()}")
        return "mps"
    # cuda or cuda:N
    if not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but not available here: {_cuda_reason()}")
    if ":" in device:
        index = int(device.split(":", 1)[1])
        count = torch.cuda.device_count()
        if index >= count:
            raise RuntimeError(
                f"device={device!r} requested but this machine has {count} CUDA device(s) "
                f"(indices 0..{count - 1})"
            )
    return device


def _mps_reason() -> str:
    if platform.system() != "Darwin":
        return f"needs macOS on Apple silicon (this is {platform.system()})"
    import torch

    if not torch.backends.mps.is_built():
        return f"this torch build ({torch.__version__}) has no MPS support"
    return "torch.backends.mps.is_available() is False (needs macOS 12.3+ on Apple silicon)"


def _cuda_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return f"no CUDA device (this torch build, {torch.__version__}, is CPU-only)"
    return "no CUDA device (torch.cuda.is_available() is False)"


# --------------------------------------------------------------------------- fingerprint


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    """stdout of ``cmd`` stripped, or None if it is missing, fails or hangs."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return (done.stdout or done.stderr).strip() or None


def _sysctl(key: str) -> str | None:
    """``sysctl -n key`` by its full path (/usr/sbin is not on PATH under some launchers)."""
    return _run([preflight.SYSCTL, "-n", key])


def _cpu_model() -> str | None:
    if platform.system() == "Darwin":
        return _sysctl("machdep.cpu.brand_string")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text(errors="replace")
        # x86 says "model name"; some ARM kernels only give "Hardware" or "Processor".
        for key in ("model name", "Hardware", "Processor", "cpu model"):
            match = re.search(rf"^{key}\s*:\s*(.+)$", text, flags=re.MULTILINE)
            if match:
                return match.group(1).strip()
    return platform.processor() or None


def _apple_chip() -> str | None:
    """'Apple M2 Pro' and the like on Apple silicon; None elsewhere (Intel Macs included)."""
    if platform.system() != "Darwin":
        return None
    brand = _sysctl("machdep.cpu.brand_string")
    return brand if brand and brand.startswith("Apple") else None


def _cores() -> tuple[int | None, int | None]:
    try:
        import psutil

        return psutil.cpu_count(logical=False), psutil.cpu_count(logical=True)
    except ImportError:
        return None, os.cpu_count()


def _ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def _gpu_name() -> str | None:
    """The CUDA device's name; on macOS the Apple GPU by its core count (from the hardware, not
    from torch: the same Mac must keep its id with and without an MPS-enabled torch)."""
    if platform.system() == "Darwin":
        cores = apple_gpu_cores()
        return f"Apple GPU, {cores} cores" if cores else None
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# --------------------------------------------------------------------------- macOS only


def parse_gpu_cores(ioreg: str | None) -> int | None:
    """The GPU core count in ``ioreg -rd1 -c AGXAccelerator`` output ("gpu-core-count" = 19)."""
    match = re.search(r'"gpu-core-count"\s*=\s*(\d+)', ioreg or "")
    return int(match.group(1)) if match else None


def apple_gpu_cores() -> int | None:
    """GPU cores of this Apple-silicon Mac (None elsewhere or where ioreg does not say)."""
    if platform.system() != "Darwin":
        return None
    return parse_gpu_cores(_run(["/usr/sbin/ioreg", "-rd1", "-c", "AGXAccelerator"]))


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() else None


def apple_hardware() -> dict[str, int | None]:
    """On macOS: GPU cores and the performance / efficiency core split (fingerprint fields)."""
    return {"gpu_cores": apple_gpu_cores(),
            "cores_performance": _int_or_none(_sysctl("hw.perflevel0.physicalcpu")),
            "cores_efficiency": _int_or_none(_sysctl("hw.perflevel1.physicalcpu"))}


def macos_version() -> tuple[int, ...] | None:
    """macOS's version, e.g. (15, 1); None off macOS (see :func:`preflight.macos_version`)."""
    return preflight.macos_version()


def macos_at_least(version: tuple[int, ...]) -> bool:
    """Whether this is macOS ``version`` or later (False off macOS)."""
    here = macos_version()
    return here is not None and tuple(here) >= tuple(version)


def _dotted(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "an unknown version"


def coreml_reason(minimum: tuple[int, ...] = COREML_STATEFUL_MACOS) -> str | None:
    """None where Core ML can run packages that need macOS ``minimum``, else why not.

    The stateful ladder steps (c-f) are spec 9 (iOS18 / macOS15 target): Core ML on macOS 14
    loads only spec 8 or older, and ``MLModel.make_state`` refuses below macOS 15.
    """
    if platform.system() != "Darwin":
        return f"needs macOS (Core ML predictions run only on macOS; this is {platform.system()})"
    if not macos_at_least(minimum):
        what = "Core ML states, spec 9 packages" if tuple(minimum) >= (15,) else "Core ML"
        return (f"needs macOS {_dotted(minimum)} ({what}); this is macOS {_dotted(macos_version())}: "
                "update macOS in System Settings > General > Software Update")
    if not _installed("coremltools"):
        return "coremltools not installed: pip install 'labkit[coreml]'"
    return None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_swift_version(text: str) -> str | None:
    """The version number in ``swift --version`` output (Linux and Apple toolchains)."""
    match = re.search(r"Swift version (\d+(?:\.\d+)*)", text)
    return match.group(1) if match else None


@functools.cache
def swift_version() -> str | None:
    """Version of the ``swift`` on PATH, or None. Asked once per process (with a timeout).

    On macOS without developer tools ``/usr/bin/swift`` would open the "install the Command Line
    Tools" dialog, so it is not run then (``xcode-select -p`` fails first).
    """
    if shutil.which("swift") is None:
        return None
    if platform.system() == "Darwin" and _developer_dir() is None:
        return None
    out = _run(["swift", "--version"], timeout=20.0)
    return parse_swift_version(out) if out else None


def _run_text(cmd: list[str], timeout: float = 20.0, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(exit status, stdout + stderr) of ``cmd``; (-1, "") when it is missing or hangs."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              env=env)
    except (OSError, subprocess.TimeoutExpired):
        return -1, ""
    return done.returncode, (done.stdout or "") + (done.stderr or "")


def _developer_dir() -> str | None:
    """``xcode-select -p``: the developer folder (Xcode's or the Command Line Tools'); None when
    macOS has no developer tools at all."""
    return _run(["/usr/bin/xcode-select", "-p"])


def xcode_app() -> Path | None:
    """The newest /Applications/Xcode*.app holding a developer folder (None without Xcode)."""
    apps = sorted(Path("/Applications").glob("Xcode*.app"), reverse=True)
    return next((a for a in apps if (a / "Contents" / "Developer").is_dir()), None)


def xcode_info() -> dict[str, Any]:
    """macOS developer tools: developer_dir (``xcode-select -p``), xcode (the Xcode.app version,
    None with the Command Line Tools only), xctest (``xcrun --find xctest`` succeeds: XCTest ships
    with Xcode, not with the Command Line Tools, and ``swift test`` needs it), license_ok (False
    when ``swift`` refuses to run until ``sudo xcodebuild -license accept``). {} off macOS."""
    if platform.system() != "Darwin":
        return {}
    developer = _developer_dir()
    if developer is None:  # no developer tools: xcrun would open the installer's dialog
        return {"developer_dir": None, "xcode_app": None, "xcode": None, "xctest": False,
                "license_ok": None}
    app = xcode_app()
    env = dict(os.environ, DEVELOPER_DIR=str(app / "Contents" / "Developer")) if app else None
    code, text = _run_text(["/usr/bin/xcodebuild", "-version"], env=env)
    match = re.search(r"Xcode (\d+(?:\.\d+)*)", text) if code == 0 else None
    code, swift_text = _run_text(["/usr/bin/xcrun", "swift", "--version"])
    return {"developer_dir": developer, "xcode_app": str(app) if app else None,
            "xcode": match.group(1) if match else None,
            "xctest": _run_text(["/usr/bin/xcrun", "--find", "xctest"])[0] == 0,
            "license_ok": "license" not in swift_text.lower()}


def swift_toolchain_reason() -> str | None:
    """None where ``swift`` can build the port (Swift 6+), else why not and what to install.

    On macOS ``/usr/bin/swift`` is a shim that exists on every Mac, so it proves nothing: the
    version it reports does (Swift 6 comes with Xcode 16 or its Command Line Tools, macOS 14.5+).
    """
    if shutil.which("swift") is None:
        return ("swift is not on PATH: install Xcode 16+ (or xcode-select --install)"
                if platform.system() == "Darwin" else
                "swift not on PATH (install a Swift 6 toolchain from swift.org)")
    version = preflight.parse_version(swift_version())
    if version is None and platform.system() == "Darwin":
        if xcode_info().get("license_ok") is False:
            return "the Xcode licence is not accepted: sudo xcodebuild -license accept"
        return "no developer tools behind /usr/bin/swift: xcode-select --install (or install Xcode 16+)"
    if version is not None and version < SWIFT_TOOLS_MIN:
        return (f"needs Swift {_dotted(SWIFT_TOOLS_MIN)}+ (swift/Package.swift's tools version); this is "
                f"Swift {_dotted(version)}: install Xcode 16+ (macOS 14.5+) or a Swift 6 toolchain")
    return None


#: Where wheels keep their OpenMP runtime: LLVM's libomp on macOS (delocate puts it in
#: <package>/.dylibs), GNU libgomp on Linux (auditwheel: <dist>.libs)
_OPENMP_PATTERNS = {
    "Darwin": ("torch/lib/libomp*.dylib", "*/.dylibs/libomp*.dylib"),
    "Linux": ("torch/lib/libgomp*.so*", "*.libs/libgomp*.so*"),
}
OPENMP_ENV = "KMP_DUPLICATE_LIB_OK"


def openmp_libraries(site_dirs: list[Path] | None = None, system: str | None = None) -> list[Path]:
    """The OpenMP runtimes the installed wheels bring (torch, faiss-cpu, scikit-learn, ...)."""
    import site
    import sysconfig

    if site_dirs is None:
        site_dirs = [Path(p) for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}]
    patterns = _OPENMP_PATTERNS.get(system or platform.system(), ())
    return sorted({lib for d in site_dirs for pattern in patterns for lib in Path(d).glob(pattern)})


def openmp_clash(libraries: list[Path], system: str | None = None) -> bool:
    """Whether ``libraries`` would abort one process: two LLVM libomp copies do on macOS ("OMP:
    Error #15: Initializing libomp.dylib, but found libomp.dylib already initialized"); GNU
    libgomp copies live side by side on Linux."""
    return (system or platform.system()) == "Darwin" and len(libraries) > 1


def openmp_guard() -> str | None:
    """Before importing faiss or scikit-learn beside torch on macOS: allow the duplicate libomp.

    torch, faiss-cpu and scikit-learn each bundle libomp on macOS; the second one to initialise
    aborts the process unless ``KMP_DUPLICATE_LIB_OK=TRUE`` (read at its initialisation, so
    setting it before the import is enough). That is the upstream workaround (pytorch#149201);
    call ``faiss.omp_set_num_threads(1)`` after importing faiss as well, so only one runtime's
    threads run. Returns what it did (None: nothing to do here).
    """
    libraries = openmp_libraries()
    if not openmp_clash(libraries):
        return None
    os.environ.setdefault(OPENMP_ENV, "TRUE")
    return f"{len(libraries)} libomp copies in this environment: {OPENMP_ENV}={os.environ[OPENMP_ENV]}"


def llamacpp_build() -> dict[str, str | None] | None:
    """The llama.cpp build labkit runs, or None when xllamacpp is not installed.

    Keys: package ("xllamacpp"), version (the wheel's), llama.cpp (the release it embeds:
    xllamacpp numbers its releases YEAR.MONTH.<llama.cpp build number>, so 2026.10.11549 embeds
    b11549), commit (12 hex digits of xllamacpp's source revision, from its ``_version.py``; None
    where unreadable). Read from metadata and that file, without importing the package: its
    extension module is 100 MB and loads llama.cpp.
    """
    version = _dist_version("xllamacpp")
    if version is None:
        return None
    build = version.rsplit(".", 1)[-1]
    commit = None
    try:
        spec = importlib.util.find_spec("xllamacpp")
        folder = Path(next(iter(spec.submodule_search_locations or [])))  # type: ignore[union-attr]
        match = re.search(r'"full-revisionid":\s*"([0-9a-f]{12})', (folder / "_version.py").read_text())
        commit = match.group(1) if match else None
    except (AttributeError, ImportError, OSError, StopIteration, ValueError):
        pass
    return {"package": "xllamacpp", "version": version,
            "llama.cpp": f"b{build}" if build.isdigit() else None, "commit": commit}


@functools.cache
def _fingerprint() -> dict[str, Any]:
    physical, logical = _cores()
    ram = _ram_bytes()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores_physical": physical,
        "cores_logical": logical,
        "ram_gb": round(ram / 2**30, 1) if ram else None,
        "os": platform.platform(),
        "system": platform.system(),
        "arch": platform.machine(),
        "apple_chip": _apple_chip(),
        "gpu": _gpu_name(),
        **(apple_hardware() if platform.system() == "Darwin" else {}),
        "caches": cpu_cache_sizes(),
        "versions": {
            "python": platform.python_version(),
            **{name: _dist_version(name) for name in _VERSIONED},
            "llama.cpp": (llamacpp_build() or {}).get("llama.cpp"),
            "swift": swift_version(),
        },
    }
    info["machine_id"] = hardware_id(info)
    return info


def hardware_id(info: dict[str, Any]) -> str:
    """12 hex digits of sha256 over the hardware fields only (RAM rounded to whole GiB); on
    macOS the GPU cores and the core split too."""
    fields = _IDENTITY_FIELDS + (_DARWIN_IDENTITY_FIELDS if info.get("system") == "Darwin" else ())
    identity = {key: info.get(key) for key in fields}
    if identity["ram_gb"] is not None:
        identity["ram_gb"] = round(identity["ram_gb"])
    blob = json.dumps(identity, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def fingerprint() -> dict[str, Any]:
    """This machine: CPU model, cores, RAM, OS, arch, Apple chip, GPU, library versions, id.

    Keys: cpu, cores_physical, cores_logical, ram_gb (GiB), os (platform string), system
    (Linux/Darwin/...), arch, apple_chip (None off macOS), gpu (the CUDA device; on macOS "Apple
    GPU, N cores"; None without either), on macOS only gpu_cores, cores_performance and
    cores_efficiency (the P/E split), caches
    (:func:`cpu_cache_sizes`, bytes), versions {python, torch, transformers, numpy, coremltools,
    mlx, xllamacpp, llama.cpp (the release tag it embeds, :func:`llamacpp_build`), swift} (None
    where absent), machine_id.

    The machine id hashes the hardware fields only (on macOS the GPU cores and the P/E split as
    well), so two identical machines share an id (their results are comparable) and a library
    upgrade keeps it. Computed once per process; a copy
    is returned so callers may modify it.
    """
    return copy.deepcopy(_fingerprint())


def machine_id() -> str:
    """The stable short hex id of this machine's hardware (see :func:`fingerprint`)."""
    return _fingerprint()["machine_id"]


#: What a run itself writes into the checkout (records, figures, the published site): a change
#: there does not make the code that ran "dirty", or every run would mark itself dirty after its
#: first record. Study 11 writes every answer it scored beside the results (answers.jsonl).
RUN_OUTPUTS = ("data/results", "figures", "docs", "data/function_calling/answers.jsonl")


def git_revision(root: Path | None = None) -> str:
    """``git rev-parse --short HEAD`` of ``root`` (default: the lab root), ``+dirty`` if tracked
    files outside :data:`RUN_OUTPUTS` changed, ``"unknown"`` when there is no git or no commit.
    Provenance for records and figures."""
    from labkit.core import paths

    where = str(root if root is not None else paths.root())
    rev = _run(["git", "-C", where, "rev-parse", "--short", "HEAD"])
    if not rev:
        return "unknown"
    status = _run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no", "--", ".",
                   *(f":(exclude){p}" for p in RUN_OUTPUTS)])
    # _run returns None both for "clean" (empty output) and for failure; a failed status after a
    # successful rev-parse is unlikely, and calling it clean is the conservative choice.
    return f"{rev}+dirty" if status else rev


_SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def _parse_cache_size(text: str) -> int | None:
    """'32K' / '1024K' / '8M' / '32768' (sysfs and sysctl spellings) -> bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    if not match:
        return None
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2).upper()]
    return int(match.group(1)) * scale


def cpu_cache_sizes(sysfs: Path = _SYSFS_CACHE) -> dict[str, int]:
    """Data-cache sizes of one core in bytes, e.g. ``{"L1d": 32768, "L2": 1048576, "L3": ...}``.

    Read from Linux sysfs (``sysfs``, cpu0's cache folder) or macOS sysctl (the performance
    cores' figures on Apple silicon, which reports no L3). Empty when the OS does not say.
    Used to mark the cache levels on the copy-bandwidth curve; note that a copy of ``size``
    bytes has a working set of ``2 * size`` (source and destination).
    """
    sizes: dict[str, int] = {}
    if platform.system() == "Darwin":
        for label, keys in (
            ("L1d", ("hw.perflevel0.l1dcachesize", "hw.l1dcachesize")),
            ("L2", ("hw.perflevel0.l2cachesize", "hw.l2cachesize")),
            ("L3", ("hw.l3cachesize",)),
        ):
            for key in keys:
                value = _sysctl(key)
                size = _parse_cache_size(value) if value else None
                if size:
                    sizes[label] = size
                    break
        return sizes
    if not sysfs.is_dir():
        return sizes
    for index in sorted(sysfs.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _parse_cache_size((index / "size").read_text())
        except OSError:
            continue
        if kind == "Instruction" or not size:
            continue
        sizes[f"L{level}d" if kind == "Data" else f"L{level}"] = size
    return dict(sorted(sizes.items(), key=lambda item: item[1]))


# --------------------------------------------------------------------------- bandwidth probe


def default_copy_sizes() -> list[int]:
    """16 KiB to 256 MiB in powers of two: spans L1, L2, L3 and DRAM on current CPUs."""
    return [2**k for k in range(14, 29)]


def copy_bandwidth(sizes_bytes: list[int] | None = None, repeats: int = 5) -> pd.DataFrame:
    """Single-thread memory-copy bandwidth over buffer sizes, measured with ``np.copyto``: the
    cache staircase of notebook 00 (the roofline's bandwidth is :mod:`labkit.core.bandwidth`'s).

    Convention: a copy of ``size`` bytes moves ``2 * size`` bytes (it reads the source and writes
    the destination), so GB/s = 2 * size / seconds / 1e9. (STREAM's "copy" counts the same way.)

    The sizes are measured in ``repeats`` interleaved rounds, every size once per round, so a
    burst of load elsewhere lowers every size alike instead of one step of the staircase (timed
    one size after another on a shared machine, a busy minute made a DRAM-sized copy look faster
    than an L3-sized one). Each sample first copies once untimed, so a buffer that fits a cache
    is in it, then times enough copies to move about 64 MiB, so tiny buffers are not lost in
    clock resolution; numpy's per-call overhead (about a microsecond) still lowers the smallest
    sizes, which are therefore lower bounds on cache bandwidth. All sizes are views of one pair
    of buffers of the largest size.

    Returns a pandas DataFrame with columns size_bytes, gb_per_s (median), gb_per_s_p10,
    gb_per_s_p90 (percentiles of bandwidth, i.e. p10 of bandwidth comes from p90 of time),
    gb_per_s_best (the fastest round: STREAM's figure, what the hardware can do when nothing
    else runs).
    """
    import time

    import pandas as pd

    from labkit.core.timing import Stats

    sizes = default_copy_sizes() if sizes_bytes is None else list(sizes_bytes)
    if not sizes or not all(
        isinstance(s, int | np.integer) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ValueError(f"sizes_bytes must be a non-empty list of positive ints, got {sizes_bytes!r}")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")

    sizes = [int(s) for s in sizes]
    src = np.ones(max(sizes), dtype=np.uint8)
    dst = np.zeros(max(sizes), dtype=np.uint8)
    samples: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(repeats):
        for size in sizes:
            a, b, inner = src[:size], dst[:size], max(1, (64 * 2**20) // size)
            np.copyto(b, a)  # warm: in cache if it fits, pages touched if not
            start = time.perf_counter()
            for _ in range(inner):
                np.copyto(b, a)
            samples[size].append((time.perf_counter() - start) / inner)
    rows = []
    for size in sizes:
        stats, moved = Stats.from_samples(samples[size]), 2 * size
        rows.append({"size_bytes": size, "gb_per_s": moved / stats.median / 1e9,
                     "gb_per_s_p10": moved / stats.p90 / 1e9, "gb_per_s_p90": moved / stats.p10 / 1e9,
                     "gb_per_s_best": moved / min(stats.samples) / 1e9})
    return pd.DataFrame(rows, columns=COPY_COLUMNS)


COPY_COLUMNS = ["size_bytes", "gb_per_s", "gb_per_s_p10", "gb_per_s_p90", "gb_per_s_best"]


#: Apple silicon reports only its cores' L2 as the last-level cache, but Pro, Max and Ultra chips
#: put a 24-96 MB system-level cache in front of DRAM: a copy must touch more than that
APPLE_DRAM_MIN_BYTES = 128 * 2**20


def dram_rows(df: pd.DataFrame, *, llc_bytes: int | None = None) -> pd.DataFrame:
    """The rows of :func:`copy_bandwidth`'s table that cannot fit a cache: size at least the
    last-level cache (so the working set, source + destination, is at least twice it) and at
    least a quarter of the largest size. With the default sizes on a 32 MiB-L3 CPU: 64, 128,
    256 MiB. ``llc_bytes`` defaults to the largest of :func:`cpu_cache_sizes` (0 when unknown),
    and on Apple silicon to at least :data:`APPLE_DRAM_MIN_BYTES` (its system-level cache is not
    reported).

    If even the largest buffer is smaller than the last-level cache, its row is returned with a
    warning: it measures the cache, not DRAM.
    """
    required = {"size_bytes", "gb_per_s"}
    missing = required - set(getattr(df, "columns", []))
    if missing:
        raise ValueError(f"df must be copy_bandwidth()'s table; missing columns {sorted(missing)}")
    if len(df) == 0:
        raise ValueError("df is empty: run copy_bandwidth() first")
    if llc_bytes is None:
        llc_bytes = max(cpu_cache_sizes().values(), default=0)
        if _apple_chip():
            llc_bytes = max(llc_bytes, APPLE_DRAM_MIN_BYTES)
    largest = int(df["size_bytes"].max())
    dram = df[(df["size_bytes"] >= llc_bytes) & (df["size_bytes"] >= largest / 4)]
    if dram.empty:
        warnings.warn(
            f"the largest buffer ({largest} bytes) is smaller than the last-level cache "
            f"({llc_bytes} bytes): this copy bandwidth is the cache's, not DRAM's",
            stacklevel=3,
        )
        dram = df[df["size_bytes"] == largest]
    return dram


def peak_copy_bandwidth_gbs(df: pd.DataFrame, *, llc_bytes: int | None = None,
                            column: str = "gb_per_s") -> float:
    """The DRAM-level copy bandwidth from :func:`copy_bandwidth`'s table, in GB/s: the median of
    ``column`` over :func:`dram_rows` (the plateau beyond the caches). ``column``
    "gb_per_s_best" takes each size's fastest round (notebook 00's plateau); the default, the
    median round, is what notebook 01 has used so far.

    A single-thread copy: a multi-threaded decoder that only reads can beat it, so a roofline
    divides by :func:`labkit.core.bandwidth.read_bandwidth_gbs` instead.
    """
    rows = dram_rows(df, llc_bytes=llc_bytes)
    if column not in rows.columns:
        raise ValueError(f"df has no column {column!r}; columns are {list(df.columns)}")
    return float(rows[column].median())


# --------------------------------------------------------------------------- optional runtimes


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def optional_runtimes() -> dict[str, str | None]:
    """For each runtime the lab can benchmark: None if usable here, else why not (plain words).

    Keys: torch-cpu, mps, cuda, coreml-predict (the whole ladder: macOS 15), mlx, swift (a
    Swift 6 toolchain), llama.cpp, onnxruntime. Probes by lookup (importlib.util.find_spec,
    shutil.which, ``swift --version``); only torch is imported, to ask about devices.
    """
    is_mac = platform.system() == "Darwin"
    has_torch = _installed("torch")
    reasons: dict[str, str | None] = {}

    reasons["torch-cpu"] = None if has_torch else "torch not installed: pip install torch"

    if not has_torch:
        reasons["mps"] = "torch not installed: pip install torch"
        reasons["cuda"] = "torch not installed: pip install torch"
    else:
        import torch

        reasons["mps"] = None if torch.backends.mps.is_available() else _mps_reason()
        reasons["cuda"] = None if torch.cuda.is_available() else _cuda_reason()

    if not is_mac:
        reasons["coreml-predict"] = "needs macOS (Core ML predictions run only on macOS)"
    else:
        reasons["coreml-predict"] = coreml_reason()

    reasons["mlx"] = (
        None if _installed("mlx.core") else "mlx not installed: pip install 'labkit[mlx]'"
    )
    reasons["swift"] = swift_toolchain_reason()
    reasons["llama.cpp"] = (
        None if _installed("xllamacpp")
        else "xllamacpp (the prebuilt llama.cpp, a labkit dependency) not installed: pip install xllamacpp"
    )
    reasons["onnxruntime"] = (
        None if _installed("onnxruntime")
        else "onnxruntime not installed: pip install 'labkit[onnx]'"
    )
    return reasons
