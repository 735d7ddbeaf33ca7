"""llama.cpp's mixed recipes as {layer: scheme} assignments: Q4_K_M, the mix most users pick.

A GGUF "file type" such as Q4_K_M is not one block type but a rule that gives each tensor its
own. The rule, as llama.cpp writes it (ggml-org/llama.cpp, ``src/llama-quant.cpp``, functions
``llama_tensor_get_type_impl``, ``llama_ftype_get_default_type`` and ``tensor_type_fallback``;
read at commit 007dbbf3fd17eefe9b47fee45f48f7ba5e62b714):

* the default type of ``LLAMA_FTYPE_MOSTLY_Q4_K_M`` is Q4_K;
* ``attn_v.weight`` gets Q6_K where ``use_more_bits(i_attention_wv, n_attention_wv)``: the
  counter runs over the attn_v tensors in layer order (the loader sorts weights by block number,
  ``weight_name_comparer`` in ``src/llama-model-loader.h``), so it is the block index;
* ``ffn_down`` gets Q6_K where ``use_more_bits(i_layer, n_layer)`` (Falcon has its own rule);
* ``use_more_bits(i, n) = i < n/8 || i >= 7*n/8 || (i - n/8) % 3 == 2``, integer division: the
  first and last eighth of the blocks and every third one between;
* a tensor whose rows (``ne[0]``, its inputs) are not a multiple of 256 falls back to a 32-block
  type, Q4_K -> Q5_0 and Q6_K -> Q8_0 (``labkit.quant.schemes.GGUF_FALLBACK``, applied by the
  schemes themselves);
* the output matrix (or, tied, the token embedding) gets Q6_K, or Q8_0 when its rows are not a
  multiple of 256. The lab's scoreboard keeps embeddings in fp16 for every scheme, so the recipe
  here covers the blocks' Linear layers, like every other row of it.

The HF names map onto llama.cpp's: ``self_attn.v_proj`` is ``attn_v``, ``mlp.down_proj`` is
``ffn_down``.
"""

from __future__ import annotations

from collections.abc import Iterable

from labkit.quant.evaluate import layer_index


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the blocks that get more bits (first and last eighth, every third)."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def q4_k_m(layer_names: Iterable[str]) -> dict[str, str]:
    """Q4_K_M for the blocks' Linear layers (HF names): Q6_K for v_proj and down_proj in the
    blocks :func:`use_more_bits` picks, Q4_K everywhere else (fallbacks by shape, as above)."""
    names = list(layer_names)
    n_layers = len({layer_index(n) for n in names})
    out = {}
    for name in names:
        more = name.endswith(("self_attn.v_proj", "mlp.down_proj")) and use_more_bits(
            layer_index(name), n_layers
        )
        out[name] = "gguf-q6_k" if more else "gguf-q4_k"
    return out


#: the recipes by scoreboard name: each maps the quantized layer names to an assignment
RECIPES = {"gguf-q4_k_m": q4_k_m}


def recipe(name: str, layer_names: Iterable[str]) -> dict[str, str]:
    """The assignment recipe ``name`` gives these layers; a clear error lists the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name](layer_names)
