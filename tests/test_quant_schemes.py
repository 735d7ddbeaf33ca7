"""bits_per_weight: the one source of truth for a scheme's storage cost (hand-computed values)."""

from __future__ import annotations

import pytest

from labkit.quant import GGUF_BLOCKS, SCHEMES, bits_per_weight, model_bits_per_weight, tensor_bits


@pytest.mark.parametrize(
    ("name", "bpw"),
    [
        ("gguf-q8_0", 34 * 8 / 32),  # fp16 d + 32 int8
        ("gguf-q4_0", 18 * 8 / 32),  # fp16 d + 16 bytes of nibbles
        ("gguf-q4_k", 144 * 8 / 256),
        ("gguf-q6_k", 210 * 8 / 256),
        ("gguf-q5_0", 22 * 8 / 32),
        ("mlx-affine4-g64", 4 + 32 / 64),  # fp16 scale + fp16 bias per 64
        ("mlx-affine3-g32", 3 + 32 / 32),
        ("mlx-affine8-g128", 8 + 32 / 128),
        ("coreml-int4-block32", 4 + 16 / 32),  # fp16 scale per 32, no zero point
        ("fp16", 16.0),
    ],
)
def test_block_schemes_have_shape_free_cost(name: str, bpw: float) -> None:
    assert bits_per_weight(name) == bpw
    assert bits_per_weight(name, (512, 1536)) == bpw


def test_k_quants_fall_back_like_llama_cpp_when_rows_are_not_256_multiples() -> None:
    # tiny-llama's down_proj has 1408 inputs: llama.cpp stores Q4_K as Q5_0 and Q6_K as Q8_0.
    assert bits_per_weight("gguf-q4_k", (512, 1408)) == 22 * 8 / 32
    assert bits_per_weight("gguf-q6_k", (512, 1408)) == 34 * 8 / 32


def test_shape_dependent_costs_count_scales_and_luts() -> None:
    shape = (512, 1408)
    n = 512 * 1408
    assert bits_per_weight("coreml-int8-channel", shape) == 8 + 16 / 1408
    assert bits_per_weight("coreml-lut4-tensor", shape) == 4 + 16 * 32 / n
    # 16 rows share a 16-entry fp32 LUT: 32 LUTs for 512 rows.
    assert tensor_bits("coreml-lut4-g16", shape) == n * 4 + 32 * 16 * 32
    with pytest.raises(ValueError, match="pass shape"):
        bits_per_weight("coreml-int8-channel")


def test_model_cost_is_weighted_by_tensor_size() -> None:
    shapes = [(128, 64), (256, 64)]
    expected = (
        tensor_bits("coreml-int8-channel", shapes[0])
        + tensor_bits("coreml-int8-channel", shapes[1])
    ) / (128 * 64 + 256 * 64)
    assert model_bits_per_weight("coreml-int8-channel", shapes) == expected


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown quantization scheme 'q5'"):
        bits_per_weight("q5")
    with pytest.raises(ValueError, match="multiple of 32"):
        tensor_bits("gguf-q4_k", (4, 100))


def test_gguf_block_sizes_match_the_gguf_package() -> None:
    gguf = pytest.importorskip("gguf", reason="needs the gguf package (extra 'llamacpp')")
    for name, (block, nbytes) in GGUF_BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (block, nbytes)


def test_every_scheme_is_priced() -> None:
    for name in SCHEMES:
        assert bits_per_weight(name, (256, 512)) > 0
