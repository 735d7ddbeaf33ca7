"""Affine group-wise quantization with MLX's semantics (``mx.quantize`` / ``mx.dequantize``).

Every ``group_size`` consecutive weights of a row share a scale s and a bias b: w ~ s * q + b,
q in [0, 2**bits - 1]. MLX does not simply take b = min: it snaps the group's edge of largest
magnitude onto the grid exactly (q0 = rint(edge / s), s = edge / q0, b = edge), so the biggest
weight is reconstructed without error. The search runs in float32; scales and biases are then
stored in the weight's dtype (fp16 for an fp16 model) and dequantization runs in that dtype.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def affine_quantize(
    w: np.ndarray, bits: int, group_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q uint8 codes (rows, cols), scales, biases (rows, cols // group_size)) as MLX's CPU kernel.

    Scales and biases come back in ``w``'s dtype, as ``mx.quantize`` returns them.
    """
    if w.ndim != 2 or w.shape[1] % group_size:
        raise ValueError(
            f"w must be 2-D with a row length that is a multiple of group_size={group_size}, "
            f"got shape {w.shape}"
        )
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 5, 6, 8 for MLX affine, got {bits}")
    rows, cols = w.shape
    x = w.astype(F32).reshape(rows, cols // group_size, group_size)
    n_bins = F32(2**bits - 1)
    w_min = x.min(axis=2)
    w_max = x.max(axis=2)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, F32(1e-7))
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    q0 = np.rint(edge / scale)
    snapped = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(snapped, edge / q0, scale).astype(F32)
    bias = np.where(snapped, edge, F32(0)).astype(F32)
    q = np.rint((x - bias[..., None]) / scale[..., None])
    q = np.clip(q, F32(0), n_bins).astype(np.uint8).reshape(rows, cols)
    return q, scale.astype(w.dtype), bias.astype(w.dtype)


def affine_dequantize(
    q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int
) -> np.ndarray:
    """w = scale * q + bias, in the scales' dtype (MLX multiplies, rounds, adds, rounds)."""
    rows, cols = q.shape
    dtype = scales.dtype
    f32 = np.float32
    qg = q.reshape(rows, cols // group_size, group_size).astype(f32)
    # Each op in float32, rounded to the scales' dtype: for fp16 the same bits as fp16 arithmetic
    # (float32 carries more than 2 * 11 + 2 bits), without numpy's slow float16 loops.
    w = (qg * scales[..., None].astype(f32)).astype(dtype)
    w = (w.astype(f32) + biases[..., None].astype(f32)).astype(dtype)
    return w.reshape(rows, cols)
