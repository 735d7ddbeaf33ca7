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


def test_q4_1_costs_five_bits_per_weight() -> None:
    assert bits_per_weight("gguf-q4_1") == 5.0  # (2 + 2 + 16) bytes per 32 weights
    assert tensor_bits("gguf-q4_1", (576, 576)) == 576 * 576 * 5


#: every matrix shape of SmolLM2-135M's blocks (hidden 576, 9 x 64 query heads, 3 x 64 KV heads,
#: MLP 1536), rows = outputs
SMOLLM2_SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576),
                  "o_proj": (576, 576), "gate_proj": (1536, 576), "up_proj": (1536, 576),
                  "down_proj": (576, 1536)}


def test_every_scheme_prices_the_real_models_shapes() -> None:
    for name in SCHEMES:
        for shape in SMOLLM2_SHAPES.values():
            bits = tensor_bits(name, shape)
            assert bits >= shape[0] * shape[1] * SCHEMES[name].bits, (name, shape)


def test_k_quants_fall_back_on_576_inputs_and_not_on_1536() -> None:
    """576 is not a multiple of 256: llama.cpp stores those K-quant tensors as Q5_0 / Q8_0."""
    assert bits_per_weight("gguf-q4_k", SMOLLM2_SHAPES["q_proj"]) == 5.5
    assert bits_per_weight("gguf-q6_k", SMOLLM2_SHAPES["k_proj"]) == 8.5
    assert bits_per_weight("gguf-q4_k", SMOLLM2_SHAPES["down_proj"]) == 4.5
    assert bits_per_weight("gguf-q6_k", SMOLLM2_SHAPES["down_proj"]) == 6.5625


@pytest.mark.parametrize("cols", [576, 1536])
def test_every_scheme_quantizes_the_real_models_rows(cols: int) -> None:
    """fake_quantize runs every scheme on rows of 576 and 1536 inputs (16 rows: the LUT groups)."""
    import numpy as np

    from labkit.quant.ops import fake_quantize, weight_snr_db

    w = (np.random.default_rng(cols).standard_normal((16, cols)) * 0.02).astype(np.float32)
    for name in SCHEMES:
        out = fake_quantize(w, name)
        assert out.shape == w.shape and out.dtype == np.float32, name
        assert weight_snr_db(w, out) > 1.5 * SCHEMES[name].bits, name  # ~6 dB a bit, loosely


def test_mlx_groups_that_do_not_divide_the_rows_leave_the_tensor_in_fp16() -> None:
    """mlx_lm skips such a Linear (576 inputs under group 128); it is priced and kept as fp16."""
    import numpy as np

    from labkit.quant.ops import fake_quantize
    from labkit.quant.schemes import mlx_keeps_fp16

    assert mlx_keeps_fp16("mlx-affine4-g128", 576) and not mlx_keeps_fp16("mlx-affine4-g128", 1536)
    assert not mlx_keeps_fp16("gguf-q4_k", 576)
    assert bits_per_weight("mlx-affine4-g128", SMOLLM2_SHAPES["q_proj"]) == 16.0
    assert bits_per_weight("mlx-affine4-g128", SMOLLM2_SHAPES["down_proj"]) == 4.25
    w = np.random.default_rng(0).standard_normal((4, 576)).astype(np.float32)
    np.testing.assert_array_equal(fake_quantize(w, "mlx-affine4-g128"), w.astype(np.float16).astype(np.float32))
