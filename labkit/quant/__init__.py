"""Quantization: the schemes of Core ML, MLX, GGUF and our own, their exact cost, and error metrics.

``from labkit.quant import SCHEMES, bits_per_weight`` is light (no numpy, no libraries), and so is
``labkit.quant.footprint`` (a checkpoint's bytes at a precision, from its config alone). The
quantizers (``labkit.quant.ops``), the model-level error metrics and their bootstrap intervals
(``labkit.quant.evaluate``) and llama.cpp's per-tensor mixes such as Q4_K_M
(``labkit.quant.recipes``) load numpy/torch when imported; the reference libraries (gguf, mlx,
coremltools) are only imported by the tests that compare against them.
"""

from labkit.quant.schemes import (
    GGUF_BLOCKS,
    GGUF_FALLBACK,
    SCHEMES,
    Scheme,
    bits_per_weight,
    get_scheme,
    gguf_type_for,
    model_bits_per_weight,
    tensor_bits,
)

__all__ = [
    "GGUF_BLOCKS",
    "GGUF_FALLBACK",
    "SCHEMES",
    "Scheme",
    "bits_per_weight",
    "get_scheme",
    "gguf_type_for",
    "model_bits_per_weight",
    "tensor_bits",
]
