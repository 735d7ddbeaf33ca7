"""labkit.studies.will_it_fit: bytes from a config alone must equal the bytes of real tensors.

Weights: the planner's tensor list against the safetensors header of saved checkpoints (names,
shapes, and data bytes, exactly) and against the parameters of models built on the meta device
(labkit's and transformers'). KV cache: the planner against ``KVCache.nbytes()`` of a real cache.
Block schemes: bits per weight against a hand count of one block.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from labkit.inference.kv_cache import KVCache
from labkit.models import load
from labkit.models.loader import read_safetensors_header, weight_files
from labkit.studies import will_it_fit as planner

SHIPPED_CONFIGS = sorted(p.stem for p in planner.configs_dir().glob("*.json"))
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "tiny-llama"
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def _file_tensors(folder: Path) -> tuple[dict[str, tuple[int, ...]], int, set[str]]:
    """(name -> shape, data bytes, dtypes) over the safetensors files of ``folder``."""
    shapes, nbytes, dtypes = {}, 0, set()
    for path in weight_files(folder):
        for name, info in read_safetensors_header(path).items():
            if name == "__metadata__":
                continue
            shapes[name] = tuple(info["shape"])
            start, end = info["data_offsets"]
            nbytes += end - start
            dtypes.add(info["dtype"])
            assert end - start == math.prod(info["shape"]) * _DTYPE_BYTES[info["dtype"]]
    return shapes, nbytes, dtypes


def _resave(folder: Path, dtype: torch.dtype, out: Path) -> Path:
    """A copy of ``folder`` with its weights stored in ``dtype`` (as a fp16 release would be)."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    state = load_file(folder / "model.safetensors")
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, out / "model.safetensors")
    (out / "config.json").write_text((folder / "config.json").read_text())
    return out


def test_shipped_config_files_are_there() -> None:
    # The four models of the notebook's table; if one goes missing the table silently shrinks.
    for stem in (
        "meta-llama__Llama-2-7b-hf",
        "meta-llama__Meta-Llama-3-8B",
        "microsoft__phi-2",
        "Salesforce__xLAM-1b-fc-r",
    ):
        assert stem in SHIPPED_CONFIGS
        assert "_source" in json.loads((planner.configs_dir() / f"{stem}.json").read_text())


@pytest.mark.parametrize("stem", SHIPPED_CONFIGS)
def test_tensor_list_matches_models_built_on_meta(stem: str) -> None:
    import transformers

    from labkit.models.config import LlamaConfig, PhiConfig
    from labkit.models.errors import ModelLoadError
    from labkit.models.llama import Llama
    from labkit.models.phi import Phi

    cfg = planner.load_config(stem)
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
    assert planner.weight_shapes(cfg) == {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    assert planner.num_parameters(cfg) == theirs.num_parameters()
    if ours is not None:
        assert planner.weight_shapes(cfg) == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("phi", {"num_key_value_heads": 4}),
    ],
)
@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16)])
def test_weights_bytes_equal_safetensors_bytes(
    hf_checkpoint, tmp_path: Path, arch: str, kwargs: dict, precision: str, dtype: torch.dtype
) -> None:
    folder = _resave(hf_checkpoint(arch, **kwargs), dtype, tmp_path / f"{arch}-{precision}")
    shapes, nbytes, _ = _file_tensors(folder)
    cfg = planner.load_config(folder)
    assert planner.weight_shapes(cfg) == shapes
    assert planner.weights_bytes(cfg, precision) == nbytes


def test_weights_bytes_equal_loaded_parameter_bytes(hf_checkpoint) -> None:
    folder = hf_checkpoint("llama", tie_word_embeddings=True)
    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        model = load(folder, device="cpu", dtype=dtype).model
        measured = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
        assert planner.weights_bytes(planner.load_config(folder), precision) == measured


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16)])
@pytest.mark.parametrize("batch", [1, 3])
def test_kv_bytes_equal_a_real_cache(hf_checkpoint, precision, dtype, batch) -> None:
    folder = hf_checkpoint("llama", num_key_value_heads=1)
    model = load(folder, device="cpu", dtype=dtype).model
    cache = KVCache.for_model(model, max_len=37, batch=batch)
    with torch.inference_mode():  # the cache is really used: a prefill writes into it
        model(torch.randint(0, 128, (batch, 5)), cache=cache)
    assert cache.length == 5 and cache.k[0].dtype == dtype
    cfg = planner.load_config(folder)
    assert planner.kv_bytes(cfg, 37, batch, precision) == cache.nbytes()


def test_shipped_model_planner_equals_measured() -> None:
    if not SHIPPED_MODEL.is_dir():
        pytest.skip("data/models/tiny-llama is not in this checkout yet")
    shapes, nbytes, dtypes = _file_tensors(SHIPPED_MODEL)
    cfg = planner.load_config("tiny-llama")
    precision = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}[dtypes.pop()]
    assert not dtypes, "one dtype per shipped checkpoint"
    assert planner.weight_shapes(cfg) == shapes
    assert planner.weights_bytes(cfg, precision) == nbytes
    model = load("tiny-llama", device="cpu").model
    assert planner.weights_bytes(cfg, "fp32") == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    cache = KVCache.for_model(model, max_len=128, dtype=torch.float16)
    assert planner.kv_bytes(cfg, 128, 1, "fp16") == cache.nbytes()


def test_block_schemes_bits_per_weight() -> None:
    # One block of 32 int4 weights = 16 bytes of nibbles + a 2-byte fp16 scale = 18 bytes.
    assert planner.bits_per_weight("int4") == 18 * 8 / 32 == 4.5
    assert planner.bits_per_weight("int8") == 34 * 8 / 32 == 8.5
    assert planner.tensor_bytes((64, 32), "int4") == 64 * 18
    assert planner.tensor_bytes((64,), "int4") == 64 * 2  # vectors stay fp16
    assert planner.tensor_bytes((3, 5), "fp16") == 30
    assert planner.bits_per_weight("float16") == 16


def test_quantized_bytes_come_from_labkit_quant() -> None:
    # One source of truth: every quantized matrix costs what labkit.quant.tensor_bits says.
    from labkit.quant import tensor_bits

    cfg = planner.load_config("microsoft__phi-2")
    shapes = planner.weight_shapes(cfg)
    for precision, scheme in (("int4", "gguf-q4_0"), ("int8", "gguf-q8_0"),
                              ("coreml-int8-channel", "coreml-int8-channel"),
                              ("gguf-q4_k", "gguf-q4_k")):
        expected = sum(math.ceil(tensor_bits(scheme, s) / 8) if len(s) == 2 else 2 * math.prod(s)
                       for s in shapes.values())
        assert planner.weights_bytes(cfg, precision) == expected
    assert "gguf-q4_k" in planner.precisions() and "int4" in planner.precisions()


def test_quantized_weights_are_smaller_in_order() -> None:
    cfg = planner.load_config("meta-llama__Llama-2-7b-hf")
    sizes = [planner.weights_bytes(cfg, p) for p in ("fp32", "fp16", "int8", "int4")]
    assert sizes == sorted(sizes, reverse=True)
    # int4 of a 7B model: 4.5 bits for the matrices, 16 for the norms.
    vectors = sum(math.prod(s) for s in planner.weight_shapes(cfg).values() if len(s) == 1)
    matrices = planner.num_parameters(cfg) - vectors
    assert all(math.prod(s) % 16 == 0 for s in planner.weight_shapes(cfg).values() if len(s) == 2)
    assert sizes[3] == matrices * 9 // 16 + 2 * vectors


def test_mac_budget_and_fits() -> None:
    assert planner.mac_gpu_budget_bytes(24) == int(24 * 2**30 * 2 / 3)
    assert planner.mac_gpu_budget_bytes(64) == int(64 * 2**30 * 3 / 4)
    p = planner.plan("meta-llama__Meta-Llama-3-8B", "fp16", 8192)
    assert p.total_bytes == p.weights_bytes + p.kv_bytes + p.activation_bytes
    verdicts = [planner.fits(p, gb) for gb in planner.MAC_MEMORY_GB]
    assert verdicts == sorted(verdicts)  # once it fits, it fits on every larger Mac
    gb = planner.smallest_mac(p)
    assert gb is not None and planner.fits(p, gb)
    smaller = [s for s in planner.MAC_MEMORY_GB if s < gb]
    assert not any(planner.fits(p, s) for s in smaller)
    assert planner.smallest_mac(planner.plan("meta-llama__Meta-Llama-3-8B", "int4", 8192)) <= gb


def test_activation_estimate_grows_with_context() -> None:
    cfg = planner.load_config("microsoft__phi-2")
    small, large = (planner.activation_bytes(cfg, n) for n in (256, 2048))
    assert 0 < small < large


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision 'int3' is unknown"):
        planner.plan("microsoft__phi-2", "int3", 128)
    with pytest.raises(ValueError, match="context"):
        planner.plan("microsoft__phi-2", "fp16", 0)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        planner.load_config("no-such-model")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="vocab_size"):
        planner.weights_bytes(planner.load_config(bad), "fp16")
    bad.write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        planner.weight_shapes(planner.load_config(tmp_path))


def test_device_map_forces_a_disk_split_and_generates_the_same_tokens(
    hf_checkpoint, tmp_path: Path
) -> None:
    import transformers

    folder = hf_checkpoint("llama", num_hidden_layers=4)
    cfg = planner.load_config(folder)
    shapes = planner.weight_shapes(cfg)
    embed_and_head = sum(planner.tensor_bytes(s, "fp32") for n, s in shapes.items()
                         if not n.startswith("model.layers."))
    per_layer = sum(planner.tensor_bytes(s, "fp32") for n, s in shapes.items()
                    if n.startswith("model.layers.0."))
    budget = {"cpu": embed_and_head + 2 * per_layer, "disk": 10**12}
    device_map = planner.auto_device_map(folder, budget)
    assert set(device_map.values()) == {"cpu", "disk"}
    split = planner.load_with_device_map(folder, device_map, tmp_path / "offload")
    whole = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 17]])
    with torch.inference_mode():
        a = split.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        b = whole.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
