"""The Swift port against PyTorch, like llm.c's test_gpt2: ours vs a reference, stated tolerances.

Tolerances: float32 weights and arithmetic, max |logit - reference| <= tolerances.OTHER_RUNTIME
(1e-4; swiftport.LOGIT_TOL) over the first 64 steps, and 100 % greedy agreement over 256 tokens,
for a tiny random Llama (GQA) and a tiny random Phi (partial rotary), and for the shipped
tiny-llama when data/models/tiny-llama exists.
The reference is transformers' LlamaForCausalLM / PhiForCausalLM in float32.

Two sides are checked: ``swift test`` (the Swift test target reads the reference dumps itself and
must exit 0) and the ``lmport`` CLI (its logits dump, read with numpy, against the same reference).
The refdump round-trip tests need neither swift nor torch. When swift is absent the Swift tests
skip with the reason from ``labkit.ports.swift.available()``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from labkit.core import tolerances
from labkit.ports import refdump
from labkit.ports import swift as swiftport

SWIFT_REASON = swiftport.available()
needs_swift = pytest.mark.skipif(SWIFT_REASON is not None, reason=f"skipped: {SWIFT_REASON}")
XCTEST_REASON = swiftport.xctest_unavailable()  # on macOS: full Xcode, not the Command Line Tools
needs_xctest = pytest.mark.skipif(XCTEST_REASON is not None, reason=f"skipped: {XCTEST_REASON}")


# --- refdump: the file format -----------------------------------------------------------------


def _dump(seed: int = 0, steps: int = 5, prompt: int = 3) -> refdump.RefDump:
    rng = np.random.default_rng(seed)
    return refdump.RefDump(
        prompt_tokens=rng.integers(0, 100, prompt),
        layer_indices=[0, 2],
        hidden=rng.standard_normal((2, prompt + steps - 1, 8)).astype(np.float32),
        logits=rng.standard_normal((steps, 100)).astype(np.float32),
        greedy_tokens=rng.integers(0, 100, steps),
        meta={"arch": "llama", "dtype": "float32", "steps": steps},
    )


def test_refdump_round_trip(tmp_path: Path) -> None:
    dump = _dump()
    path = refdump.write(tmp_path / "d.lmref", dump)
    back = refdump.read(path)
    for name in ("prompt_tokens", "hidden", "logits", "greedy_tokens"):
        np.testing.assert_array_equal(getattr(back, name), getattr(dump, name))
        assert getattr(back, name).dtype == getattr(dump, name).dtype
    assert back.layer_indices == [0, 2]
    assert back.meta == dump.meta
    raw = path.read_bytes()
    assert raw[:8] == refdump.MAGIC
    assert int.from_bytes(raw[8:12], "little") == refdump.VERSION
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temporary file"


def test_refdump_arrays_are_aligned_little_endian(tmp_path: Path) -> None:
    """The layout the Swift reader relies on: data 16-byte aligned, <f4 / <i4 at stated offsets."""
    dump = _dump(steps=3, prompt=2)
    raw = refdump.write(tmp_path / "d.lmref", dump).read_bytes()
    header_len = int.from_bytes(raw[12:16], "little")
    header = json.loads(raw[16 : 16 + header_len])
    start = -(-(16 + header_len) // 16) * 16
    for name, entry in header["arrays"].items():
        assert entry["offset"] % 16 == 0
        dtype = "<f4" if entry["dtype"] == "float32" else "<i4"
        arr = np.frombuffer(raw, dtype, int(np.prod(entry["shape"])), start + entry["offset"])
        np.testing.assert_array_equal(arr.reshape(entry["shape"]), getattr(dump, name))


def test_refdump_rejects_other_magic_and_version(tmp_path: Path) -> None:
    path = refdump.write(tmp_path / "d.lmref", _dump())
    raw = bytearray(path.read_bytes())
    bad_version = tmp_path / "v2.lmref"
    bad_version.write_bytes(bytes(raw[:8]) + (2).to_bytes(4, "little") + bytes(raw[12:]))
    with pytest.raises(ValueError, match=r"v2\.lmref.*version 2"):
        refdump.read(bad_version)
    bad_magic = tmp_path / "magic.lmref"
    bad_magic.write_bytes(b"NOTADUMP" + bytes(raw[8:]))
    with pytest.raises(ValueError, match="magic"):
        refdump.read(bad_magic)


def test_refdump_checks_shapes() -> None:
    good = _dump()
    with pytest.raises(ValueError, match="positions"):
        refdump.RefDump(
            good.prompt_tokens, good.layer_indices, good.hidden[:, :-1], good.logits,
            good.greedy_tokens,
        )
    with pytest.raises(ValueError, match="greedy_tokens"):
        refdump.RefDump(
            good.prompt_tokens, good.layer_indices, good.hidden, good.logits,
            good.greedy_tokens[:-1],
        )


def test_available_names_missing_swift(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    reason = swiftport.available()
    assert reason is not None and "swift" in reason


# --- the Swift side -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[swiftport.Case]]:
    """Tiny random Llama/Phi folders and their 256-step references (+ tiny-llama if shipped)."""
    out = tmp_path_factory.mktemp("lmport-fixtures")
    return out, swiftport.prepare_fixtures(out)


@needs_xctest
@pytest.mark.slow
def test_swift_test_target_passes(fixtures: tuple[Path, list[swiftport.Case]]) -> None:
    """`swift test` reads every reference dump and exits 0; each case must report its parity."""
    out, cases = fixtures
    swiftport.build(release=True)
    proc = swiftport.swift_test(out)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"swift test failed (exit {proc.returncode}):\n{log[-6000:]}"
    for case in cases:
        assert f"parity {case.name} " in log, f"swift test did not check {case.name}:\n{log[-3000:]}"


@needs_xctest
@pytest.mark.slow
def test_swift_test_fails_without_fixtures(tmp_path: Path) -> None:
    """No reference data is a failure, not a silent pass."""
    swiftport.build(release=True)
    proc = swiftport.swift_test(tmp_path)  # an empty folder: no manifest.json
    assert proc.returncode != 0
    assert "manifest.json" in proc.stdout + proc.stderr


def _case(cases: list[swiftport.Case], name: str) -> swiftport.Case:
    for case in cases:
        if case.name == name:
            return case
    pytest.skip(f"skipped: fixture {name} was not written (data/models/tiny-llama absent)")


CLI_CASES = ["llama-gqa-f32", "llama-tied-bias-f32", "phi-f32", "llama-gqa-f16", "tiny-llama"]


@needs_swift
@pytest.mark.slow
@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_logits_match_reference(fixtures: tuple[Path, list[swiftport.Case]], name: str) -> None:
    """lmport's .npy logits: <= swiftport.LOGIT_TOL over 64 steps; greedy tokens equal over 256."""
    _, cases = fixtures
    case = _case(cases, name)
    ref = refdump.read(case.dump)
    assert ref.steps == swiftport.GREEDY_STEPS
    # every greedy step of the reference is decided by the model, not by rounding
    assert ref.meta["clear_margin"], f"{name}: reference margin {ref.meta['min_top2_margin']:.2g}"
    result = swiftport.run(case.model, ref.prompt_tokens, ref.steps, dump=True, threads=1)
    assert result.logits is not None and result.logits.shape == ref.logits.shape
    n = swiftport.LOGIT_STEPS
    err = swiftport.compare_logits(result.logits[:n], ref.logits[:n])
    assert err["max_abs"] <= swiftport.LOGIT_TOL, f"{name}: max |dlogit| {err['max_abs']:.3g}"
    agree = np.mean(np.asarray(result.tokens) == ref.greedy_tokens) * 100
    assert agree == 100.0, f"{name}: greedy agreement {agree:.2f} % over {ref.steps} tokens"
    assert result.decode_tok_s is not None and result.decode_tok_s > 0


@needs_swift
@pytest.mark.slow
def test_cli_hidden_dump_and_teacher_forcing(fixtures: tuple[Path, list[swiftport.Case]]) -> None:
    """--dump-hidden matches the reference layer by layer; --force changes what step 1 sees."""
    _, cases = fixtures
    case = _case(cases, "phi-f32")
    ref = refdump.read(case.dump)
    steps = 8
    forced = [(int(t) + 1) % ref.logits.shape[1] for t in ref.greedy_tokens[: steps - 1]]
    free = swiftport.run(case.model, ref.prompt_tokens, steps, dump=True, dump_hidden=True)
    assert free.hidden is not None
    positions = len(ref.prompt_tokens) + steps - 1
    np.testing.assert_allclose(free.hidden, ref.hidden[:, :positions],
                               atol=tolerances.OTHER_RUNTIME.at("cpu"), rtol=0)
    pushed = swiftport.run(case.model, ref.prompt_tokens, steps, dump=True, force=forced)
    np.testing.assert_array_equal(pushed.logits[0], free.logits[0])
    assert not np.allclose(pushed.logits[1], free.logits[1])


@needs_swift
def test_run_names_a_bad_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        swiftport.run(tmp_path, [1, 2], 2)


# --- the reference and the model folders ------------------------------------------------------


def test_weight_files_ignores_other_safetensors(tmp_path: Path) -> None:
    """A data slice saved as .safetensors beside the weights is not a weight file."""
    from labkit.models.errors import ModelLoadError

    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "heldout_slice.safetensors").write_bytes(b"")
    assert swiftport.weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        swiftport.weight_files(tmp_path)


def test_model_folder_needs_config_and_weights(tmp_path: Path) -> None:
    assert swiftport.model_folder(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert swiftport.model_folder(tmp_path) is None
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert swiftport.model_folder(tmp_path) == tmp_path
    assert swiftport.model_folder("no-such-model-here") is None


def test_reference_records_greedy_steps_hidden_states_and_teacher_forcing(tmp_path: Path) -> None:
    """The reference's cached steps equal one uncached forward over prompt + its own tokens;
    its hidden states are the residual stream after each layer; forcing changes step 1 only
    from step 1 on."""
    torch = pytest.importorskip("torch")
    folder = swiftport.tiny_llama(tmp_path / "m")
    prompt = swiftport.prompt_for(folder)
    steps = 5
    ref = swiftport.reference(folder, prompt, steps)
    assert ref.logits.shape[0] == steps and ref.hidden.shape[:2] == (3, len(prompt) + steps - 1)
    np.testing.assert_array_equal(ref.greedy_tokens, np.argmax(ref.logits, axis=1))
    model = swiftport.load_reference_model(folder)
    ids = torch.tensor([list(prompt) + [int(t) for t in ref.greedy_tokens[:-1]]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    tol = tolerances.SAME_MATH.at("cpu")
    np.testing.assert_allclose(ref.logits, out.logits[0, len(prompt) - 1 :].numpy(), atol=tol, rtol=0)
    np.testing.assert_allclose(ref.hidden[0], out.hidden_states[1][0].numpy(), atol=tol, rtol=0)
    forced = [(int(t) + 1) % ref.logits.shape[1] for t in ref.greedy_tokens[:-1]]
    pushed = swiftport.reference(folder, prompt, steps, layers=[2], force=forced, model=model)
    np.testing.assert_array_equal(pushed.logits[0], ref.logits[0])
    assert not np.allclose(pushed.logits[1], ref.logits[1])
    assert pushed.meta["teacher_forced"] and pushed.layer_indices == [2]
    with pytest.raises(ValueError, match="force"):
        swiftport.reference(folder, prompt, steps, force=forced[:2], model=model)


def test_convert_weights_round_trips_values(tmp_path: Path) -> None:
    """float32 -> float16 -> float32 keeps exactly the float16-rounded values, config copied."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    src = swiftport.tiny_phi(tmp_path / "src")
    half = swiftport.convert_weights(src, tmp_path / "f16", "float16")
    back = swiftport.convert_weights(half, tmp_path / "f32", "float32")
    assert (back / "config.json").read_text() == (src / "config.json").read_text()
    assert swiftport.weights_dtype(half) == "float16"
    assert swiftport.weights_dtype(back) == "float32"
    original = load_file(str(src / "model.safetensors"))
    restored = load_file(str(back / "model.safetensors"))
    assert original.keys() == restored.keys()
    for name, value in original.items():
        assert torch.equal(restored[name], value.half().float()), name
    with pytest.raises(ValueError, match="dtype"):
        swiftport.convert_weights(src, tmp_path / "x", "int8")
    swiftport.convert_weights(src, back, "float16")  # replaces the folder, as one swap
    assert swiftport.weights_dtype(back) == "float16"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_prebuilt_cli_needs_no_toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$LABKIT_LMPORT (the GPU host's static build) replaces `swift build`; a wrong path is named."""
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(swiftport, "_built", {})
    binary = tmp_path / "lmport"
    monkeypatch.setenv(swiftport.PREBUILT_ENV, str(binary))
    assert "no such file" in swiftport.available() and str(binary) in swiftport.available()
    binary.write_text("#!/bin/sh\n")
    assert "not executable" in swiftport.available()
    binary.chmod(0o755)
    assert swiftport.available() is None and swiftport.build() == binary


def test_a_folder_the_cli_reads_as_stored_needs_no_float32_copy(tmp_path: Path) -> None:
    """One model.safetensors of F32/F16/BF16 tensors is read in place (a 7B fp16 folder would
    otherwise need a 27 GB float32 copy); int8 tensors or a sharded folder still get converted."""
    import torch
    from safetensors.torch import save_file

    def folder(name: str, **tensors: torch.Tensor) -> Path:
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        return d

    assert swiftport.reads_as_stored(folder("half", a=torch.zeros(2, dtype=torch.float16), b=torch.zeros(2)))
    assert not swiftport.reads_as_stored(folder("int8", a=torch.zeros(2, dtype=torch.int8)))
    sharded = folder("sharded", a=torch.zeros(2))
    (sharded / "model.safetensors.index.json").write_text("{}")
    assert not swiftport.reads_as_stored(sharded) and not swiftport.reads_as_stored(tmp_path / "none")
