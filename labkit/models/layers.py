"""Building blocks every decoder here shares: RoPE, attention, and the cache interface they read.

One forward per architecture (``llama.py``, ``phi.py``) calls these. A new way of decoding (a
sliding window, pages, a fixed-size buffer an exporter can trace, rows at different positions)
is a new *cache object*, never a copy of the attention layer: the pattern of mlx-lm's
``models/cache.py``. The forward asks the cache three things and tells it one:

* ``cache.positions(T)`` — the positions of the ``T`` new tokens, for RoPE: a ``slice`` when
  every row continues at the same offset (a contiguous cache), or a LongTensor (``[T]``, or
  ``[B, 1, T]`` when rows sit at different positions) that indexes the RoPE tables.
* ``cache.update(layer, k, v)`` — store the new K/V (``[B, H_kv, T, d]``, RoPE applied) and
  return the K/V attention reads: every filled position, new ones included.
* ``cache.mask(T)`` — ``None`` for plain causal attention over what ``update`` returned (the new
  tokens are its last ``T`` positions), or an explicit mask SDPA takes as ``attn_mask``
  (boolean: True = attend; or additive float), for caches whose rows or slots need one.
* ``cache.advance(T)`` — called once per forward, after the last layer.

``SequentialCache`` gives the first and third for caches whose rows share one offset.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

Positions = slice | torch.Tensor


@runtime_checkable
class Cache(Protocol):
    """What ``Llama.forward`` and ``Phi.forward`` need from a cache (see the module docstring)."""

    def positions(self, num_tokens: int) -> Positions: ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def mask(self, num_tokens: int) -> torch.Tensor | None: ...

    def advance(self, num_tokens: int) -> None: ...


class SequentialCache:
    """A cache whose rows all continue at ``self.length``: positions are a slice, no mask.

    Subclasses provide ``length`` (positions filled so far), ``update`` and ``advance``.
    """

    length: int

    def positions(self, num_tokens: int) -> Positions:
        return slice(self.length, self.length + num_tokens)

    def mask(self, num_tokens: int) -> torch.Tensor | None:
        return None


def cache_layout(model: torch.nn.Module) -> dict:
    """What a cache must match to serve ``model``: layers, KV heads, head_dim, dtype, device."""
    cfg = model.config
    param = next(model.parameters())
    return {"num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "dtype": param.dtype, "device": param.device}


# --- rotary position embeddings (Su et al. 2021) -------------------------------------------------


def rope_cos_sin(
    rotary_dim: int, max_positions: int, theta: float, scaling_factor: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[max_positions, rotary_dim]`` for RoPE, in fp32.

    Frequencies theta^(-2i/d), laid out as two halves ``cat(freqs, freqs)`` — the "rotate_half"
    convention of transformers' Llama (not the interleaved pairs of the original paper/Meta code;
    the two differ by a permutation of q/k channels that HF checkpoints already bake in).
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim)
    )
    inv_freq = inv_freq / scaling_factor
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_at(
    cos_table: torch.Tensor, sin_table: torch.Tensor, positions: Positions, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin at ``positions`` (see ``Cache.positions``), cast to the activations' dtype.

    A slice gives ``[T, d]``; a position tensor of shape ``P`` gives ``[*P, d]``. The tables stay
    in fp32 and are cast per call, so fp16/bf16 models rotate with fp16/bf16 tables as
    transformers does.
    """
    if isinstance(positions, slice):
        if positions.stop > cos_table.shape[0]:
            raise ValueError(
                f"sequence of {positions.stop} positions exceeds max_position_embeddings="
                f"{cos_table.shape[0]}"
            )
        return cos_table[positions].to(dtype), sin_table[positions].to(dtype)
    if positions.dim() == 1:  # a plain gather (what exporters trace)
        cos, sin = cos_table.index_select(0, positions), sin_table.index_select(0, positions)
    else:
        flat = positions.reshape(-1)
        shape = (*positions.shape, cos_table.shape[-1])
        cos = cos_table.index_select(0, flat).view(shape)
        sin = sin_table.index_select(0, flat).view(shape)
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, d] by the angles of its positions (cos/sin broadcast to it)."""
    return x * cos + rotate_half(x) * sin


# --- attention -----------------------------------------------------------------------------------


def _sdpa_has_gqa() -> bool:
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


#: Let SDPA share each KV head across its query heads (``enable_gqa``, torch >= 2.5) instead of
#: copying K/V per query head. :func:`explicit_gqa` switches it off for exporters that do not
#: know ``enable_gqa`` (Core ML, ONNX, OpenVINO); both give the same numbers.
SDPA_GQA = _sdpa_has_gqa()


@contextlib.contextmanager
def explicit_gqa() -> Iterator[None]:
    """Within the block, attention repeats K/V heads explicitly (``repeat_kv``): for tracing."""
    global SDPA_GQA
    saved = SDPA_GQA
    SDPA_GQA = False
    try:
        yield
    finally:
        SDPA_GQA = saved


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, S, d] -> [B, H_kv * n_rep, S, d]: KV head j serves query heads j*n_rep ..."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of the new queries over every key the cache returned.

    q is [B, H, T, d]; k, v are [B, H_kv, S, d]. Without ``mask`` the queries are the last T of
    the S positions (start = S - T) and each sees the keys up to its own position; with one,
    the mask says it (``Cache.mask``). Grouped-query attention: each KV head serves H / H_kv
    query heads (see SDPA_GQA for how).
    """
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if gqa and not SDPA_GQA:
        n_rep = q.shape[1] // k.shape[1]
        k, v, gqa = repeat_kv(k, n_rep), repeat_kv(v, n_rep), False
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if t == 1:  # one new token sees every filled position: no mask needed
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if s == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # Several new tokens after a filled prefix: query i (position start+i) sees keys <= start+i.
    # (SDPA's is_causal aligns the mask top-left, which is wrong when S > T.)
    rows = torch.arange(t, device=q.device)[:, None] + (s - t)
    causal = rows >= torch.arange(s, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=gqa)
