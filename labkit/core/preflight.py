"""Pre-flight: can ``make setup`` work with this Python on this machine? Standalone on purpose.

Why standalone: ``make setup`` runs this file with the interpreter it is about to build the venv
from, before any dependency exists (Apple's ``/usr/bin/python3`` is 3.9 with nothing but the
standard library), so it imports the standard library only and parses as Python 3.8. It stops
setup early with the one command that fixes the gap, instead of pip's "No matching distribution
found for torch==2.13.0". ``labkit doctor`` reads the same facts from here, so what setup needs is
stated once.

What setup needs (the wheel tags of torch 2.13.0, mlx and faiss-cpu, checked with pip for
cp310-cp312):

* Python 3.10 to 3.12. 3.13 and later have the core wheels but are untested here: a warning.
* On macOS, Apple silicon and an arm64 Python: torch stops at 2.2.2 for macOS x86_64 and mlx has
  no x86_64 wheel, so an Intel Homebrew (/usr/local), Rosetta or Intel-era conda Python fails.
* macOS 14 or later: torch 2.13, mlx and faiss-cpu publish ``macosx_14_0_arm64`` wheels only.
* the venv module with ensurepip (Debian ships it separately: python3.X-venv).

Run: ``python3 labkit/core/preflight.py`` prints what it found; exit status 1 where setup cannot
work.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

PYTHON_MIN = (3, 10)
PYTHON_MAX_TESTED = (3, 12)
MACOS_MIN = (14, 0)
SYSCTL = "/usr/sbin/sysctl"  # not on PATH under some launchers (launchd, IDEs)
HOMEBREW_BIN = "/opt/homebrew/bin"  # the arm64 Homebrew; /usr/local/bin is the Intel one


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'15.1.1' -> (15, 1, 1); '14' -> (14,); None or no leading number -> None."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text or "")
    return tuple(int(p) for p in match.group(1).split(".")) if match else None


def _output(cmd: list[str], env: dict | None = None) -> str | None:
    """stdout of ``cmd`` stripped, or None if it is missing, fails or hangs."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def sysctl(name: str) -> str | None:
    """``sysctl -n name`` on macOS (None where the key or the tool is missing)."""
    return _output([SYSCTL, "-n", name])


def macos_version() -> tuple[int, ...] | None:
    """macOS's version, e.g. (15, 1); None off macOS.

    ``platform.mac_ver`` says 10.16 to a Python built against an old SDK (macOS's compatibility
    answer), so then ``sw_vers`` is asked with the compatibility mode off.
    """
    if platform.system() != "Darwin":
        return None
    version = parse_version(platform.mac_ver()[0])
    if version is None or version[:2] == (10, 16):
        env = dict(os.environ, SYSTEM_VERSION_COMPAT="0")
        version = parse_version(_output(["/usr/bin/sw_vers", "-productVersion"], env)) or version
    return version


@dataclass
class Facts:
    """What setup depends on: the OS, the interpreter and the hardware under it."""

    system: str  # platform.system(): "Darwin", "Linux", ...
    machine: str  # the interpreter's architecture: "arm64", "x86_64", "aarch64"
    python: tuple[int, ...]  # sys.version_info[:3]
    executable: str = ""
    macos: tuple[int, ...] | None = None
    apple_silicon: bool = False  # the hardware, whatever the interpreter's architecture
    translated: bool = False  # this process runs under Rosetta 2
    universal: bool = False  # the interpreter binary holds an arm64 slice too (python.org's)
    has_venv: bool = True  # venv + ensurepip importable

    @classmethod
    def here(cls) -> Facts:
        """The facts of this process."""
        system, machine = platform.system(), platform.machine()
        mac = system == "Darwin"
        archs = _output(["/usr/bin/lipo", "-archs", sys.executable]) if mac else None
        return cls(
            system=system, machine=machine, python=tuple(sys.version_info[:3]),
            executable=sys.executable, macos=macos_version(),
            apple_silicon=mac and (machine == "arm64" or sysctl("hw.optional.arm64") == "1"),
            translated=mac and sysctl("sysctl.proc_translated") == "1",
            universal=bool(archs) and "arm64" in (archs or "").split(),
            has_venv=all(importlib.util.find_spec(m) is not None for m in ("venv", "ensurepip")),
        )


@dataclass
class Finding:
    """One check: "ok", "warn" (setup may work) or "stop" (it cannot), what was found, the fix."""

    level: str
    check: str
    found: str
    fix: str = ""


def _dotted(version: tuple[int, ...] | None) -> str:
    return ".".join(str(p) for p in version) if version else "unknown"


def _python_fix(facts: Facts, better: list[str]) -> str:
    if better:
        return f"make setup PYTHON={better[0]}"
    if facts.system == "Darwin":
        return f"brew install python@3.12 && make setup PYTHON={HOMEBREW_BIN}/python3.12"
    return "install Python 3.12 (e.g. pyenv install 3.12), then: make setup PYTHON=python3.12"


def check_python(facts: Facts, better: list[str]) -> Finding:
    """Python 3.10-3.12: older has no torch 2.13 wheel; newer is a warning (untested)."""
    found = f"Python {_dotted(facts.python)} at {facts.executable or 'this interpreter'}"
    if tuple(facts.python[:2]) < PYTHON_MIN:
        apple = " (Apple's Command Line Tools Python)" if facts.executable == "/usr/bin/python3" else ""
        return Finding("stop", "python", found + apple + ": torch 2.13 needs Python 3.10-3.12",
                       _python_fix(facts, better))
    if tuple(facts.python[:2]) > PYTHON_MAX_TESTED:
        return Finding("warn", "python", found + ": newer than the tested 3.10-3.12 (wheels exist)",
                       _python_fix(facts, better))
    return Finding("ok", "python", found)


def check_arch(facts: Facts, better: list[str]) -> Finding:
    """On macOS: Apple silicon and an arm64 interpreter (no x86_64 wheels of torch 2.13, mlx)."""
    if facts.system != "Darwin":
        return Finding("ok", "arch", f"{facts.machine} Python on {facts.system}")
    if not facts.apple_silicon:
        return Finding("stop", "arch", "an Intel Mac: torch 2.13 and mlx have no macOS x86_64 wheels "
                       "(torch stops at 2.2.2)", "run the lab on an Apple-silicon Mac or on Linux")
    if facts.machine != "arm64":
        how = "under Rosetta 2" if facts.translated else "as x86_64"
        if better:
            fix = f"make setup PYTHON={better[0]}"
        elif facts.universal:  # the binary has an arm64 slice: only the shell runs translated
            fix = "arch -arm64 make setup"
        else:  # the arm64 Homebrew lives in /opt/homebrew (/usr/local is the Intel one)
            fix = (f"{HOMEBREW_BIN}/brew install python@3.12 && "
                   f"make setup PYTHON={HOMEBREW_BIN}/python3.12")
        return Finding("stop", "arch", f"this Python runs {how} on Apple silicon: torch 2.13 and mlx "
                       "have no macOS x86_64 wheels", fix)
    return Finding("ok", "arch", "arm64 Python on Apple silicon")


def check_macos(facts: Facts) -> Finding:
    """macOS 14+: the torch, mlx and faiss-cpu wheels are tagged macosx_14_0."""
    if facts.system != "Darwin":
        return Finding("ok", "os", facts.system)
    found = f"macOS {_dotted(facts.macos)}"
    if facts.macos is None or tuple(facts.macos[:2]) < MACOS_MIN:
        return Finding("stop", "os", found + ": torch 2.13, mlx and faiss-cpu need macOS 14+",
                       "update macOS: System Settings > General > Software Update (macOS 14 or later)")
    return Finding("ok", "os", found)


def check_venv(facts: Facts) -> Finding:
    """``python -m venv`` needs ensurepip (a separate package on Debian and Ubuntu)."""
    if facts.has_venv:
        return Finding("ok", "venv", "venv and ensurepip present")
    minor = f"{facts.python[0]}.{facts.python[1]}"
    return Finding("stop", "venv", f"Python {minor} has no venv/ensurepip module",
                   f"sudo apt-get install python{minor}-venv")


def check(facts: Facts, better: list[str] | None = None) -> list[Finding]:
    """Every pre-flight finding for ``facts``; ``better`` lists interpreters that would do."""
    better = list(better or [])
    return [check_macos(facts), check_arch(facts, better), check_python(facts, better),
            check_venv(facts)]


def _probe(exe: str) -> tuple[str, tuple[int, ...]] | None:
    out = _output([exe, "-c", "import platform, sys; print(platform.machine(), *sys.version_info[:2])"])
    parts = (out or "").split()
    return (parts[0], tuple(int(p) for p in parts[1:3])) if len(parts) == 3 else None


def better_pythons(names: tuple[str, ...] = ("python3.12", "python3.11", "python3.10")) -> list[str]:
    """Interpreters on PATH (and in the arm64 Homebrew) that setup would accept, best first."""
    arm = platform.system() == "Darwin"
    found: list[str] = []
    for name in names:
        for exe in (shutil.which(name), os.path.join(HOMEBREW_BIN, name) if arm else None):
            if not exe or not os.path.isfile(exe) or exe in found:
                continue
            probed = _probe(exe)
            if probed and PYTHON_MIN <= probed[1] <= PYTHON_MAX_TESTED and (not arm or probed[0] == "arm64"):
                found.append(exe)
    return found


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    @property
    def can_set_up(self) -> bool:
        return all(f.level != "stop" for f in self.findings)

    def lines(self) -> list[str]:
        marks = {"ok": "ok  ", "warn": "warn", "stop": "STOP"}
        out = []
        for f in self.findings:
            out.append(f"{marks[f.level]} {f.check:6s} {f.found}")
            if f.fix and f.level != "ok":
                out.append(f"     {'':6s} fix: {f.fix}")
        return out


def run(facts: Facts | None = None) -> Report:
    """The pre-flight report of ``facts`` (default: this interpreter); alternatives are looked
    for only when something stops or warns."""
    facts = facts or Facts.here()
    findings = check(facts)
    if any(f.level != "ok" for f in findings):
        findings = check(facts, better_pythons())
    return Report(findings)


def main() -> int:
    report = run()
    print("labkit pre-flight (what `make setup` needs):")
    print("\n".join(report.lines()))
    if not report.can_set_up:
        print("setup stopped before creating .venv: apply the fix above, then run make setup again.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
