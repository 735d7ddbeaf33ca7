"""labkit.runtimes: every adapter computes what labkit's Llama computes, and the harness is right.

Reference: labkit's Llama in float32, one full causal forward over the whole sequence (no
cache). Each runtime is driven the way the matrix drives it (prefill, then decode steps) on a
small random Llama with the shipped tokenizer, so the logits of every position are compared.
Tolerances (max |logit difference|): 1e-4 for torch, its static-shape step and ONNX Runtime
(same float32 arithmetic, other kernels); 1e-3 for MLX and llama.cpp F32 (other summation
orders; llama.cpp's API returns log-probabilities, compared with the reference's log-softmax).
No wall-clock time is checked anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_llama_with_shipped_tokenizer

from labkit import runtimes
from labkit.core import tolerances as tol
from labkit.runtimes.base import GenerationRun, MeanSd, log_softmax, parity

N_NEW = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random tied GQA Llama (2 layers, hidden 64, vocab 8192) with the shipped tokenizer."""
    return random_llama_with_shipped_tokenizer(tmp_path_factory.mktemp("rt") / "rt-llama", seed=1,
                                               max_positions=128, init_std=0.2)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_RUNTIME_CACHE", str(tmp_path / "cache"))


PROMPT = [0, 17, 940, 3, 5000, 12, 77, 4096, 8191]


@pytest.fixture(scope="module")
def reference(folder) -> np.ndarray:
    """Logits [positions, vocab] of the full forward over prompt + the reference's greedy tokens,
    rows len(PROMPT)-1 ... : the logits each runtime must give at its prefill and decode steps."""
    from labkit.models import load

    model = load(folder, device="cpu", dtype="float32").model
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(N_NEW - 1):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        logits = model(torch.tensor([ids]))[0].numpy()
    return np.asarray(ids), logits[len(PROMPT) - 1 :]


def _check(rt, folder, reference, atol):
    """``rt`` gives the reference's greedy tokens and logits (log-probabilities where the runtime
    returns those, ``returns_logprobs``: llama.cpp's API) within ``atol``."""
    ids, want = reference
    if rt.returns_logprobs:
        want = log_softmax(want)
    rt.load(folder)
    run = rt.timed_generate(PROMPT, N_NEW, keep_logits=True)
    got = np.stack(run.logits)
    assert run.tokens == [int(t) for t in ids[len(PROMPT):]] + [int(want[-1].argmax())]
    err = float(np.abs(got - want).max())
    assert err <= atol, f"{rt.name}: max |dlogit| {err:.2e} > {atol}"
    # a second prefill starts from an empty cache (no state leaks between runs)
    again = rt.prefill(PROMPT)
    np.testing.assert_allclose(again, want[0], atol=atol)
    assert rt.model_bytes() is None or rt.model_bytes() > 0


def test_registry_and_availability_reasons():
    assert {"torch-eager", "torch-compile", "torch-cuda", "onnxruntime", "mlx", "llama.cpp-f32",
            "llama.cpp-q4_0", "llama.cpp-server", "swift", "coreml"} <= set(runtimes.RUNTIMES)
    for name in runtimes.RUNTIMES:
        reason = runtimes.runtime_class(name).available()
        assert reason is None or (isinstance(reason, str) and reason), name
    import platform

    if platform.system() != "Darwin":
        assert "macOS" in runtimes.runtime_class("coreml").available()
    if not torch.cuda.is_available():
        assert "CUDA" in runtimes.runtime_class("torch-cuda").available()
    with pytest.raises(KeyError, match="known"):
        runtimes.runtime_class("tensorrt")


def test_parity_counts_agreement_and_compares_logits_before_divergence():
    v = np.zeros(4, np.float32)
    ref = GenerationRun(0, [], [1, 2, 3, 4], [v, v, v, v])
    run = GenerationRun(0, [], [1, 2, 9, 4], [v + 0.1, v + 0.2, v + 0.3, v + 50])
    p = parity(run, ref)
    assert p["greedy_agreement_pct"] == 75.0
    assert p["first_divergence"] == 2
    assert p["max_abs_logit_err"] == pytest.approx(0.3)  # position 3 (after divergence) ignored
    assert parity(run, ref, exposes_logits=False)["max_abs_logit_err"] is None


def test_mean_sd_is_llama_bench_style():
    s = MeanSd.of([10.0, 12.0, 14.0])
    assert (s.mean, s.sd, s.n) == (12.0, pytest.approx(2.0), 3)
    assert MeanSd.of([5.0]).sd == 0.0
    with pytest.raises(ValueError):
        MeanSd.of([])


def test_torch_eager(folder, reference):
    _check(runtimes.get("torch-eager"), folder, reference, tol.OTHER_RUNTIME.at("cpu"))


def test_torch_fast(folder, reference):
    """Every lever on ([in, out] weights, matmul attention): the same function."""
    _check(runtimes.get("torch-fast"), folder, reference, tol.OTHER_RUNTIME.at("cpu"))


def test_static_step_of_torch_compile_equals_eager(folder, reference):
    """The static-shape decode step torch.compile runs, checked uncompiled (compiling takes
    minutes on a small CPU; the function is the same)."""
    from labkit.runtimes.torch_rt import StaticStep

    rt = runtimes.get("torch-eager")
    rt.load(folder)
    step = StaticStep(rt.decoder, rt.cache)
    ids, want = reference
    rt.prefill(PROMPT)
    for i in range(1, N_NEW):
        pos = torch.tensor(rt.cache.length)
        with torch.inference_mode():
            got = step(torch.tensor([int(ids[len(PROMPT) + i - 1])]), pos)[0].numpy()
        rt.cache.advance(1)
        np.testing.assert_allclose(got, want[i], atol=tol.OTHER_RUNTIME.at("cpu"))


def test_onnxruntime(folder, reference):
    pytest.importorskip("onnxruntime")
    _check(runtimes.get("onnxruntime", threads=1), folder, reference, tol.OTHER_RUNTIME.at("cpu"))


def test_onnx_graph_masks_left_padding(folder, tmp_path):
    """Batch 2, the short row left-padded: its logits equal the unpadded run (the explicit
    attention mask and mask-derived positions at work; batch stays dynamic)."""
    ort = pytest.importorskip("onnxruntime")
    from labkit.export.onnx import export_onnx, io_names, load_for_export

    model = load_for_export(folder)
    path = export_onnx(model, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, _ = io_names(2)
    short = PROMPT[:5]
    ids = np.array([PROMPT, [2] * 4 + short], dtype=np.int64)
    mask = np.array([[1] * 9, [0] * 4 + [1] * 5], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": mask}
    feed.update({n: np.zeros((2, 2, 0, 16), np.float32) for n in inputs[2:]})
    logits = sess.run(None, feed)[0]
    with torch.no_grad():
        want_long = model(torch.tensor([PROMPT]))[0].numpy()
        want_short = model(torch.tensor([short]))[0].numpy()
    np.testing.assert_allclose(logits[0], want_long, atol=tol.OTHER_RUNTIME.at("cpu"))
    np.testing.assert_allclose(logits[1, 4:], want_short, atol=tol.OTHER_RUNTIME.at("cpu"))


def test_mlx(folder, reference):
    pytest.importorskip("mlx_lm")
    # 1e-3 as set, not OTHER_RUNTIME's 1e-4: on a Mac MLX runs on the GPU (Metal kernels, its own
    # RoPE); 1.5e-5 measured on a Linux CPU. The Swift port below keeps 1e-3 likewise (1.2e-5).
    _check(runtimes.get("mlx"), folder, reference, 1e-3)


def test_llamacpp_f32(folder, reference):
    """In process (xllamacpp): greedy tokens equal, log-probabilities within 1e-3, and the
    prefill/decode_step path (the server's prompt cache reused) equals the streamed run."""
    with runtimes.get("llama.cpp-f32", threads=1) as rt:
        _check(rt, folder, reference, tol.GGUF_F32.at("cpu"))
        ids, want = reference
        rt.prefill(PROMPT)
        step = rt.decode_step(int(ids[len(PROMPT)]))
        np.testing.assert_allclose(step, log_softmax(want[1]), atol=tol.GGUF_F32.at("cpu"))


def test_llamacpp_server(folder, reference):
    """Over HTTP (llama.cpp's server in its own process): the same function as in process."""
    with runtimes.get("llama.cpp-server", threads=1) as rt:
        _check(rt, folder, reference, tol.GGUF_F32.at("cpu"))


def test_llamacpp_params_keep_every_op_on_the_cpu(tmp_path):
    """No layer on a GPU and no op offload: with Metal (the macOS wheel) ggml would otherwise run
    the ops of a prompt batch on the GPU. The Linux wheel has the same switch: checked here too."""
    from labkit.runtimes.llamacpp_rt import server_params

    params = server_params(tmp_path / "x.gguf", n_ctx=64)
    assert params.n_gpu_layers == 0 and params.no_op_offload is True


def test_parity_compares_logprob_runtimes_as_logprobs():
    """A runtime that returns log-probabilities matches a reference that returns logits."""
    ref_logits = np.array([2.0, 1.0, -3.0], np.float32)
    ref = GenerationRun(0, [], [0], [ref_logits])
    run = GenerationRun(0, [], [0], [log_softmax(ref_logits + 7.0).astype(np.float32)])
    assert parity(run, ref)["max_abs_logit_err"] > 1  # as raw logits: off by the log-sum-exp
    assert parity(run, ref, logprobs=True)["max_abs_logit_err"] < 1e-6


def test_swift(folder, reference):
    from labkit.ports import swift as swiftport
    from labkit.studies import runtime_benchmark as rb

    if swiftport.available() is not None:
        pytest.skip(f"Swift port: {swiftport.available()}")
    rt = runtimes.get("swift", threads=1)
    _check(rt, folder, reference, 1e-3)
    # the matrix's peak RSS of this row: the CLI's own (wait4), not RUSAGE_CHILDREN, which also
    # holds the swift build that load ran
    assert rt.cli_peak_rss_bytes and rb.peak_rss(rt)[0] == rt.cli_peak_rss_bytes
