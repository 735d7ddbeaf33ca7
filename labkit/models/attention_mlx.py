"""FlashAttention's tiled forward in MLX, beside MLX's own fused attention.

The same algorithm as ``labkit.models.attention.tiled_attention`` (read that docstring first),
written with ``mlx.core`` so that on a Mac it runs on the GPU through Metal. MLX also builds on
Linux, where it runs on the CPU; notebook 06 says which device it used.

MLX is optional: it is imported inside each function, so importing this module never fails.
``available()`` returns ``None`` when MLX can be used, else the reason it cannot.
Arrays are shaped ``[B, H, N, d]`` like the torch versions. MLX evaluates lazily; these
functions return unevaluated arrays, and callers that time them must ``mx.eval`` the result.
"""

from __future__ import annotations

import math
from typing import Any

from labkit.core.checks import positive_int
from labkit.models.attention import _check_qkv

__all__ = [
    "available",
    "device_name",
    "sdpa_attention_mlx",
    "tiled_attention_mlx",
]


def available() -> str | None:
    """``None`` if MLX imports and computes here, else why not and how to get it."""
    try:
        import mlx.core as mx
    except ImportError as exc:
        return (
            f"mlx is not installed ({exc}); `pip install mlx` on macOS, "
            "`pip install 'mlx[cpu]'` on Linux"
        )
    try:
        mx.eval(mx.zeros((1,)) + 1)
    except Exception as exc:  # a wheel without a usable backend fails here, not at import
        return f"mlx is installed but cannot compute on this machine: {exc}"
    return None


def device_name() -> str:
    """The device MLX computes on by default, e.g. ``"gpu"`` (Metal) on a Mac, ``"cpu"`` here."""
    import mlx.core as mx

    return "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"


def sdpa_attention_mlx(q: Any, k: Any, v: Any, causal: bool = False) -> Any:
    """MLX's fused kernel, ``mx.fast.scaled_dot_product_attention``: the MLX reference."""
    import mlx.core as mx

    _check_qkv(q, k, v, causal)
    scale = 1.0 / math.sqrt(q.shape[-1])
    return mx.fast.scaled_dot_product_attention(
        q, k, v, scale=scale, mask="causal" if causal else None
    )


def tiled_attention_mlx(
    q: Any, k: Any, v: Any, causal: bool = False, block_q: int = 64, block_k: int = 64
) -> Any:
    """FlashAttention forward (Algorithm 1 names, FlashAttention-2 loop order) in MLX.

    Query blocks ``Q_i`` of ``B_r`` rows outside, key/value blocks ``K_j, V_j`` of ``B_c`` rows
    inside; running max ``m_i``, running sum ``l_i`` and output ``O_i`` rescaled by
    ``exp(m_old - m_new)`` whenever a tile raises the maximum. Causal skips tiles above the
    diagonal and masks the ones it crosses. Works for any ``N``.
    """
    import mlx.core as mx

    _check_qkv(q, k, v, causal)
    B_r = positive_int(block_q, "block_q", "tiled_attention_mlx")
    B_c = positive_int(block_k, "block_k", "tiled_attention_mlx")
    N_q, N_k = q.shape[2], k.shape[2]
    batch_heads = tuple(q.shape[:2])
    scale = 1.0 / math.sqrt(q.shape[-1])
    blocks = []

    for q_start in range(0, N_q, B_r):
        q_end = min(q_start + B_r, N_q)
        Q_i = q[:, :, q_start:q_end] * scale
        rows = q_end - q_start
        m_i = mx.full((*batch_heads, rows, 1), -math.inf, dtype=q.dtype)
        l_i = mx.zeros((*batch_heads, rows, 1), dtype=q.dtype)
        O_i = mx.zeros((*batch_heads, rows, v.shape[-1]), dtype=q.dtype)

        k_stop = q_end if causal else N_k  # keys from q_end on are above the diagonal: skip
        for k_start in range(0, k_stop, B_c):
            k_end = min(k_start + B_c, N_k)
            K_j = k[:, :, k_start:k_end]
            V_j = v[:, :, k_start:k_end]

            S_ij = Q_i @ K_j.transpose(0, 1, 3, 2)
            if causal and k_end - 1 > q_start:  # the diagonal crosses this tile
                query_index = mx.arange(q_start, q_end)[:, None]
                key_index = mx.arange(k_start, k_end)[None, :]
                S_ij = mx.where(key_index > query_index, -math.inf, S_ij)

            m_new = mx.maximum(m_i, S_ij.max(axis=-1, keepdims=True))
            P_ij = mx.exp(S_ij - m_new)
            correction = mx.exp(m_i - m_new)
            l_i = correction * l_i + P_ij.sum(axis=-1, keepdims=True)
            O_i = correction * O_i + P_ij @ V_j
            m_i = m_new

        # Evaluate each query block as it finishes: MLX is lazy, and without this the whole
        # graph (every tile of S) would be alive at once when the caller finally evaluates.
        block = O_i / l_i
        mx.eval(block)
        blocks.append(block)
    return mx.concatenate(blocks, axis=2)
