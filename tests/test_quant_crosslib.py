"""Each scheme labkit mirrors equals the library's own, bit for bit (all checks here are exact).

- GGUF: our ggml blocks equal gguf-py's bytes (Q8_0, Q5_0, Q4_0: gguf-py can quantize those),
  gguf-py's dequantizer reads our bytes (all five types) to exactly our values, and our bytes
  equal llama.cpp's own C ``quantize_row_*_ref`` (the K-quants too), loaded from the prebuilt
  llama.cpp that xllamacpp ships.
- MLX: scales, biases, codes and dequantized weights equal ``mx.quantize``/``mx.dequantize``.
- coremltools: quantized data, scales, LUTs and indices equal its compressors, and the dense
  weights equal what a saved .mlpackage's constexpr ops decompress to.

Random weights and, when the shipped tiny-llama is present, real ones.
"""

from __future__ import annotations

import ctypes
import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from labkit.quant import gguf_blocks
from labkit.quant.affine import affine_dequantize, affine_quantize
from labkit.quant.linear import symmetric_dequantize, symmetric_quantize
from labkit.quant.ops import fake_quantize
from labkit.quant.palettize import depalettize, palettize

GGUF_TYPES = ["Q8_0", "Q5_0", "Q4_0", "Q4_K", "Q6_K"]
TINY = Path(__file__).resolve().parents[1] / "data" / "models" / "tiny-llama" / "model.safetensors"


def _random(shape: tuple[int, int], seed: int, kind: str = "normal") -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "heavy":  # outliers, as trained weights have
        return (rng.standard_t(3, shape) * 0.02).astype(np.float32)
    if kind == "sparse":  # exact zeros and all-zero blocks
        w = rng.standard_normal(shape) * 0.02
        w[rng.random(shape) < 0.3] = 0.0
        w[0, :256] = 0.0
        return w.astype(np.float32)
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


def _real(name: str) -> np.ndarray:
    if not TINY.is_file():
        pytest.skip(f"real weights: {TINY} is not present (the shipped tiny-llama)")
    from safetensors import safe_open

    with safe_open(str(TINY), "np") as f:
        return f.get_tensor(name).astype(np.float32)


WEIGHTS = {
    "normal": lambda: _random((64, 512), 0),
    "heavy": lambda: _random((32, 768), 1, "heavy"),
    "sparse": lambda: _random((16, 512), 2, "sparse"),
    "real-q_proj": lambda: _real("model.layers.0.self_attn.q_proj.weight")[:128],
    "real-up_proj": lambda: _real("model.layers.7.mlp.up_proj.weight")[:128],
}


@pytest.fixture(params=sorted(WEIGHTS))
def weight(request) -> np.ndarray:
    return WEIGHTS[request.param]()


# ---------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q4_0"])
def test_gguf_blocks_equal_gguf_py_bytes(weight: np.ndarray, qtype: str) -> None:
    gguf = pytest.importorskip("gguf", reason="needs the gguf package (extra 'llamacpp')")
    ours = gguf_blocks.quantize(weight, qtype)
    theirs = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[qtype])
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_py_reads_our_blocks_to_our_values(weight: np.ndarray, qtype: str) -> None:
    gguf = pytest.importorskip("gguf", reason="needs the gguf package (extra 'llamacpp')")
    blocks = gguf_blocks.quantize(weight, qtype)
    assert (
        blocks.shape[1]
        == weight.shape[1]
        // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
        * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    )
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    ours = gguf_blocks.dequantize(blocks, qtype, weight.shape[1])
    np.testing.assert_array_equal(ours, theirs)
    # and the reconstruction is a quantization of the input, not noise
    assert np.abs(ours - weight).max() <= np.abs(weight).max() * (0.5 if "K" in qtype else 0.2)


def _ggml_library_candidates() -> list[Path]:
    """Shared objects that may export ggml's quantize_row_*_ref: LABKIT_GGML_LIB, the prebuilt
    llama.cpp of xllamacpp (a labkit dependency: its extension module links ggml in and exports
    its C API), then the libggml shipped inside llama-cpp-python where that is installed."""
    import importlib.util

    candidates = [Path(os.environ["LABKIT_GGML_LIB"])] if os.environ.get("LABKIT_GGML_LIB") else []
    for package, patterns in (("xllamacpp", ("xllamacpp*.so", "xllamacpp*.pyd")),
                              ("llama_cpp", ("lib/libggml-base*", "lib/libggml*"))):
        spec = importlib.util.find_spec(package)  # found, not imported
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidates += [p for pattern in patterns for p in sorted(Path(folder).glob(pattern))]
    return candidates


@functools.cache
def _ggml_library() -> ctypes.CDLL | None:
    """The first candidate that loads and exports quantize_row_q4_K_ref (None: none does)."""
    for path in _ggml_library_candidates():
        try:
            lib = ctypes.CDLL(str(path))
            lib.quantize_row_q4_K_ref  # noqa: B018  (raises if not exported)
            return lib
        except (OSError, AttributeError):
            continue
    return None


def test_a_c_reference_is_at_hand() -> None:
    """xllamacpp is a dependency, so the C reference runs everywhere the lab is installed."""
    assert _ggml_library() is not None, [str(p) for p in _ggml_library_candidates()]


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_blocks_equal_llama_cpp_c_reference(weight: np.ndarray, qtype: str) -> None:
    lib = _ggml_library()
    assert lib is not None, "no library exports quantize_row_*_ref (see test_a_c_reference_is_at_hand)"
    block, nbytes = {
        "Q8_0": (32, 34),
        "Q5_0": (32, 22),
        "Q4_0": (32, 18),
        "Q4_K": (256, 144),
        "Q6_K": (256, 210),
    }[qtype]
    x = np.ascontiguousarray(weight, np.float32).ravel()
    out = np.zeros(x.size // block * nbytes, np.uint8)
    fn = getattr(lib, f"quantize_row_{qtype[:2].lower()}{qtype[2:]}_ref")
    fn(
        x.ctypes.data_as(ctypes.c_void_p),
        out.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int64(x.size),
    )
    np.testing.assert_array_equal(
        gguf_blocks.quantize(weight, qtype), out.reshape(weight.shape[0], -1)
    )


# ---------------------------------------------------------------------------------- MLX


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_affine_equals_mlx(weight: np.ndarray, dtype, bits: int, group: int) -> None:
    mx = pytest.importorskip("mlx.core", reason="needs mlx (extra 'mlx'; on Linux: mlx[cpu])")
    w = weight.astype(dtype)
    q, scales, biases = affine_quantize(w, bits, group)
    # MLX's CPU kernel, the one labkit mirrors bit for bit; on a Mac the default device is the
    # Metal GPU, within one ulp of it (tests/test_mac_mlx.py checks that)
    with mx.stream(mx.cpu):
        wq, mscales, mbiases = mx.quantize(mx.array(w), group_size=group, bits=bits)
        np.testing.assert_array_equal(scales, np.array(mscales))
        np.testing.assert_array_equal(biases, np.array(mbiases))
        # the packed codes, read back through MLX with unit scales and zero biases
        ones = mx.ones(mscales.shape, dtype=mx.float32)
        codes = mx.dequantize(wq, ones, mx.zeros_like(ones), group_size=group, bits=bits)
        np.testing.assert_array_equal(q, np.array(codes).astype(np.uint8))
        theirs = mx.dequantize(wq, mscales, mbiases, group_size=group, bits=bits)
        np.testing.assert_array_equal(affine_dequantize(q, scales, biases, group), np.array(theirs))


# ---------------------------------------------------------------------------------- Core ML


def _ct():
    ct = pytest.importorskip("coremltools", reason="needs coremltools (extra 'coreml')")
    return ct


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(("bits", "block"), [(8, None), (4, 32)])
def test_symmetric_equals_coremltools_compressor(weight, dtype, bits, block) -> None:
    _ct()
    if not np.all(np.abs(weight).reshape(weight.shape[0], -1, 32).max(axis=2) > 0):
        # coremltools divides 0 by a 0 scale and casts the NaN to int8 (platform-defined);
        # labkit stores 0 for an all-zero group (test_all_zero_groups_quantize_to_zero).
        weight = weight + np.float32(1e-3)
    from coremltools.optimize import _utils as ct_utils
    from coremltools.optimize.coreml import _quantization_passes as passes

    w = weight.astype(dtype)
    res = passes.linear_quantize_weights.blockwise_compress(
        w, nbits=bits, mode="LINEAR_SYMMETRIC", signed=True, block_sizes=[1, block or 0]
    )
    q, scale = symmetric_quantize(w, bits, block)
    assert res.offset is None  # symmetric: no zero point stored
    np.testing.assert_array_equal(q, res.data)
    np.testing.assert_array_equal(scale, res.scale)
    theirs = ct_utils.dequantize_by_scale_and_zp(res.data, res.scale, None)
    np.testing.assert_array_equal(symmetric_dequantize(q, scale), theirs)


def test_all_zero_groups_quantize_to_zero() -> None:
    w = np.zeros((4, 64), np.float16)
    w[1, 40] = 0.5
    assert np.array_equal(symmetric_dequantize(*symmetric_quantize(w, 4, 32)), w)
    assert np.array_equal(fake_quantize(w, "coreml-int8-channel"), w.astype(np.float32))


@pytest.mark.parametrize(("bits", "group_rows"), [(4, None), (2, 16)])
def test_palettize_equals_coremltools_compressor(bits: int, group_rows) -> None:
    _ct()
    pytest.importorskip(
        "sklearn", reason="k-means palettes need scikit-learn (as coremltools does)"
    )
    from coremltools.optimize.coreml import _quantization_passes as passes

    w = _random((32, 256), 3)
    res = passes.palettize_weights.blockwise_compress(
        w, mode="KMEANS", nbits=bits, block_sizes=[group_rows or 0, 0]
    )
    luts, idx = palettize(w, bits, group_rows)
    np.testing.assert_array_equal(luts.reshape(res.lut.shape), res.lut)
    np.testing.assert_array_equal(idx, res.indices)


def _mlpackage_dense(w: np.ndarray, op_config, precision) -> np.ndarray:
    """Compress a one-Linear ML program with coremltools, save the .mlpackage, load it back and
    decompress its constexpr weight the way Core ML's op defines it."""
    ct = _ct()
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.converters.mil.mil import types

    dt = types.fp16 if w.dtype == np.float16 else types.fp32

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, w.shape[1]), dtype=dt)],
        opset_version=ct.target.iOS18,
    )
    def prog(x):
        return mb.linear(x=x, weight=w, name="y")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
        compute_precision=precision,
    )
    config = cto.OptimizationConfig(global_config=op_config)
    if isinstance(op_config, cto.OpLinearQuantizerConfig):
        model = cto.linear_quantize_weights(model, config)
    else:
        model = cto.palettize_weights(model, config)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.mlpackage")
        model.save(path)
        loaded = ct.models.MLModel(path, skip_model_load=True)
        spec = loaded.get_spec()
        program = milproto_load(spec, spec.specificationVersion, loaded.weights_dir)
    ops = [op for f in program.functions.values() for op in f.operations]
    constexpr = [op for op in ops if op.op_type.startswith("constexpr_")]
    assert len(constexpr) == 1, [op.op_type for op in ops]
    return constexpr[0].materialized_val_inference()


@pytest.mark.parametrize("source", ["random", "real"])
def test_mlpackage_weights_equal_labkit(source: str) -> None:
    ct = _ct()
    pytest.importorskip(
        "sklearn", reason="k-means palettes need scikit-learn (as coremltools does)"
    )
    import coremltools.optimize.coreml as cto

    w = _random((64, 256), 4) if source == "random" else WEIGHTS["real-q_proj"]()[:64, :256]
    w16 = w.astype(np.float16)
    int4 = cto.OpLinearQuantizerConfig(
        mode="linear_symmetric",
        dtype="int4",
        granularity="per_block",
        block_size=32,
        weight_threshold=0,
    )
    np.testing.assert_array_equal(
        _mlpackage_dense(w16, int4, ct.precision.FLOAT16), fake_quantize(w, "coreml-int4-block32")
    )
    int8 = cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
    )
    np.testing.assert_array_equal(
        _mlpackage_dense(w16, int8, ct.precision.FLOAT16), fake_quantize(w, "coreml-int8-channel")
    )
    lut = cto.OpPalettizerConfig(
        mode="kmeans",
        nbits=3,
        granularity="per_grouped_channel",
        group_size=16,
        weight_threshold=0,
    )
    dense = _mlpackage_dense(w, lut, ct.precision.FLOAT32)
    np.testing.assert_array_equal(dense, fake_quantize(w, "coreml-lut3-g16"))
    np.testing.assert_array_equal(dense, depalettize(*palettize(w, 3, 16)))


# ---------------------------------------------------------------------------------- GGUF Q4_1


def test_q4_1_equals_gguf_py_bytes_and_values(weight: np.ndarray) -> None:
    """Q4_1 (the embedded SmolLM2's own format): our blocks are gguf-py's bytes, and gguf-py's
    dequantizer reads them to our values."""
    gguf = pytest.importorskip("gguf", reason="needs the gguf package (extra 'llamacpp')")
    ours = gguf_blocks.quantize(weight, "Q4_1")
    assert ours.shape[1] == weight.shape[1] // 32 * 20
    np.testing.assert_array_equal(ours, gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1))
    back = gguf_blocks.dequantize(ours, "Q4_1", weight.shape[1])
    np.testing.assert_array_equal(back, gguf.quants.dequantize(ours, gguf.GGMLQuantizationType.Q4_1))
    assert np.abs(back - weight).max() <= np.ptp(weight.reshape(-1, 32), axis=1).max() / 15


def test_q4_1_equals_llama_cpp_c_reference(weight: np.ndarray) -> None:
    lib = _ggml_library()
    x = np.ascontiguousarray(weight, np.float32).ravel()
    out = np.zeros(x.size // 32 * 20, np.uint8)
    lib.quantize_row_q4_1_ref(
        x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size)
    )
    np.testing.assert_array_equal(gguf_blocks.quantize(weight, "Q4_1"), out.reshape(weight.shape[0], -1))


def test_q4_1_weights_requantize_to_themselves(weight: np.ndarray) -> None:
    """Weights that are dequantized Q4_1 lie on Q4_1's grid: the gguf-q4_1 scheme gives them back
    bit for bit, even through the fp16 rounding every scheme starts from (why notebook 03 marks
    that row on SmolLM2 as lossless by construction)."""
    on_grid = gguf_blocks.dequantize(gguf_blocks.quantize(weight, "Q4_1"), "Q4_1", weight.shape[1])
    np.testing.assert_array_equal(fake_quantize(on_grid, "gguf-q4_1"), on_grid)
    assert not np.array_equal(fake_quantize(on_grid, "gguf-q4_0"), on_grid)
