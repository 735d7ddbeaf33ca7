"""labkit.quant.footprint: checkpoint bytes from a config alone must equal the bytes of real tensors.

The tensor list against the safetensors header of saved checkpoints (names, shapes, and data
bytes, exactly) and against the parameters of models built on the meta device (labkit's and
transformers'); block schemes' bits per weight against a hand count of one block; quantized
bytes against labkit.quant.tensor_bits, the one source of truth.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from labkit.core.paths import configs_dir
from labkit.models import load
from labkit.models.config import read_config
from labkit.models.loader import read_safetensors_header, weight_files
from labkit.quant import footprint

SHIPPED_CONFIGS = sorted(p.stem for p in configs_dir().glob("*.json"))
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def _config(stem: str) -> dict:
    return read_config(configs_dir() / f"{stem}.json")


def _file_tensors(folder: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """(name -> shape, data bytes) over the safetensors files of ``folder``."""
    shapes, nbytes = {}, 0
    for path in weight_files(folder):
        for name, info in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            shapes[name] = tuple(info["shape"])
            start, end = info["data_offsets"]
            nbytes += end - start
            assert end - start == math.prod(info["shape"]) * _DTYPE_BYTES[info["dtype"]]
    return shapes, nbytes


def _resave(folder: Path, dtype: torch.dtype, out: Path) -> Path:
    """A copy of ``folder`` with its weights stored in ``dtype`` (as a fp16 release would be)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, out / "model.safetensors")
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


@pytest.mark.parametrize("stem", SHIPPED_CONFIGS)
def test_tensor_list_matches_models_built_on_meta(stem: str) -> None:
    import transformers

    from labkit.models.config import LlamaConfig, PhiConfig
    from labkit.models.errors import ModelLoadError
    from labkit.models.llama import Llama
    from labkit.models.phi import Phi

    cfg = {k: v for k, v in _config(stem).items() if not k.startswith("_")}
    with torch.device("meta"):
        hf_cfg = transformers.AutoConfig.for_model(
            **{k: v for k, v in cfg.items() if k != "architectures"}
        )
        theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        try:
            ours = (
                Phi(PhiConfig.from_dict(cfg)) if cfg["model_type"] == "phi"
                else Llama(LlamaConfig.from_dict(cfg))
            )
        except ModelLoadError:  # e.g. Llama 3.1's "llama3" RoPE: transformers only
            ours = None
    # named_parameters lists a tied weight once, under its first name (the embedding).
    assert footprint.weight_shapes(cfg) == {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    assert footprint.num_parameters(cfg) == theirs.num_parameters()
    if ours is not None:
        assert footprint.weight_shapes(cfg) == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("mistral", {}),
        ("phi", {"num_key_value_heads": 4}),
    ],
)
@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16)])
def test_weights_bytes_equal_safetensors_bytes(
    hf_checkpoint, tmp_path: Path, arch: str, kwargs: dict, precision: str, dtype: torch.dtype
) -> None:
    folder = _resave(hf_checkpoint(arch, **kwargs), dtype, tmp_path / f"{arch}-{precision}")
    shapes, nbytes = _file_tensors(folder)
    cfg = read_config(folder)
    assert footprint.weight_shapes(cfg) == shapes
    assert footprint.weights_bytes(cfg, precision) == nbytes


def test_weights_bytes_equal_loaded_parameter_bytes(hf_checkpoint) -> None:
    folder = hf_checkpoint("llama", tie_word_embeddings=True)
    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = load(folder, device="cpu", dtype=dtype).model
        measured = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
        assert footprint.weights_bytes(read_config(folder), precision) == measured


def test_block_schemes_bits_per_weight() -> None:
    # One block of 32 int4 weights = 16 bytes of nibbles + a 2-byte fp16 scale = 18 bytes.
    assert footprint.bits_per_weight("int4") == 18 * 8 / 32 == 4.5
    assert footprint.bits_per_weight("int8") == 34 * 8 / 32 == 8.5
    assert footprint.tensor_bytes((64, 32), "int4") == 64 * 18
    assert footprint.tensor_bytes((64,), "int4") == 64 * 2  # vectors stay fp16
    assert footprint.tensor_bytes((3, 5), "fp16") == 30
    assert footprint.bits_per_weight("float16") == 16
    assert footprint.precision_name("bfloat16") == "bf16" and footprint.scheme_of("half") is None


def test_quantized_bytes_come_from_labkit_quant() -> None:
    # One source of truth: every quantized matrix costs what labkit.quant.tensor_bits says.
    from labkit.quant import tensor_bits

    cfg = _config("microsoft__phi-2")
    shapes = footprint.weight_shapes(cfg)
    for precision, scheme in (("int4", "gguf-q4_0"), ("int8", "gguf-q8_0"),
                              ("coreml-int8-channel", "coreml-int8-channel"),
                              ("gguf-q4_k", "gguf-q4_k")):
        expected = sum(math.ceil(tensor_bits(scheme, s) / 8) if len(s) == 2 else 2 * math.prod(s)
                       for s in shapes.values())
        assert footprint.weights_bytes(cfg, precision) == expected
    assert "gguf-q4_k" in footprint.precisions() and "int4" in footprint.precisions()


def test_quantized_weights_are_smaller_in_order() -> None:
    cfg = _config("meta-llama__Llama-2-7b-hf")
    sizes = [footprint.weights_bytes(cfg, p) for p in ("fp32", "fp16", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True)
    # int4 of a 7B model: 4.5 bits for the matrices, 16 for the norms.
    vectors = sum(math.prod(s) for s in footprint.weight_shapes(cfg).values() if len(s) == 1)
    matrices = footprint.num_parameters(cfg) - vectors
    assert all(math.prod(s) % 16 == 0 for s in footprint.weight_shapes(cfg).values() if len(s) == 2)
    assert sizes[3] == matrices * 9 // 16 + 2 * vectors


def test_bad_configs_and_precisions_are_named() -> None:
    cfg = _config("microsoft__phi-2")
    with pytest.raises(ValueError, match="precision 'int3' is unknown; known: fp32, fp16"):
        footprint.weights_bytes(cfg, "int3")
    with pytest.raises(ValueError, match="missing required key 'vocab_size'"):
        footprint.weights_bytes({"model_type": "llama", "hidden_size": 8}, "fp16")
    with pytest.raises(ValueError, match="unsupported architecture"):
        footprint.weight_shapes({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="the planner knows Llama, Mistral and Phi"):
        footprint.weight_shapes({"architectures": ["BertModel"]})
