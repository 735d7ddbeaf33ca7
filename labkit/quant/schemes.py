"""The quantization schemes of the lab and their exact storage cost: one source of truth.

A scheme says how a 2-D weight ``W[out, in]`` (PyTorch ``nn.Linear`` layout: one row per output
channel, blocks run along the input dimension, contiguous in memory) is stored. Its cost in bits
per weight counts everything the file holds for that tensor: the codes, the scales, the zero
points or biases, and the look-up tables. Scales and biases are counted at 16 bits (fp16), as
they are stored when the deployed model is fp16 (Core ML's default precision, MLX's fp16/bf16
models, GGUF's ``d``/``dmin`` fields). LUT entries are counted at 32 bits: we palettize the fp32
model, the case in which coremltools runs its scikit-learn k-means (for fp16 groups of 10,000+
weights it switches to a different clusterer, kmeans1d; see labkit.quant.palettize).

Some costs depend on the tensor's shape (a per-channel scale is spread over one row, a per-tensor
LUT over the whole tensor); for those, ``bits_per_weight`` needs the shape and says so if it is
missing. Block schemes (GGUF, MLX, Core ML per-block) cost the same for every shape.

Nothing here imports numpy, torch or a quantization library: the planner and the CLI can ask for
a scheme's cost without loading anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

SCALE_BITS = 16  # fp16 scales, biases, GGUF d/dmin
LUT_ENTRY_BITS = 32  # fp32 palettes (see the module docstring)

# GGUF block layouts (ggml-common.h): elements per block and bytes per block.
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 2 + 32),  # fp16 d, 32 x int8
    "Q5_0": (32, 2 + 4 + 16),  # fp16 d, 32 high bits, 32 x low 4 bits
    "Q4_1": (32, 2 + 2 + 16),  # fp16 d, fp16 m (the block's minimum), 32 x 4-bit
    "Q4_0": (32, 2 + 16),  # fp16 d, 32 x 4-bit
    "Q2_K": (256, 16 + 64 + 2 + 2),  # 16 x (4-bit scale, 4-bit min), 256 x 2-bit, fp16 d, dmin
    "Q4_K": (256, 2 + 2 + 12 + 128),  # fp16 d, dmin, 8 x (6-bit scale, 6-bit min), 256 x 4-bit
    "Q6_K": (256, 128 + 64 + 16 + 2),  # low 4 bits, high 2 bits, 16 x int8 scales, fp16 d
}

# llama.cpp's quantizer (llama_tensor_get_type) stores a tensor whose rows are not a multiple of
# 256 in a 32-block type instead of a K-quant. The shipped tiny-llama's down_proj (1408 inputs)
# is such a tensor, so its cost and error follow the fallback, as they would in a real GGUF.
GGUF_FALLBACK: dict[str, str] = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}

# mlx_lm's quantize_model (ml-explore/mlx-lm, mlx_lm/utils.py, its ``wrapped_predicate``) leaves a
# Linear unquantized when its rows are not a multiple of the group size: ``mx.quantize`` cannot
# group them. SmolLM2's 576-input matrices under group 128 are such tensors; they stay in the
# model's fp16, priced and reconstructed as such (:func:`mlx_keeps_fp16`).


@dataclass(frozen=True)
class Scheme:
    """One way to store a weight matrix.

    kind:
      "float"     no quantization (fp16 storage): the reference point of every scoreboard.
      "symmetric" q = round(w / s), s = max|w| / qmax over a group; no zero point (coremltools
                  ``linear_symmetric``).
      "affine"    w ~ s * q + b per group (MLX ``mx.quantize``).
      "lut"       w ~ lut[q]: a k-means palette per tensor or per group of output channels
                  (coremltools ``palettize_weights``, mode "kmeans").
      "gguf"      a GGUF block type (``gguf_type``), bytes as ggml lays them out.
    granularity:
      "per_tensor", "per_channel" (one row), "per_block" (``group_size`` consecutive inputs of
      one row), "per_grouped_channel" (``group_size`` whole rows share one LUT).
    """

    name: str
    library: str  # the library whose semantics the scheme mirrors: coremltools, mlx, gguf, labkit
    kind: str
    bits: int
    granularity: str
    group_size: int | None = None
    gguf_type: str | None = None

    @property
    def shape_dependent(self) -> bool:
        """True when the cost per weight depends on the tensor's shape."""
        return self.granularity in ("per_tensor", "per_channel", "per_grouped_channel")


def _coreml() -> list[Scheme]:
    out = [
        Scheme("coreml-int8-channel", "coremltools", "symmetric", 8, "per_channel"),
        Scheme("coreml-int4-block32", "coremltools", "symmetric", 4, "per_block", 32),
    ]
    for bits in (2, 3, 4, 6, 8):
        out.append(Scheme(f"coreml-lut{bits}-tensor", "coremltools", "lut", bits, "per_tensor"))
    for bits in (2, 3, 4):
        out.append(
            Scheme(f"coreml-lut{bits}-g16", "coremltools", "lut", bits, "per_grouped_channel", 16)
        )
    return out


def _mlx() -> list[Scheme]:
    return [
        Scheme(f"mlx-affine{bits}-g{group}", "mlx", "affine", bits, "per_block", group)
        for bits in (2, 3, 4, 6, 8)
        for group in (32, 64, 128)
    ]


def _gguf() -> list[Scheme]:
    bits = {"Q8_0": 8, "Q6_K": 6, "Q5_0": 5, "Q4_K": 4, "Q4_1": 4, "Q4_0": 4}
    return [
        Scheme(f"gguf-{t.lower()}", "gguf", "gguf", b, "per_block", GGUF_BLOCKS[t][0], t)
        for t, b in bits.items()
    ]


def _labkit() -> list[Scheme]:
    return [
        Scheme("fp16", "labkit", "float", 16, "per_tensor"),
        Scheme("labkit-int4-channel", "labkit", "symmetric", 4, "per_channel"),
    ]


SCHEMES: dict[str, Scheme] = {s.name: s for s in _labkit() + _coreml() + _mlx() + _gguf()}


def get_scheme(scheme: str | Scheme) -> Scheme:
    """The Scheme for a name (or the Scheme itself); a clear error lists the known names."""
    if isinstance(scheme, Scheme):
        return scheme
    try:
        return SCHEMES[scheme]
    except KeyError:
        raise ValueError(
            f"unknown quantization scheme {scheme!r}; known: {', '.join(sorted(SCHEMES))}"
        ) from None


def tensor_bits(scheme: str | Scheme, shape: tuple[int, ...]) -> int:
    """Exact bits to store one weight tensor of ``shape`` (rows = output channels) in ``scheme``.

    Codes at ``bits`` each, plus per scheme: one fp16 scale per row (per_channel) or per block
    (symmetric per_block); an fp16 scale and an fp16 bias per group (affine); a LUT of
    ``2**bits`` fp32 entries per tensor or per group of rows (lut); whole ggml blocks (gguf).
    """
    s = get_scheme(scheme)
    if len(shape) < 1 or any(int(d) <= 0 for d in shape):
        raise ValueError(f"shape must be positive dimensions (rows, cols, ...), got {shape!r}")
    n = prod(int(d) for d in shape)
    rows, cols = int(shape[0]), n // int(shape[0])
    if s.kind == "float":
        return n * s.bits
    if s.kind == "gguf":
        block, nbytes = GGUF_BLOCKS[gguf_type_for(s, cols)]
        _check_divisible(s, cols, block)
        return (n // block) * nbytes * 8
    codes = n * s.bits
    if s.kind == "symmetric":
        if s.granularity == "per_channel":
            return codes + rows * SCALE_BITS
        _check_divisible(s, cols, s.group_size or 0)
        return codes + (n // (s.group_size or 1)) * SCALE_BITS
    if s.kind == "affine":
        if mlx_keeps_fp16(s, cols):
            return n * 16  # left in fp16
        return codes + (n // (s.group_size or 1)) * 2 * SCALE_BITS
    if s.kind == "lut":
        lut = (2**s.bits) * LUT_ENTRY_BITS
        if s.granularity == "per_tensor":
            return codes + lut
        _check_divisible(s, rows, s.group_size or 0, axis="rows")
        return codes + (rows // (s.group_size or 1)) * lut
    raise ValueError(f"scheme {s.name!r} has unknown kind {s.kind!r}")


def gguf_type_for(scheme: str | Scheme, cols: int) -> str:
    """The GGUF block type a tensor with ``cols`` inputs gets: the scheme's, or its fallback."""
    s = get_scheme(scheme)
    if s.gguf_type is None:
        raise ValueError(f"scheme {s.name!r} is not a GGUF scheme")
    block = GGUF_BLOCKS[s.gguf_type][0]
    if cols % block and s.gguf_type in GGUF_FALLBACK:
        return GGUF_FALLBACK[s.gguf_type]
    return s.gguf_type


def mlx_keeps_fp16(scheme: str | Scheme, cols: int) -> bool:
    """True when mlx_lm would leave a tensor with ``cols`` inputs unquantized under this MLX
    affine scheme (``cols`` not a multiple of its group size; see the note above)."""
    s = get_scheme(scheme)
    return s.kind == "affine" and cols % (s.group_size or 1) != 0


def _check_divisible(s: Scheme, dim: int, group: int, axis: str = "cols") -> None:
    if group <= 0 or dim % group:
        raise ValueError(
            f"scheme {s.name!r} needs the tensor's {axis} ({dim}) to be a multiple of {group}"
        )


def bits_per_weight(scheme: str | Scheme, shape: tuple[int, ...] | None = None) -> float:
    """Exact bits per weight of ``scheme``, overheads (scales, biases, zero points, LUTs) included.

    Block schemes cost the same for any shape: ``bits_per_weight("gguf-q4_k") == 4.5``,
    ``bits_per_weight("mlx-affine4-g64") == 4.5`` (with a shape whose rows are not a multiple of
    256, a K-quant is priced as llama.cpp's fallback type, ``GGUF_FALLBACK``; with rows that are
    not a multiple of an MLX group, the tensor stays fp16, as mlx_lm leaves it). Per-channel and
    LUT schemes spread their
    overhead over a row or a tensor, so they need ``shape`` (rows = output channels); without it
    they raise ValueError rather than guess.
    """
    s = get_scheme(scheme)
    if shape is None:
        if s.shape_dependent and s.kind != "float":
            raise ValueError(
                f"bits_per_weight({s.name!r}) depends on the tensor shape "
                f"({s.granularity} overhead); pass shape=(rows, cols)"
            )
        # One block is a valid shape for every shape-independent scheme.
        shape = (1, s.group_size or 1)
    n = prod(int(d) for d in shape)
    return tensor_bits(s, tuple(shape)) / n


def model_bits_per_weight(scheme: str | Scheme, shapes: list[tuple[int, ...]]) -> float:
    """Bits per weight of a whole set of tensors (e.g. every quantized Linear of a model)."""
    if not shapes:
        raise ValueError("shapes must list at least one tensor shape")
    bits = sum(tensor_bits(scheme, tuple(sh)) for sh in shapes)
    return bits / sum(prod(int(d) for d in sh) for sh in shapes)
