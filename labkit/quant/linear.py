"""Symmetric linear quantization with coremltools' semantics (``linear_quantize_weights``,
mode "linear_symmetric", signed int, per-channel or per-block).

q = round(w / s) clipped to [-(2**(b-1) - 1), 2**(b-1) - 1], s = 2 * max|w| / (qmax - qmin) over
the group, no zero point. coremltools computes s and w / s in the weight's own dtype, so an fp16
model gets an fp16 scale and fp16 rounding; we do the same. Dequantization (the Core ML op
``constexpr_blockwise_shift_scale``) is q * s, rounded to the weight's dtype.
"""

from __future__ import annotations

import numpy as np


def symmetric_quantize(
    w: np.ndarray, bits: int, block_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 (rows, cols), scale (rows, cols // block)) for rows = output channels.

    ``block_size=None`` is per-channel (one scale per row), else per-block along the input axis
    (coremltools ``granularity="per_block"``, block_size on axis 1).
    """
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D weight (out, in), got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"w must be a floating array, got {w.dtype}")
    rows, cols = w.shape
    group = cols if block_size is None else block_size
    if group <= 0 or cols % group:
        raise ValueError(f"block_size={block_size} must divide the row length {cols}")
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax
    x = w.reshape(rows, cols // group, group)
    max_abs = np.maximum(np.abs(x.min(axis=2, keepdims=True)), np.abs(x.max(axis=2, keepdims=True)))
    # coremltools computes in w's dtype. For fp16 we compute each operation in float32 and round
    # it to fp16: the same bits (float32 has more than 2 * 11 + 2 bits, so the double rounding is
    # exact for + - * /), far faster than numpy's scalar float16 loops.
    f32 = np.float32
    scale = ((max_abs.astype(f32) + max_abs.astype(f32)) / f32(qmax - qmin)).astype(w.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.round((x.astype(f32) / scale.astype(f32)).astype(w.dtype))
    q = np.nan_to_num(np.clip(q, qmin, qmax)).astype(np.int8)
    return q.reshape(rows, cols), scale.reshape(rows, cols // group).astype(w.dtype)


def symmetric_dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q * scale in float32, rounded to the scale's dtype (coremltools' dequantize_by_scale_and_zp)."""
    rows, cols = q.shape
    group = cols // scale.shape[1]
    w = q.reshape(rows, scale.shape[1], group).astype(np.float32) * scale[..., None].astype(
        np.float32
    )
    return w.reshape(rows, cols).astype(scale.dtype)
