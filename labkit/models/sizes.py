"""How many bytes a model's weights and KV cache take: the one source of truth for each formula.

From a config alone (a ``config.json`` dict or a typed config), so the planner can size a
Llama 2 7B it never loads and a notebook can check the formula against the bytes of real
tensors. Light on purpose: no torch.

* ``kv_cache_bytes``: 2 tensors (K and V) x layers x KV heads x head_dim x positions x bytes
  per element x batch.
* ``weight_bytes_per_token``: the weight bytes one decode step reads; with the KV cache read
  and written, ``decode_bytes_per_token`` (what a bandwidth roofline divides by).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from labkit.core.checks import nonnegative_int, positive_int


def _get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def head_dim_of(cfg: Any) -> int:
    """``head_dim`` if the config gives it, else hidden_size / num_attention_heads."""
    head_dim = _get(cfg, "head_dim")
    return int(head_dim) if head_dim else int(_get(cfg, "hidden_size")) // int(
        _get(cfg, "num_attention_heads")
    )


def kv_cache_bytes(
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    positions: int,
    bytes_per_element: float,
    batch: int = 1,
) -> int:
    """Bytes of K and V for ``positions`` tokens: 2 x layers x kv_heads x head_dim x positions x bytes x batch.

    ``bytes_per_element`` may be fractional (e.g. 0.5 for a 4-bit cache); the result is rounded
    up to whole bytes.
    """
    for name, value in (
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("batch", batch),
    ):
        positive_int(value, name, "kv_cache_bytes")
    nonnegative_int(positions, "positions", "kv_cache_bytes")
    if not bytes_per_element > 0:
        raise ValueError(
            f"kv_cache_bytes: bytes_per_element must be > 0, got {bytes_per_element!r}"
        )
    elements = 2 * num_layers * num_kv_heads * head_dim * positions * batch
    exact = elements * bytes_per_element
    return int(exact) if float(exact).is_integer() else int(exact) + 1


def kv_cache_bytes_for_config(
    cfg_or_hf_dict: Any, positions: int, dtype_bytes: float = 2, batch: int = 1
) -> int:
    """``kv_cache_bytes`` from a model config alone (a config.json dict or a config object).

    Reads Llama/Phi/Mistral-style keys: ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads`` (defaults to the number of heads: no GQA), ``head_dim`` (defaults to
    ``hidden_size / num_attention_heads``).
    """
    layers = _get(cfg_or_hf_dict, "num_hidden_layers")
    heads = _get(cfg_or_hf_dict, "num_attention_heads")
    if layers is None or heads is None:
        raise ValueError(
            "kv_cache_bytes_for_config: config needs num_hidden_layers and num_attention_heads"
        )
    kv_heads = _get(cfg_or_hf_dict, "num_key_value_heads") or heads
    head_dim = _get(cfg_or_hf_dict, "head_dim")
    if head_dim is None:
        hidden = _get(cfg_or_hf_dict, "hidden_size")
        if hidden is None or hidden % heads:
            raise ValueError(
                "kv_cache_bytes_for_config: config needs head_dim, or a hidden_size divisible by "
                f"num_attention_heads (got hidden_size={hidden!r}, heads={heads!r})"
            )
        head_dim = hidden // heads
    return kv_cache_bytes(
        num_layers=int(layers),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        positions=positions,
        bytes_per_element=dtype_bytes,
        batch=batch,
    )



def weight_bytes_per_token(cfg: Any, dtype_bytes: float = 4) -> int:
    """Bytes of weights one decode step reads: every projection, the norms, the output matrix,
    and one row of the embedding (a gather, not a matrix read — unless it is tied to the output
    matrix, which is then read whole once as the output projection)."""
    h = int(_get(cfg, "hidden_size"))
    inter = int(_get(cfg, "intermediate_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv = int(_get(cfg, "num_key_value_heads") or heads)
    d = head_dim_of(cfg)
    vocab = int(_get(cfg, "vocab_size"))
    layers = int(_get(cfg, "num_hidden_layers"))
    attn = h * heads * d * 2 + h * kv * d * 2  # q, o; k, v
    mlp = 3 * h * inter
    norms = 2 * h
    per_layer = attn + mlp + norms
    elements = layers * per_layer + h + vocab * h + h  # final norm, output matrix, embedding row
    return int(math.ceil(elements * dtype_bytes))


def decode_bytes_per_token(cfg: Any, position: int, dtype_bytes: float = 4) -> dict[str, int]:
    """Bytes moved by the decode step of the token at ``position``: the weights, the KV cache
    read (positions 0..position) and the new K/V written. Activations are ignored (kilobytes)."""
    weights = weight_bytes_per_token(cfg, dtype_bytes)
    kv_read = kv_cache_bytes_for_config(cfg, position + 1, dtype_bytes)
    kv_write = kv_cache_bytes_for_config(cfg, 1, dtype_bytes)
    return {"weights": weights, "kv_read": kv_read, "kv_write": kv_write,
            "total": weights + kv_read + kv_write}
