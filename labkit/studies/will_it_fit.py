"""Will it fit? Bytes of a decoder's weights, KV cache and activations, from its config alone.

The question users ask first: which model, at which precision and context length, fits in the
unified memory of which Mac. Everything here is computed from a ``config.json`` (no weights are
read), so a 7B or 8B model can be planned on a laptop that could never load it.

* Weights: the planner lists every tensor a Llama or Phi checkpoint holds (the Hugging Face
  names and shapes, exactly as ``model.safetensors`` stores them) and sums their bytes at a
  precision: a float width (fp32, fp16, bf16) or a quantization scheme priced by
  ``labkit.quant.tensor_bits`` (the one source of truth for bits per weight; int8/int4 are Q8_0 and
  Q4_0). One list, so the sum equals the bytes of a real checkpoint — a test checks it on the
  shipped model, byte for byte.
* KV cache: ``labkit.inference.kv_cache.kv_cache_bytes_for_config`` (the lab's one formula).
* Activations: an *estimate* of the transient buffers of one forward (see
  ``activation_bytes``); unlike the other two it is not exact and is labelled so.
* Mac memory: unified-memory sizes of Apple-silicon Macs and the share the GPU may use by
  default (``mac_gpu_budget_bytes``, an approximation with its sources).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labkit.inference.kv_cache import kv_cache_bytes_for_config

# --- bits per weight -----------------------------------------------------------------------------

#: Float storage widths (a checkpoint's dtype): every tensor of the model at this width.
FLOAT_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "bf16": 16}
FLOAT_PRECISIONS = tuple(FLOAT_BITS)
#: The plain names the notebooks use, as ``labkit.quant`` schemes: the cost of a scheme (codes,
#: scales, biases, LUTs) has one source of truth, ``labkit.quant.tensor_bits``. int8 and int4 are
#: llama.cpp's Q8_0 and Q4_0: one fp16 scale per block of 32 weights, 8.5 and 4.5 bits per weight.
PRECISION_SCHEMES: dict[str, str] = {"int8": "gguf-q8_0", "int4": "gguf-q4_0"}
_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def _name(precision: str) -> str:
    return _ALIASES.get(precision, precision)


def precisions() -> list[str]:
    """Every precision the planner takes: float widths, int8/int4, and each labkit.quant scheme."""
    from labkit.quant import SCHEMES

    return list(FLOAT_BITS) + list(PRECISION_SCHEMES) + [s for s in SCHEMES if s not in FLOAT_BITS]


def scheme_of(precision: str) -> str | None:
    """The labkit.quant scheme behind ``precision`` (None for a float width); refuses unknown names."""
    from labkit.quant import SCHEMES

    name = _name(precision)
    if name in FLOAT_BITS:
        return None
    scheme = PRECISION_SCHEMES.get(name, name)
    if scheme not in SCHEMES:
        raise ValueError(
            f"precision {precision!r} is unknown; known: {', '.join(precisions())}"
        )
    return scheme


def bits_per_weight(precision: str) -> float:
    """Bits one weight of a matrix takes at ``precision`` (block scales included), from
    labkit.quant for quantized schemes. Shape-dependent schemes (per-channel, LUT) have no single
    value: ``tensor_bytes`` prices them per tensor."""
    from labkit.quant import bits_per_weight as scheme_bits

    scheme = scheme_of(precision)
    return float(FLOAT_BITS[_name(precision)]) if scheme is None else scheme_bits(scheme)


# --- configs -------------------------------------------------------------------------------------


def configs_dir() -> Path:
    """data/configs/ in the checkout: config.json files of models the lab plans but never loads."""
    from labkit.core import paths

    return paths.configs_dir()


def load_config(source: Any) -> dict[str, Any]:
    """A config dict from a dict, a config .json file, a model folder, ``"tiny-llama"``, or the
    stem of a file in data/configs (e.g. ``"microsoft__phi-2"``). Keys starting with ``_``
    (provenance notes) are dropped."""
    if isinstance(source, Mapping):
        config = dict(source)
    else:
        text = os.fspath(source)
        path = Path(text).expanduser()
        if text == "tiny-llama":
            from labkit.core import paths

            path = paths.models_dir() / "tiny-llama"
        elif not path.exists() and (configs_dir() / f"{text}.json").is_file():
            path = configs_dir() / f"{text}.json"
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            known = sorted(p.stem for p in configs_dir().glob("*.json"))
            raise FileNotFoundError(
                f"{path}: no config found; expected a config .json, a model folder with "
                f"config.json, 'tiny-llama', or one of data/configs: {', '.join(known)}"
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a config must be a JSON object")
    return {k: v for k, v in config.items() if not str(k).startswith("_")}


def _family(config: Mapping[str, Any]) -> str:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type in ("llama", "mistral") or any(a in ("LlamaForCausalLM", "MistralForCausalLM")
                                                  for a in archs):
        return "llama"
    if model_type == "phi" or "PhiForCausalLM" in archs:
        return "phi"
    raise ValueError(
        f"config: unsupported architecture {archs or model_type!r}; the planner knows Llama, "
        "Mistral and Phi (architectures LlamaForCausalLM, MistralForCausalLM, PhiForCausalLM)"
    )


def _dims(config: Mapping[str, Any]) -> tuple[int, int, int, int, int, int, int]:
    """(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim) with HF defaults."""
    try:
        vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
        inter, layers = int(config["intermediate_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
    except KeyError as exc:
        raise ValueError(f"config: missing required key {exc.args[0]!r}") from exc
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    return vocab, hidden, inter, layers, heads, kv_heads, head_dim


# --- weights -------------------------------------------------------------------------------------


def weight_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, HF name -> shape, as ``model.safetensors`` stores them.

    A tied output projection (``tie_word_embeddings``) is stored once, as the embedding.
    """
    family = _family(config)
    vocab, hidden, inter, layers, heads, kv_heads, head_dim = _dims(config)
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        if family == "llama":
            attn_bias = bool(config.get("attention_bias", False))
            mlp_bias = bool(config.get("mlp_bias", False))
            linears = {
                "self_attn.q_proj": (q_dim, hidden, attn_bias),
                "self_attn.k_proj": (kv_dim, hidden, attn_bias),
                "self_attn.v_proj": (kv_dim, hidden, attn_bias),
                "self_attn.o_proj": (hidden, q_dim, attn_bias),
                "mlp.gate_proj": (inter, hidden, mlp_bias),
                "mlp.up_proj": (inter, hidden, mlp_bias),
                "mlp.down_proj": (hidden, inter, mlp_bias),
            }
            norms = {"input_layernorm": False, "post_attention_layernorm": False}
        else:  # Phi: biases everywhere, one LayerNorm (weight and bias) per parallel block
            linears = {
                "self_attn.q_proj": (q_dim, hidden, True),
                "self_attn.k_proj": (kv_dim, hidden, True),
                "self_attn.v_proj": (kv_dim, hidden, True),
                "self_attn.dense": (hidden, q_dim, True),
                "mlp.fc1": (inter, hidden, True),
                "mlp.fc2": (hidden, inter, True),
            }
            norms = {"input_layernorm": True}
        for name, (out_f, in_f, bias) in linears.items():
            shapes[p + name + ".weight"] = (out_f, in_f)
            if bias:
                shapes[p + name + ".bias"] = (out_f,)
        for name, bias in norms.items():
            shapes[p + name + ".weight"] = (hidden,)
            if bias:
                shapes[p + name + ".bias"] = (hidden,)
    if family == "llama":
        shapes["model.norm.weight"] = (hidden,)
        if not config.get("tie_word_embeddings", False):
            shapes["lm_head.weight"] = (vocab, hidden)
    else:
        shapes["model.final_layernorm.weight"] = (hidden,)
        shapes["model.final_layernorm.bias"] = (hidden,)
        shapes["lm_head.weight"] = (vocab, hidden)
        shapes["lm_head.bias"] = (vocab,)
    return shapes


def num_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of the checkpoint (a tied embedding counted once)."""
    return sum(math.prod(s) for s in weight_shapes(config).values())


def tensor_bytes(shape: tuple[int, ...], precision: str) -> int:
    """Bytes of one tensor at ``precision``.

    Float precisions store every tensor at their width. Quantized ones store matrices (2-D:
    linear layers, embedding, output) as the labkit.quant scheme prices them
    (``tensor_bits``, exact) and keep vectors (norms, biases: a tiny share of the bytes) in fp16,
    as llama.cpp's files keep norms in a float type.
    """
    numel = math.prod(shape)
    scheme = scheme_of(precision)
    if scheme is None:
        return numel * FLOAT_BITS[_name(precision)] // 8
    if len(shape) < 2:
        return numel * 2
    from labkit.quant import tensor_bits

    return math.ceil(tensor_bits(scheme, tuple(shape)) / 8)


def weights_bytes(config: Mapping[str, Any], precision: str) -> int:
    """Bytes of all weights of ``config`` at ``precision`` (sum over ``weight_shapes``)."""
    return sum(tensor_bytes(s, precision) for s in weight_shapes(config).values())


# --- KV cache and activations --------------------------------------------------------------------

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def element_bytes(precision: str) -> float:
    """Bytes per element of an activation or cache tensor at ``precision`` (int8: 1, int4: 0.5)."""
    name = _name(precision)
    if name in _BYTES:
        return _BYTES[name]
    if name == "int4":
        return 0.5
    raise ValueError(f"precision {precision!r} has no element size; use fp32, fp16, bf16, int8, int4")


def kv_bytes(config: Mapping[str, Any], context: int, batch: int = 1, kv_precision: str = "fp16") -> int:
    """KV-cache bytes for ``context`` positions (``kv_cache_bytes_for_config``, the one formula)."""
    return kv_cache_bytes_for_config(
        config, positions=context, dtype_bytes=element_bytes(kv_precision), batch=batch
    )


#: Tokens a prefill processes per forward (llama.cpp's default micro-batch is 512).
PREFILL_CHUNK = 512


def activation_bytes(
    config: Mapping[str, Any],
    context: int,
    batch: int = 1,
    act_precision: str = "fp16",
    chunk: int = PREFILL_CHUNK,
) -> int:
    """An ESTIMATE of the transient bytes of one prefill forward of ``min(chunk, context)`` tokens.

    Counted: the residual stream and one layer's working tensors (q, k, v, attention output,
    gate/up/act of the MLP) for the chunk, the attention scores of the chunk against the whole
    context (unfused attention: a fused kernel needs far less), and fp32 logits for the last
    position. Only one layer is alive at a time in inference, so layers do not multiply it.
    Real runtimes add allocator slack and scratch buffers; treat this as an order of magnitude.
    """
    _, hidden, inter, _, heads, kv_heads, head_dim = _dims(config)
    vocab = int(config["vocab_size"])
    t = min(chunk, context)
    per_token = 2 * hidden + heads * head_dim * 2 + 2 * kv_heads * head_dim + 3 * inter
    scores = heads * t * context
    return int(element_bytes(act_precision) * batch * (t * per_token + scores) + 4 * batch * vocab)


# --- a plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Bytes one model needs at one precision, context length and batch."""

    model: str
    precision: str
    context: int
    batch: int
    kv_precision: str
    parameters: int
    weights_bytes: int
    kv_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def plan(
    config: Any,
    precision: str,
    context: int,
    batch: int = 1,
    *,
    kv_precision: str = "fp16",
    name: str | None = None,
) -> Plan:
    """Weights + KV cache + activation estimate for ``config`` (anything ``load_config`` takes)."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive integer (tokens), got {context!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    cfg = load_config(config)
    if name is None:
        name = config if isinstance(config, str) else "model"
    scheme_of(precision)  # refuse an unknown precision by name
    return Plan(
        model=str(name),
        precision=precision,
        context=context,
        batch=batch,
        kv_precision=kv_precision,
        parameters=num_parameters(cfg),
        weights_bytes=weights_bytes(cfg, precision),
        kv_bytes=kv_bytes(cfg, context, batch, kv_precision),
        activation_bytes=activation_bytes(cfg, context, batch, kv_precision),
    )


# --- Macs ----------------------------------------------------------------------------------------

#: Unified-memory sizes of Apple-silicon Macs (M1 to M4 families: MacBook Air/Pro, mini, iMac,
#: Studio, Pro), in Apple's "GB", which are binary: 16 GB is 16 x 2**30 bytes.
MAC_MEMORY_GB = (8, 16, 24, 32, 36, 48, 64, 96, 128, 192)

#: Where the usable share comes from (shown in the notebook beside the numbers).
MAC_BUDGET_SOURCE = (
    "Metal's MTLDevice.recommendedMaxWorkingSetSize, which llama.cpp, MLX and Ollama use as the "
    "GPU memory limit, defaults (sysctl iogpu.wired_limit_mb = 0) to about 2/3 of RAM on Macs "
    "with <= 36 GB and about 3/4 above: ~5.3 GB of 8 GB (SceneWorks/SceneWorks PR #1552), "
    "75% of RAM (gpustack/gpustack issue #1375), ~96 GB of 128 GB (stencel.io, 'Apple silicon "
    "limitations with usage on local LLM'). An approximation: newer macOS releases report more "
    "(107.5 GiB of 128 GiB on macOS 26, antirez/ds4 issue #890), and `sudo sysctl "
    "iogpu.wired_limit_mb=N` raises the limit until reboot."
)


def mac_gpu_share(memory_gb: float) -> float:
    """The approximate default share of unified memory the GPU may use (see MAC_BUDGET_SOURCE)."""
    if not memory_gb > 0:
        raise ValueError(f"memory_gb must be > 0, got {memory_gb!r}")
    return 2 / 3 if memory_gb <= 36 else 3 / 4


def mac_gpu_budget_bytes(memory_gb: float) -> int:
    """Bytes a Mac with ``memory_gb`` of unified memory lets the GPU use by default (approx.)."""
    return int(memory_gb * 2**30 * mac_gpu_share(memory_gb))


def fits(p: Plan, memory_gb: float) -> bool:
    """Does the plan's total fit in the default GPU budget of a ``memory_gb`` Mac?"""
    return p.total_bytes <= mac_gpu_budget_bytes(memory_gb)


def smallest_mac(p: Plan, sizes: tuple[int, ...] = MAC_MEMORY_GB) -> int | None:
    """The smallest Mac memory size (GB) the plan fits in, or None if none does."""
    return next((gb for gb in sorted(sizes) if fits(p, gb)), None)


# --- Hugging Face accelerate: a device map for a model that does not fit ------------------------


def empty_hf_model(folder: str | os.PathLike[str], dtype: Any = None) -> Any:
    """A transformers model of ``folder``'s config with no memory behind it (meta tensors),
    its tied weights tied, for ``infer_auto_device_map`` to size. Reads config.json only."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    cfg = transformers.AutoConfig.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False
    )
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    model.tie_weights()  # else the map may put a tied lm_head on another device than its weight
    return model


def hf_no_split_modules(model: Any) -> list[str]:
    """The block classes a device map must keep whole (a decoder layer: its residual add)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def auto_device_map(
    folder: str | os.PathLike[str], max_memory: Mapping[str, int | str], dtype: Any = None
) -> dict[str, str | int]:
    """accelerate's ``infer_auto_device_map`` for ``folder`` under ``max_memory``.

    ``max_memory`` maps devices ("mps", "cuda:0" or 0, "cpu", "disk") to byte budgets; modules
    fill the devices in that order, and what does not fit goes to "disk" (offload files).
    """
    from accelerate import infer_auto_device_map

    if not max_memory:
        raise ValueError("max_memory must name at least one device with a byte budget")
    model = empty_hf_model(folder, dtype)
    return dict(
        infer_auto_device_map(
            model,
            max_memory=dict(max_memory),
            no_split_module_classes=hf_no_split_modules(model),
            dtype=dtype or model.dtype,
        )
    )


def load_with_device_map(
    folder: str | os.PathLike[str],
    device_map: Mapping[str, str | int],
    offload_folder: str | os.PathLike[str],
    dtype: Any = None,
) -> Any:
    """The transformers model of ``folder`` placed by ``device_map`` (accelerate hooks move each
    offloaded block's weights in for its forward and out after). safetensors only."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder,
        device_map=dict(device_map),
        offload_folder=os.fspath(offload_folder),
        dtype=dtype or torch.float32,
        use_safetensors=True,
        local_files_only=True,
        trust_remote_code=False,
    )
