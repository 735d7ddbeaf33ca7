"""Core ML export (labkit.export.coreml); notebook 02's study code is in test_study_pytorch_vs_coreml.

Conversion runs on a 2-layer model of tiny-llama's shapes (hidden 512, 8/2 heads, MLP 1408;
vocab 512 instead of 8192, random fp16-rounded weights): the full 8-layer model takes ~40-50 s per
step on the shared 2-core box, the slice a few seconds; notebook 02 converts the full model.

What is checked:
- every ladder step (a-f, f = the ANE layout) converts and saves; the stateful steps carry one state per K/V buffer;
- the exported graphs are right: run in PyTorch token by token they give the model's logits;
- weights read back out of each saved .mlpackage (via milproto and the constexpr ops) equal the
  fp16 weights (a-c) or exactly what coremltools' own compressors produce (d: int4 blocks,
  e: 4-bit k-means LUT), which equal labkit.quant's;
- the PyTorch model run on read-back weights in fp16 stays within stated tolerances of fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labkit.core import tolerances as tol
from labkit.models.llama import Llama

ct = pytest.importorskip("coremltools", reason="needs coremltools (extra 'coreml')")

from labkit.export import coreml as cx  # noqa: E402

MAX_LEN = 16
LAYERS = 2


@pytest.fixture(scope="module")
def model() -> Llama:
    from conftest import tiny_llama_slice

    return tiny_llama_slice(LAYERS)


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory) -> dict[str, cx.Export]:
    out = tmp_path_factory.mktemp("coreml")
    return {e.step: e for e in cx.convert(model, list(cx.STEPS), out, MAX_LEN)}


@pytest.fixture(scope="module")
def readback(model, exports) -> dict[str, dict[str, np.ndarray]]:
    keys = [k for k, _ in model.named_parameters()]
    return {s: cx.read_weights(e.path, keys) for s, e in exports.items()}


def _weights(model) -> dict[str, np.ndarray]:
    return {k: p.detach().half().numpy() for k, p in model.named_parameters()}


# --------------------------------------------------------------------------- conversion


def test_every_step_converts_with_the_expected_ops(exports) -> None:
    assert list(exports) == ["a", "b", "c", "d", "e", "f"]
    for step, e in exports.items():
        assert (e.path / "Manifest.json").is_file(), step
        assert e.package_bytes > 0 and e.convert_seconds > 0
        ops = e.op_counts
        if step == "f":  # ANE layout: 1x1 convs for the layers, the tied output stays a linear
            assert ops["conv"] == 7 * LAYERS and ops["linear"] == 1, ops
        else:
            assert ops["linear"] == 7 * LAYERS + 1, (step, ops)  # tied lm_head: one more linear
        stateful = step in cx.STATEFUL
        assert ops.get("read_state", 0) == (2 * LAYERS if stateful else 0), (step, ops)
        assert ops.get("coreml_update_state", 0) == (2 * LAYERS if stateful else 0), (step, ops)
    # 7 matrices per layer + the (tied) embedding are compressed; RoPE tables and norms are not
    n_mat = 7 * LAYERS + 1
    assert exports["d"].op_counts["constexpr_blockwise_shift_scale"] == n_mat
    assert exports["e"].op_counts["constexpr_lut_to_dense"] == n_mat
    for step in "abcf":
        assert not any(k.startswith("constexpr_") for k in exports[step].op_counts), step
    assert exports["d"].package_bytes < 0.4 * exports["c"].package_bytes
    assert exports["e"].package_bytes < 0.4 * exports["c"].package_bytes


def test_ane_step_matches_the_model_token_by_token(model) -> None:
    """The ANE layout (f) run in PyTorch; steps a-d run the same way in the study's tests."""
    ids = [5, 17, 300, 2, 99, 41]
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
    ane = cx.step_module(model, "f", MAX_LEN)
    with torch.no_grad():
        for pos, tok in enumerate(ids):
            feeds = (torch.tensor([[tok]], dtype=torch.int32), torch.tensor([pos], dtype=torch.int32),
                     torch.from_numpy(cx.decode_mask(pos, MAX_LEN)))
            got = ane(*feeds).reshape(-1)  # float32 1x1 convs: the same math as the model
            torch.testing.assert_close(got, ref[pos], atol=tol.SAME_MATH.at("cpu"), rtol=0)


# --------------------------------------------------------------------------- read-back


def test_uncompressed_packages_hold_the_fp16_weights_exactly(model, readback) -> None:
    want = _weights(model)
    for step in "abcf":
        got = readback[step]
        assert sorted(got) == sorted(want), step
        for k, w in want.items():
            if step == "f":  # conv shapes [out, in, 1, 1], norms [1, C, 1, 1]
                assert got[k].size == w.size, k
                got[k] = got[k].reshape(w.shape)
            assert got[k].dtype == np.float16, (step, k)
            np.testing.assert_array_equal(got[k], w, err_msg=f"{step} {k}")


def test_int4_readback_equals_coremltools_compressor(model, readback) -> None:
    from coremltools.optimize import _utils as ct_utils
    from coremltools.optimize.coreml import _quantization_passes as passes

    from labkit.quant.ops import fake_quantize

    got = readback["d"]
    for k, w in _weights(model).items():
        if w.ndim == 1:  # norms stay fp16 (below coremltools' weight_threshold)
            np.testing.assert_array_equal(got[k], w, err_msg=k)
            continue
        res = passes.linear_quantize_weights.blockwise_compress(
            w, nbits=4, mode="LINEAR_SYMMETRIC", signed=True, block_sizes=[1, 32]
        )
        theirs = ct_utils.dequantize_by_scale_and_zp(res.data, res.scale, None)
        np.testing.assert_array_equal(got[k], theirs, err_msg=k)
        np.testing.assert_array_equal(got[k].astype(np.float32), fake_quantize(w, "coreml-int4-block32"))


def test_lut_readback_equals_coremltools_compressor(model, readback) -> None:
    from coremltools.optimize.coreml import _quantization_passes as passes

    got = readback["e"]
    for k, w in _weights(model).items():
        if w.ndim == 1:
            np.testing.assert_array_equal(got[k], w, err_msg=k)
            continue
        res = passes.palettize_weights.blockwise_compress(w, mode="KMEANS", nbits=4, block_sizes=[0, 0])
        lut = np.asarray(res.lut).reshape(-1)
        theirs = lut[np.asarray(res.indices)].reshape(w.shape)
        np.testing.assert_array_equal(got[k], theirs, err_msg=k)
        assert lut.size == 16, k  # one 4-bit table per tensor
        assert set(got[k].astype(np.float32).ravel()) <= set(lut.astype(np.float32)), k


def test_readback_logits_within_tolerance(model, readback) -> None:
    """max |logit error| vs fp32 on this slice's logits (std ~ 1): fp16 compute of fp16 weights
    (Core ML's precision), and fp32 compute of the 4-bit weights (the weights' error only)."""
    ids = torch.tensor([[5, 17, 300, 2, 99, 41, 7, 8]])
    for step in "abcf":
        rb = cx.readback_model(model, readback[step])
        assert cx.logits_error(model, rb, ids, torch.float32) == 0.0, step
        assert cx.logits_error(model, rb, ids, torch.float16) < tol.FP16_COMPUTE.at("cpu"), step
    for step in "de":  # int4 blocks, 4-bit palette
        err = cx.logits_error(model, cx.readback_model(model, readback[step]), ids, torch.float32)
        assert 0.0 < err < tol.INT4_WEIGHTS.at("cpu"), (step, err)


# --------------------------------------------------------------------------- bad inputs, helpers


def test_bad_inputs_are_named(model, tmp_path) -> None:
    with pytest.raises(ValueError, match="step must be one of"):
        cx.step_module(model, "z", MAX_LEN)
    with pytest.raises(ValueError, match="max_len"):
        cx.step_module(model, "c", 10_000)
    with pytest.raises(TypeError, match="labkit.models.llama.Llama"):
        cx.step_module(torch.nn.Linear(2, 2), "a", MAX_LEN)
    with pytest.raises(FileNotFoundError, match="Manifest.json"):
        cx.read_weights(tmp_path, ["x"])
    with pytest.raises(KeyError, match="lacks weights"):
        cx.readback_model(model, {})
    with pytest.raises(ValueError, match="compression"):
        cx.compress(object(), "int3")
    with pytest.raises(ValueError, match="position"):
        cx.decode_mask(MAX_LEN, MAX_LEN)


def test_decode_mask_shows_filled_positions_only() -> None:
    m = cx.decode_mask(3, 8)
    assert m.shape == (1, 1, 1, 8)
    np.testing.assert_array_equal(m[0, 0, 0] == 0, [1, 1, 1, 1, 0, 0, 0, 0])


def test_stateless_steps_load_on_macos_14_and_stateful_ones_need_15(exports) -> None:
    """Core ML on macOS 14 loads specification 8 at most: a and b target macOS 14 (spec 8), the
    stateful steps iOS18 / macOS 15 (spec 9: states). Their predictions on a Mac are checked in
    tests/test_mac_coreml.py, each skipped below the macOS it needs."""
    for step, e in exports.items():
        spec = ct.models.MLModel(str(e.path), skip_model_load=True).get_spec()
        assert spec.specificationVersion == (9 if step in cx.STATEFUL else 8), step


# --------------------------------------------------------------------------- the runtime adapter


def test_runtime_adapter_feeds_the_stateful_step_like_the_model(model) -> None:
    """labkit.runtimes.coreml_rt drives the package through StatefulFeeder; here the predictor
    is the PyTorch module that gets converted (step c), so positions, masks and the state reset
    are checked without macOS. Tolerance as in the token-by-token test above (fp32)."""
    from labkit.runtimes.coreml_rt import StatefulFeeder

    ids = [5, 17, 300, 2, 99, 41]
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]

    def predict(feeds, state):
        with torch.no_grad():
            return state(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "position", "mask")))

    feeder = StatefulFeeder(predict, lambda: cx.step_module(model, "c", MAX_LEN), MAX_LEN)
    with pytest.raises(RuntimeError, match="prefill"):
        feeder.step(1)
    for _ in range(2):  # a second prefill starts from an empty cache
        got = [feeder.prefill(ids[:4])] + [feeder.step(t) for t in ids[4:]]
        for pos, logits in zip(range(3, 6), got, strict=True):
            step_c = torch.from_numpy(logits)  # in float32: the same math as the model
            torch.testing.assert_close(step_c, ref[pos], atol=tol.SAME_MATH.at("cpu"), rtol=0)
    feeder.prefill(list(range(MAX_LEN)))
    with pytest.raises(ValueError, match=f"max_len={MAX_LEN}"):
        feeder.step(1)
    with pytest.raises(ValueError, match="at least one token"):
        feeder.prefill([])


def test_stateful_package_inputs_are_in_the_feeder_order(exports) -> None:
    """The adapter feeds the feeder's inputs by name: the package must carry exactly those."""
    spec = ct.models.MLModel(str(exports["c"].path), skip_model_load=True).get_spec()
    assert [i.name for i in spec.description.input] == ["input_ids", "position", "mask"]
    assert [s.name for s in spec.description.state][:2] == ["k_cache_0", "v_cache_0"]
