"""MLX on Metal: the tiled attention and MLX's fused kernel against torch, its peak memory, the
runtime adapter on the GPU, and mx.quantize on the GPU against labkit's mirror of its CPU kernel.
Skipped off macOS with "needs macOS 14" (the mlx wheel is macosx_14_0; Linux runs MLX's CPU
backend in the other tests).

Tolerances: attention within ``ATTENTION.at("mps")`` of torch's float32 SDPA on the CPU; the
runtime within ``OTHER_RUNTIME.at("mps")`` of torch's logits; quantization scales and biases
within one float ulp of the CPU kernel's (a fused multiply-add on the GPU rounds once, the CPU
kernel twice), codes exactly equal on the CPU stream.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import needs_macos, random_llama_with_shipped_tokenizer

from labkit.core import tolerances as tol

pytestmark = needs_macos((14, 0), "MLX on Metal: pip install -e '.[mlx]'")
mx = pytest.importorskip("mlx.core", reason="needs mlx: pip install -e '.[mlx]'")


def test_mlx_computes_on_the_metal_gpu() -> None:
    from labkit.models import attention_mlx

    assert attention_mlx.available() is None
    assert attention_mlx.device_name() == "gpu" and mx.metal.is_available()


@pytest.mark.parametrize("n", [1, 65, 257])
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_and_fused_attention_on_metal_match_torch(n: int, causal: bool) -> None:
    from labkit.models.attention import sdpa_attention
    from labkit.models.attention_mlx import sdpa_attention_mlx, tiled_attention_mlx

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 4, n, 64, generator=g) for _ in range(3))
    want = sdpa_attention(q, k, v, causal).numpy()
    mq, mk, mv = (mx.array(t.numpy()) for t in (q, k, v))
    for fn in (tiled_attention_mlx, sdpa_attention_mlx):
        got = np.array(fn(mq, mk, mv, causal))
        assert float(np.abs(got - want).max()) <= tol.ATTENTION.at("mps"), fn.__name__


def test_peak_mlx_bytes_counts_the_gpu_buffers() -> None:
    from labkit.core.memory import peak_mlx_bytes

    peak, out = peak_mlx_bytes(lambda: mx.eval(mx.ones((1024, 1024)) * 2))
    assert peak >= 1024 * 1024 * 4


def test_the_mlx_runtime_runs_on_the_gpu(tmp_path, monkeypatch) -> None:
    pytest.importorskip("mlx_lm", reason="needs mlx-lm: pip install -e '.[mlx]'")
    from labkit import runtimes
    from labkit.models import load

    monkeypatch.setenv("LABKIT_RUNTIME_CACHE", str(tmp_path / "cache"))
    folder = random_llama_with_shipped_tokenizer(tmp_path / "m")
    ids = [0, 17, 940, 3, 5000, 12]
    with torch.no_grad():
        want = load(folder, device="cpu").model(torch.tensor([ids]))[0].numpy()
    rt = runtimes.get("mlx")
    assert rt.device == "gpu"
    rt.load(folder)
    got = [rt.prefill(ids[:3])] + [rt.decode_step(t) for t in ids[3:]]
    for pos, logits in zip(range(2, len(ids)), got, strict=False):
        assert float(np.abs(logits - want[pos]).max()) <= tol.OTHER_RUNTIME.at("mps"), pos


@pytest.mark.parametrize("bits", [4, 8])
def test_mx_quantize_on_metal_is_the_cpu_kernel_within_one_ulp(bits: int) -> None:
    from labkit.quant.affine import affine_quantize

    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    q, scales, biases = affine_quantize(w, bits, 64)
    with mx.stream(mx.cpu):  # the kernel labkit mirrors: bit for bit
        _, cpu_scales, cpu_biases = mx.quantize(mx.array(w), group_size=64, bits=bits)
        np.testing.assert_array_equal(scales, np.array(cpu_scales))
        np.testing.assert_array_equal(biases, np.array(cpu_biases))
    _, gpu_scales, gpu_biases = mx.quantize(mx.array(w), group_size=64, bits=bits)  # default: GPU
    np.testing.assert_array_max_ulp(scales, np.array(gpu_scales), maxulp=1)
    np.testing.assert_array_max_ulp(biases, np.array(gpu_biases), maxulp=1)
