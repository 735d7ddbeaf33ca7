"""The Swift port on a Mac: built against Accelerate, its thread cap applied, its logits against
transformers', ``swift test`` where Xcode brings XCTest. Skipped off macOS with "needs macOS 14".

Tolerance: ``tolerances.OTHER_RUNTIME`` (float32 weights through another language and BLAS), as
on Linux; Accelerate runs on the CPU (its matrix units included), so the CPU bound applies.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_macos, random_llama_with_shipped_tokenizer

from labkit.core import tolerances as tol
from labkit.ports import swift as swiftport

pytestmark = [needs_macos((14, 0), "the Swift port: Xcode 16 or its Command Line Tools"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def port() -> None:
    reason = swiftport.available()
    if reason is not None:
        pytest.skip(f"Swift port: {reason}")
    swiftport.build(release=True)


def test_the_port_uses_accelerate_and_its_thread_cap(port, tmp_path) -> None:
    folder = random_llama_with_shipped_tokenizer(tmp_path / "m")
    prompt = [0, 17, 940, 3]
    for threads in (1, 2):
        r = swiftport.run(folder, prompt, 8, dump=True, threads=threads)
        assert r.blas == "Accelerate" and r.threads == threads
        assert "VECLIB_MAXIMUM_THREADS" in r.note and r.peak_rss_bytes > 0
    ref = swiftport.reference(folder, prompt, 8)
    err = float(np.abs(r.logits - ref.logits).max())
    assert err <= tol.OTHER_RUNTIME.at("cpu") and r.tokens == ref.greedy_tokens.tolist()


def test_swift_test_where_xcode_brings_xctest(port, tmp_path) -> None:
    reason = swiftport.xctest_unavailable()
    if reason is not None:
        pytest.skip(reason)
    proc = swiftport.swift_test(swiftport.prepare_fixtures(tmp_path / "fixtures"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_the_runtime_reports_the_clis_own_peak(port, tmp_path, monkeypatch) -> None:
    from labkit.runtimes.swift_rt import SwiftPort

    monkeypatch.setenv("LABKIT_RUNTIME_CACHE", str(tmp_path / "cache"))
    rt = SwiftPort(threads=1)
    rt.load(random_llama_with_shipped_tokenizer(tmp_path / "m"))
    rt.timed_generate([0, 17, 940], 4)
    assert rt.cli_peak_rss_bytes and "Accelerate" in rt.note
