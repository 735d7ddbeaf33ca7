"""Our attention against PyTorch's SDPA (and MLX's fused kernel), in the style of llm.c's tests.

Tolerance: max absolute difference <= tolerances.ATTENTION (1e-5 in float32 on a CPU). Outputs
are convex combinations of V rows (|O| of order 1 for standard-normal inputs), and a different
summation order costs a few float32 ulps (~1e-7 each), so 1e-5 leaves room for rounding but not
for a wrong softmax: a missing ``exp(m_old - m_new)`` rescale or a wrong mask moves outputs by
~1e-1.
"""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs_diff

from labkit.core import tolerances as tol
from labkit.core.memory import peak_bytes, peak_cpu_bytes
from labkit.models import attention_mlx
from labkit.models.attention import naive_attention, sdpa_attention, tiled_attention

D = 64
LENGTHS = [1, 7, 65, 129]  # 1 and odd lengths: none is a multiple of the blocks below
BLOCKS = [(32, 32), (16, 32), (32, 16), (7, 13), (256, 256)]  # B_r != B_c, odd, larger than N


def _qkv(n: int, seed: int = 0, batch: int = 2, heads: int = 3, n_k: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    n_k = n if n_k is None else n_k
    q = torch.randn(batch, heads, n, D, generator=generator)
    k = torch.randn(batch, heads, n_k, D, generator=generator)
    v = torch.randn(batch, heads, n_k, D, generator=generator)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("block_q,block_k", BLOCKS)
def test_tiled_matches_sdpa(n: int, causal: bool, block_q: int, block_k: int) -> None:
    q, k, v = _qkv(n)
    expected = sdpa_attention(q, k, v, causal)
    got = tiled_attention(q, k, v, causal, block_q=block_q, block_k=block_k)
    assert got.dtype == torch.float32
    assert max_abs_diff(got, expected) <= tol.ATTENTION.at("cpu")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
def test_naive_matches_sdpa(n: int, causal: bool) -> None:
    q, k, v = _qkv(n, seed=1)
    naive, sdpa = naive_attention(q, k, v, causal), sdpa_attention(q, k, v, causal)
    assert max_abs_diff(naive, sdpa) <= tol.ATTENTION.at("cpu")


@pytest.mark.parametrize("causal", [False, True])
def test_tiled_is_stable_with_large_scores(causal: bool) -> None:
    """Scores in the hundreds overflow exp() unless the running maximum is subtracted first."""
    q, k, v = _qkv(129, seed=2)
    q = q * 30.0
    got = tiled_attention(q, k, v, causal, block_q=32, block_k=32)
    assert torch.isfinite(got).all()
    assert max_abs_diff(got, sdpa_attention(q, k, v, causal)) <= tol.ATTENTION.at("cpu")


def test_tiled_cross_attention_with_different_lengths() -> None:
    """Non-causal attention needs no square score matrix: 33 queries over 100 keys."""
    q, k, v = _qkv(33, seed=3, n_k=100)
    got = tiled_attention(q, k, v, block_q=16, block_k=32)
    assert max_abs_diff(got, sdpa_attention(q, k, v)) <= tol.ATTENTION.at("cpu")


def test_causal_skips_blocks_above_the_diagonal() -> None:
    """Query block 0 (rows 0..31) must never read keys or values from position 32 on.

    NaN planted there would leak even through a masked tile (0 * NaN is NaN in P_ij @ V_j), so
    finite, correct rows 0..31 show those tiles were skipped, not computed and masked.
    """
    q, k, v = _qkv(128, seed=4)
    expected = sdpa_attention(q, k, v, causal=True)
    k[:, :, 32:] = float("nan")
    v[:, :, 32:] = float("nan")
    got = tiled_attention(q, k, v, causal=True, block_q=32, block_k=32)
    assert torch.isfinite(got[:, :, :32]).all()
    assert max_abs_diff(got[:, :, :32], expected[:, :, :32]) <= tol.ATTENTION.at("cpu")


def test_bad_inputs_name_the_parameter() -> None:
    q, k, v = _qkv(8)
    with pytest.raises(ValueError, match="block_q"):
        tiled_attention(q, k, v, block_q=0)
    with pytest.raises(ValueError, match="block_k"):
        tiled_attention(q, k, v, block_k=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, N, d\]"):
        naive_attention(q[0], k, v)
    q_short, k_long, v_long = _qkv(4, n_k=8)
    with pytest.raises(ValueError, match="causal=True needs as many queries as keys"):
        tiled_attention(q_short, k_long, v_long, causal=True)
    with pytest.raises(ValueError, match="head dimension"):
        sdpa_attention(q, k[..., :32], v)


def test_tiled_peak_memory_is_far_below_naive() -> None:
    """The point of tiling, measured: at N=1024 naive holds two N x N float32 matrices (S, P:
    8 MiB), the tiled forward one 64 x 64 tile at a time plus the output."""
    q, k, v = _qkv(1024, batch=1, heads=1)
    naive_peak, _ = peak_cpu_bytes(lambda: naive_attention(q, k, v))
    tiled_peak, _ = peak_cpu_bytes(lambda: tiled_attention(q, k, v))
    assert naive_peak >= 2 * 1024 * 1024 * 4  # S and P, each N^2 float32
    assert tiled_peak < naive_peak / 8


# MLX: optional. Skips only when mlx cannot be used here, and says why.
_MLX_MISSING = attention_mlx.available()
requires_mlx = pytest.mark.skipif(_MLX_MISSING is not None, reason=f"skipped: {_MLX_MISSING}")


def _to_mlx(*tensors: torch.Tensor):
    import mlx.core as mx

    return tuple(mx.array(t.numpy()) for t in tensors)


@requires_mlx
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("block_q,block_k", [(32, 32), (16, 32), (7, 13)])
def test_mlx_tiled_matches_mlx_sdpa_and_torch(
    n: int, causal: bool, block_q: int, block_k: int
) -> None:
    import numpy as np

    q, k, v = _qkv(n, seed=5)
    mq, mk, mv = _to_mlx(q, k, v)
    got = np.array(attention_mlx.tiled_attention_mlx(mq, mk, mv, causal, block_q, block_k))
    mlx_reference = np.array(attention_mlx.sdpa_attention_mlx(mq, mk, mv, causal))
    torch_reference = sdpa_attention(q, k, v, causal).numpy()
    assert got.shape == torch_reference.shape
    assert np.abs(got - mlx_reference).max() <= tol.ATTENTION.at("cpu")
    assert np.abs(got - torch_reference).max() <= tol.ATTENTION.at("cpu")


@requires_mlx
def test_mlx_rejects_bad_blocks() -> None:
    mq, mk, mv = _to_mlx(*_qkv(8))
    with pytest.raises(ValueError, match="block_k"):
        attention_mlx.tiled_attention_mlx(mq, mk, mv, block_k=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="skipped: needs a CUDA GPU")
def test_peak_bytes_on_cuda_counts_the_score_matrix() -> None:
    q, k, v = (t.cuda() for t in _qkv(1024, batch=1, heads=1))
    naive_peak, _ = peak_bytes(lambda: naive_attention(q, k, v), "cuda")
    tiled_peak, _ = peak_bytes(lambda: tiled_attention(q, k, v), "cuda")
    assert naive_peak >= 2 * 1024 * 1024 * 4
    assert tiled_peak < naive_peak / 8
