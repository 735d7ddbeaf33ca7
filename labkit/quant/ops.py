"""One entry point: a weight matrix through a scheme and back (``fake_quantize``), and its SNR.

The evaluation runs the model in float32 with each quantized weight replaced by what the target
runtime would reconstruct ("fake quantization"): the error measured is the weights' error, not
a kernel's accumulation order. Core ML and MLX schemes start from the fp16-rounded weight (the
dtype those runtimes deploy); LUT palettization clusters the fp32 weight (see
labkit.quant.palettize); GGUF quantizes the weight as the checkpoint holds it, read as float32,
as llama-quantize does from the F16 or F32 GGUF converted from that checkpoint. For an fp16
checkpoint (tiny-llama) the last two are the same values; for SmolLM2's float32 weights, which
are dequantized Q4_1, GGUF Q4_1 then gives them back bit for bit.
"""

from __future__ import annotations

import numpy as np

from labkit.quant import gguf_blocks
from labkit.quant.affine import affine_dequantize, affine_quantize
from labkit.quant.linear import symmetric_dequantize, symmetric_quantize
from labkit.quant.palettize import depalettize, palettize
from labkit.quant.schemes import Scheme, get_scheme, gguf_type_for, mlx_keeps_fp16


def fake_quantize(w: np.ndarray, scheme: str | Scheme) -> np.ndarray:
    """``w`` (out, in) as ``scheme``'s runtime reconstructs it, returned as float32."""
    s = get_scheme(scheme)
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a 2-D weight (out, in), got shape {w.shape}")
    w16 = w.astype(np.float16)
    if not np.all(np.isfinite(w16)):
        raise ValueError("w has values that are not finite in fp16; it cannot be quantized here")
    if s.kind == "float":
        out = w16
    elif s.kind == "symmetric":
        block = s.group_size if s.granularity == "per_block" else None
        out = symmetric_dequantize(*symmetric_quantize(w16, s.bits, block))
    elif s.kind == "affine" and mlx_keeps_fp16(s, w.shape[1]):
        out = w16  # mlx_lm leaves such a Linear unquantized (labkit.quant.schemes)
    elif s.kind == "affine":
        q, scales, biases = affine_quantize(w16, s.bits, s.group_size or 0)
        out = affine_dequantize(q, scales, biases, s.group_size or 0)
    elif s.kind == "lut":
        group = s.group_size if s.granularity == "per_grouped_channel" else None
        out = depalettize(*palettize(w.astype(np.float32), s.bits, group))
    elif s.kind == "gguf":
        t = gguf_type_for(s, w.shape[1])
        out = gguf_blocks.dequantize(gguf_blocks.quantize(w.astype(np.float32), t), t, w.shape[1])
    else:
        raise ValueError(f"scheme {s.name!r} has unknown kind {s.kind!r}")
    return np.asarray(out, dtype=np.float32)


def weight_snr_db(w: np.ndarray, w_hat: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(sum w^2 / sum (w - w_hat)^2), in dB."""
    w = np.asarray(w, dtype=np.float64)
    err = float(np.sum((w - np.asarray(w_hat, dtype=np.float64)) ** 2))
    sig = float(np.sum(w**2))
    if err == 0.0:
        return float("inf")
    return 10.0 * np.log10(sig / err)
