"""Core ML on a Mac: each ladder step's package predicts what the torch module it was converted
from computes, on each compute unit; the runtime adapter; where the ops run. Skipped off macOS
with "needs macOS N": steps a and b need macOS 14, the stateful c-f macOS 15 (Core ML states).

Tolerances: the packages compute in float16 (Core ML's precision), so logits stay within
``tolerances.FP16_COMPUTE`` of the float32 torch module for the fp16 steps (a, b, c and f, the
ANE layout) and within ``INT4_WEIGHTS`` for the 4-bit steps (d: int4 blocks, e: LUT).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import needs_macos, random_llama_with_shipped_tokenizer, tiny_llama_slice

from labkit.core import env
from labkit.core import tolerances as tol

ct = pytest.importorskip("coremltools", reason="needs coremltools: pip install -e '.[coreml]'")

from labkit.export import coreml as cx  # noqa: E402

MAX_LEN, LAYERS = 16, 2
PROMPT = [5, 17, 300, 2]
INSTALL = "Core ML: pip install -e '.[coreml]'"


def _step(step: str) -> pytest.ParameterSet:
    return pytest.param(step, marks=needs_macos(cx.MIN_MACOS[step], INSTALL), id=step)


@pytest.fixture(scope="module")
def model():
    return tiny_llama_slice(LAYERS)


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory) -> dict[str, cx.Export]:
    runnable = [s for s in cx.STEPS if env.macos_at_least(cx.MIN_MACOS[s])]
    out = tmp_path_factory.mktemp("coreml-mac")
    return {e.step: e for e in cx.convert(model, runnable, out, MAX_LEN)}


def _bound(step: str) -> float:
    return (tol.INT4_WEIGHTS if cx.COMPRESSION[step] != "none" else tol.FP16_COMPUTE).at("cpu")


def _reference(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([PROMPT]))[0, -1].numpy()


@pytest.mark.parametrize("step", [_step(s) for s in cx.STEPS])
def test_every_step_predicts_what_it_was_converted_from(model, exports, step: str) -> None:
    run = cx.coreml_generate(exports[step].path, step, PROMPT, 3, MAX_LEN, "CPU_ONLY")
    err = float(np.abs(run.first_logits - _reference(model)).max())
    assert err < _bound(step), f"step {step}: max |dlogit| {err:.3f} >= {_bound(step)}"
    assert len(run.tokens) == 3 and run.ttft_s > 0


@needs_macos((15, 0), INSTALL)
@pytest.mark.parametrize("unit", ["CPU_AND_GPU", "CPU_AND_NE", "ALL"])
def test_the_stateful_step_on_every_compute_unit(model, exports, unit: str) -> None:
    run = cx.coreml_generate(exports["c"].path, "c", PROMPT, 2, MAX_LEN, unit)
    assert float(np.abs(run.first_logits - _reference(model)).max()) < tol.FP16_COMPUTE.at("mps")


@needs_macos((14, 4), "MLComputePlan")
def test_the_compute_plan_names_a_device_for_every_op(exports) -> None:
    step = "c" if "c" in exports else "a"
    plan = cx.compute_plan(exports[step].path, "CPU_ONLY")
    assert sum(plan.values()) > 0 and set(plan) <= {"cpu", "gpu", "neural_engine", "unknown"}
    assert plan.get("cpu", 0) >= sum(plan.values()) - plan.get("unknown", 0)  # CPU_ONLY: CPU


@needs_macos((14, 0), INSTALL)
def test_macos_14_refuses_stateful_steps_with_the_fix(exports) -> None:
    if env.macos_at_least((15, 0)):
        pytest.skip("needs macOS 14.x exactly: this Mac runs the stateful steps")
    assert "a" in exports and "c" not in exports
    with pytest.raises(RuntimeError, match="needs macOS 15.0"):
        cx.coreml_generate(exports["a"].path, "c", PROMPT, 2, MAX_LEN)


@needs_macos((15, 0), INSTALL)
def test_the_runtime_adapter_against_torch(tmp_path, monkeypatch) -> None:
    from labkit.models import load
    from labkit.runtimes.coreml_rt import CoreML

    monkeypatch.setenv("LABKIT_RUNTIME_CACHE", str(tmp_path / "cache"))
    folder = random_llama_with_shipped_tokenizer(tmp_path / "m", max_positions=64)
    ref_model = load(folder, device="cpu").model
    ids = [0, 17, 940, 3, 5000, 12]
    with torch.no_grad():
        want = ref_model(torch.tensor([ids]))[0].numpy()
    rt = CoreML(compute_unit="CPU_ONLY", max_len=32)
    rt.load(folder)
    got = [rt.prefill(ids[:3])] + [rt.decode_step(t) for t in ids[3:]]
    scale = max(1.0, float(want.std()))
    for pos, logits in zip(range(2, len(ids)), got, strict=False):
        assert float(np.abs(logits - want[pos]).max()) < tol.FP16_COMPUTE.at("cpu") * scale, pos
    assert rt.model_bytes() > 0
