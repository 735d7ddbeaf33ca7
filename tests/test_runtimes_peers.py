"""The peer runtimes: OpenVINO and vLLM adapters against labkit's torch fp32 reference.

Tolerances: OpenVINO f32 is held to the same bound as the ONNX Runtime adapter (fp32 graph vs
fp32 eager: only the order of float32 operations differs), ``tolerances.OTHER_RUNTIME``. The int8
row is held to ``tolerances.INT8_WEIGHTS``, a bound that a wrong scale or a dropped layer would
exceed by far.
"""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from labkit import runtimes
from labkit.core import tolerances as tol
from labkit.runtimes import vllm_rt
from labkit.runtimes.base import parity

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
HAS_NNCF = importlib.util.find_spec("nncf") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")
needs_nncf = pytest.mark.skipif(not (HAS_OPENVINO and HAS_NNCF), reason="openvino/nncf not installed")

PROMPT = [1, 17, 42, 99, 5, 64, 3, 120, 77, 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random transformers Llama (GQA, perturbed norms), shared by this module's tests."""
    from conftest import build_hf_checkpoint

    return build_hf_checkpoint(tmp_path_factory.mktemp("peers") / "llama", "llama")


@pytest.fixture(scope="module")
def ref(tiny):
    """torch eager fp32: 12 greedy tokens after PROMPT, logits kept (the parity reference)."""
    rt = runtimes.get("torch-eager")
    rt.load(tiny)
    return rt.timed_generate(PROMPT, 12, keep_logits=True)


@pytest.fixture(scope="module")
def ov_f32(tiny):
    if not HAS_OPENVINO:
        pytest.skip("openvino not installed")
    rt = runtimes.get("openvino")
    rt.load(tiny)
    return rt


# --- registry and available() ---------------------------------------------------------------


def test_peers_are_registered() -> None:
    for name in ("openvino", "openvino-int8", "openvino-int4", "vllm-cpu"):
        assert runtimes.runtime_class(name).name == name


def test_openvino_available_matches_import() -> None:
    reason = runtimes.runtime_class("openvino").available()
    assert (reason is None) == HAS_OPENVINO, reason


def test_openvino_available_names_missing_package(monkeypatch) -> None:
    cls = runtimes.runtime_class("openvino-int8")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "nncf" else real(n, *a))
    reason = cls.available()
    if HAS_OPENVINO:
        assert reason is not None and "nncf" in reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None)
    assert "openvino not installed" in cls.available()


def _pretend_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    """vllm_rt answers "Linux only" before it looks at the venv: show it Linux (only it: the
    rest of the process keeps the real OS), so the venv checks run on a Mac too."""
    monkeypatch.setattr(vllm_rt, "sys", SimpleNamespace(platform="linux"))


def test_vllm_available_without_venv(monkeypatch, tmp_path) -> None:
    _pretend_linux(monkeypatch)
    monkeypatch.setattr(vllm_rt, "VENV", tmp_path / "nowhere")
    monkeypatch.setattr(vllm_rt, "_IMPORT_CHECK", {})
    reason = vllm_rt.VLLM.available()
    assert reason is not None and "no vLLM venv" in reason


def test_vllm_available_reports_the_import_error(monkeypatch, tmp_path) -> None:
    _pretend_linux(monkeypatch)
    # a venv whose python fails `import vllm` the way a broken install does
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "python"
    fake.write_text("#!/bin/sh\necho 'ImportError: libfoo.so: cannot open shared object' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(vllm_rt, "VENV", tmp_path / "venv")
    monkeypatch.setattr(vllm_rt, "_IMPORT_CHECK", {})
    reason = vllm_rt.VLLM.available()
    assert reason is not None and "libfoo.so" in reason


def test_vllm_decode_step_refuses() -> None:
    with pytest.raises(NotImplementedError, match="one token"):
        vllm_rt.VLLM().decode_step(3)


def test_vllm_attempt_record_is_complete() -> None:
    attempt = vllm_rt.read_attempt()
    if attempt is None:
        pytest.skip("no data/peers/vllm_attempt.json in this checkout")
    for key in ("command", "date", "machine", "status"):
        assert attempt.get(key), f"vllm_attempt.json lacks {key!r}"
    if attempt["status"] != "ok":
        assert attempt.get("error"), "a failed attempt must record the error text"


# --- OpenVINO parity ---------------------------------------------------------------------------


@needs_openvino
def test_openvino_f32_parity(ov_f32, ref) -> None:
    rt = ov_f32
    got = rt.timed_generate(PROMPT, len(ref.tokens), keep_logits=True)
    p = parity(got, ref)
    assert p["greedy_agreement_pct"] == 100.0, p
    assert p["max_abs_logit_err"] <= tol.OTHER_RUNTIME.at("cpu"), p
    # the state is reset by prefill: a second generation gives the same tokens
    assert rt.timed_generate(PROMPT, len(ref.tokens)).tokens == got.tokens


@needs_openvino
def test_openvino_prefill_matches_decode_path(ov_f32) -> None:
    # prompt + t in one prefill == prefill(prompt) then decode_step(t): the state carries K/V
    rt = ov_f32
    rt.prefill(PROMPT)
    stepped = rt.decode_step(11)
    whole = rt.prefill(PROMPT + [11])
    np.testing.assert_allclose(stepped, whole, atol=tol.OTHER_RUNTIME.at("cpu"), rtol=0)


@needs_nncf
def test_openvino_weight_compression(tiny, ref, ov_f32) -> None:
    f32 = ov_f32
    int8 = runtimes.get("openvino-int8")
    int8.load(tiny)
    int4 = runtimes.get("openvino-int4")
    int4.load(tiny)
    assert int8.model_bytes() < 0.35 * f32.model_bytes()
    assert int4.model_bytes() < int8.model_bytes()
    p8 = parity(int8.timed_generate(PROMPT, len(ref.tokens), keep_logits=True), ref)
    assert 0 < p8["max_abs_logit_err"] <= tol.INT8_WEIGHTS.at("cpu"), p8
    p4 = parity(int4.timed_generate(PROMPT, len(ref.tokens), keep_logits=True), ref)
    assert p4["max_abs_logit_err"] > p8["max_abs_logit_err"], (p4, p8)


def test_vllm_stage_links_only_the_model_files_and_replaces_stale_links(tmp_path) -> None:
    """stage_model is keyed by the folder's path, and a link left from an earlier folder at the
    same path (pytest reuses names) is replaced rather than failing or serving old weights."""
    src = tmp_path / "m"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "heldout_slice.safetensors"):
        (src / name).write_text(name)
    stage = vllm_rt.stage_model(src)
    assert sorted(p.name for p in stage.iterdir()) == ["config.json", "model.safetensors"]
    (stage / "model.safetensors").unlink()
    (stage / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")  # dangling
    assert vllm_rt.stage_model(src) == stage
    assert (stage / "model.safetensors").read_text() == "model.safetensors"
    other = tmp_path / "elsewhere" / "m"
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    assert vllm_rt.stage_model(other) != stage


def test_vllm_engine_args_set_the_kv_pool_in_bytes(tmp_path) -> None:
    kw = dict(max_model_len=256, max_num_seqs=4, block_size=32, dtype="float32", max_logprobs=20,
              seed=0)
    args = vllm_rt.engine_args(tmp_path, **kw)
    assert args == dict(model=str(tmp_path), **kw)  # no pool option: VLLM_CPU_KVCACHE_SPACE rules
    args = vllm_rt.engine_args(tmp_path, **kw, kv_cache_bytes=3 * 2**20, prefix_caching=False)
    assert args["kv_cache_memory_bytes"] == 3 * 2**20 and args["enable_prefix_caching"] is False
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match="kv_cache_bytes must be a positive integer"):
            vllm_rt.engine_args(tmp_path, **kw, kv_cache_bytes=bad)
