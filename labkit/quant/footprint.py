"""The bytes of a checkpoint's weights at a precision, from its ``config.json`` alone.

No weight is read, so a 7B or 8B model can be priced on a laptop that could never load it.
:func:`weight_shapes` lists every tensor a Llama or Phi checkpoint holds (the Hugging Face names
and shapes, exactly as ``model.safetensors`` stores them); :func:`weights_bytes` sums their bytes
at a precision: a float width (fp32, fp16, bf16) or a quantization scheme priced by
:func:`labkit.quant.tensor_bits` (the one source of truth for bits per weight; the plain names
int8/int4 are llama.cpp's Q8_0 and Q4_0). One list, so the sum equals the bytes of a real
checkpoint: a test checks it on the shipped model, byte for byte.

Notebook 09 plans memory with it, notebook 02 divides a chip's bandwidth by it (the roofline).
Configs are plain dicts (``labkit.models.config.read_config``): the planner also prices configs
whose RoPE variant labkit's own models do not implement (Llama 3.1's "llama3").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from labkit.models.config import architecture_of
from labkit.quant.schemes import SCHEMES, tensor_bits
from labkit.quant.schemes import bits_per_weight as scheme_bits_per_weight

#: Float storage widths (a checkpoint's dtype): every tensor of the model at this width.
FLOAT_BITS: dict[str, int] = {"fp32": 32, "fp16": 16, "bf16": 16}
#: The plain names the notebooks use, as ``labkit.quant`` schemes. int8 and int4 are llama.cpp's
#: Q8_0 and Q4_0: one fp16 scale per block of 32 weights, 8.5 and 4.5 bits per weight.
PRECISION_SCHEMES: dict[str, str] = {"int8": "gguf-q8_0", "int4": "gguf-q4_0"}
_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def precision_name(precision: str) -> str:
    """The lab's short name of a precision: torch's spellings ("float16", "half") -> "fp16"."""
    return _ALIASES.get(precision, precision)


def precisions() -> list[str]:
    """Every precision priced here: float widths, int8/int4, and each labkit.quant scheme."""
    return list(FLOAT_BITS) + list(PRECISION_SCHEMES) + [s for s in SCHEMES if s not in FLOAT_BITS]


def scheme_of(precision: str) -> str | None:
    """The labkit.quant scheme behind ``precision`` (None for a float width); refuses unknown names."""
    name = precision_name(precision)
    if name in FLOAT_BITS:
        return None
    scheme = PRECISION_SCHEMES.get(name, name)
    if scheme not in SCHEMES:
        raise ValueError(f"precision {precision!r} is unknown; known: {', '.join(precisions())}")
    return scheme


def bits_per_weight(precision: str) -> float:
    """Bits one weight of a matrix takes at ``precision`` (block scales included). Shape-dependent
    schemes (per-channel, LUT) have no single value: ``tensor_bytes`` prices them per tensor."""
    scheme = scheme_of(precision)
    if scheme is None:
        return float(FLOAT_BITS[precision_name(precision)])
    return scheme_bits_per_weight(scheme)


# --- the tensors of a checkpoint -----------------------------------------------------------------


def family(config: Mapping[str, Any]) -> str:
    """"llama" (Llama, Mistral) or "phi": the two tensor layouts priced here."""
    kind, _ = architecture_of(dict(config), "config")
    if kind not in ("llama", "phi"):
        raise ValueError(
            f"config: unsupported architecture {config.get('architectures') or kind!r}; the "
            "planner knows Llama, Mistral and Phi (LlamaForCausalLM, MistralForCausalLM, "
            "PhiForCausalLM)"
        )
    return kind


def decoder_dims(config: Mapping[str, Any]) -> tuple[int, int, int, int, int, int, int]:
    """(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim), with HF's defaults."""
    try:
        vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
        inter, layers = int(config["intermediate_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
    except KeyError as exc:
        raise ValueError(f"config: missing required key {exc.args[0]!r}") from exc
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    return vocab, hidden, inter, layers, heads, kv_heads, head_dim


#: Each family's Linears of one decoder layer: (name, rows, columns, bias flag), rows and columns
#: as a dimension name of :func:`_layer_tensors`; the bias flag names the config key that turns
#: the bias on (Llama), or True (Phi: biases everywhere).
_LINEARS: dict[str, tuple[tuple[str, str, str, str | bool], ...]] = {
    "llama": (
        ("self_attn.q_proj", "q", "hidden", "attention_bias"),
        ("self_attn.k_proj", "kv", "hidden", "attention_bias"),
        ("self_attn.v_proj", "kv", "hidden", "attention_bias"),
        ("self_attn.o_proj", "hidden", "q", "attention_bias"),
        ("mlp.gate_proj", "inter", "hidden", "mlp_bias"),
        ("mlp.up_proj", "inter", "hidden", "mlp_bias"),
        ("mlp.down_proj", "hidden", "inter", "mlp_bias"),
    ),
    "phi": (
        ("self_attn.q_proj", "q", "hidden", True),
        ("self_attn.k_proj", "kv", "hidden", True),
        ("self_attn.v_proj", "kv", "hidden", True),
        ("self_attn.dense", "hidden", "q", True),
        ("mlp.fc1", "inter", "hidden", True),
        ("mlp.fc2", "hidden", "inter", True),
    ),
}
#: Each family's norms of one decoder layer: (name, has a bias). Phi has one LayerNorm per
#: parallel block; Llama two RMSNorms, weights only.
_NORMS = {
    "llama": (("input_layernorm", False), ("post_attention_layernorm", False)),
    "phi": (("input_layernorm", True),),
}


def _layer_tensors(config: Mapping[str, Any], kind: str) -> dict[str, tuple[int, ...]]:
    """The tensors of one decoder layer (names relative to ``model.layers.<i>.``)."""
    _, hidden, inter, _, heads, kv_heads, head_dim = decoder_dims(config)
    size = {"hidden": hidden, "inter": inter, "q": heads * head_dim, "kv": kv_heads * head_dim}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, rows, cols, bias in _LINEARS[kind]:
        shapes[name + ".weight"] = (size[rows], size[cols])
        if bias is True or (isinstance(bias, str) and bool(config.get(bias, False))):
            shapes[name + ".bias"] = (size[rows],)
    for name, bias in _NORMS[kind]:
        shapes[name + ".weight"] = (hidden,)
        if bias:
            shapes[name + ".bias"] = (hidden,)
    return shapes


def weight_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, HF name -> shape, as ``model.safetensors`` stores them.

    A tied output projection (``tie_word_embeddings``) is stored once, as the embedding.
    """
    kind = family(config)
    vocab, hidden, _, layers, *_ = decoder_dims(config)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    layer = _layer_tensors(config, kind)
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    if kind == "llama":
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


# --- their bytes ---------------------------------------------------------------------------------


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
        return numel * FLOAT_BITS[precision_name(precision)] // 8
    if len(shape) < 2:
        return numel * 2
    return math.ceil(tensor_bits(scheme, tuple(shape)) / 8)


def weights_bytes(config: Mapping[str, Any], precision: str) -> int:
    """Bytes of all weights of ``config`` at ``precision`` (sum over ``weight_shapes``)."""
    return sum(tensor_bytes(s, precision) for s in weight_shapes(config).values())
