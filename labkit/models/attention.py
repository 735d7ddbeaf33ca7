"""Exact attention three ways: naive, PyTorch SDPA, and FlashAttention's tiled forward.

All three compute ``O = softmax(Q K^T / sqrt(d)) V`` for tensors shaped ``[B, H, N, d]``
(batch, heads, sequence, head dimension). They differ only in what they keep in memory:

* ``naive_attention`` materialises the full ``N x N`` score matrix ``S`` and probabilities ``P``,
  so its working memory grows as ``N^2``.
* ``sdpa_attention`` calls ``torch.nn.functional.scaled_dot_product_attention``: PyTorch picks a
  fused kernel for the device (the reference our tests compare against).
* ``tiled_attention`` is the forward pass of FlashAttention (Dao et al. 2022, Algorithm 1) written
  for reading: it walks ``B_r x B_c`` tiles of ``S`` and never holds more than one tile, keeping a
  running row maximum ``m``, running sum ``l`` and un-normalised output ``O`` per query row (the
  "online softmax"). Working memory grows as ``N``, and the result is exact, not an approximation.

How much memory each one holds is measured, not computed, by ``labkit.core.memory`` (notebook 06
checks the ``N^2`` versus ``N`` claim with it).

The MLX version of the tiled forward lives in ``labkit.models.attention_mlx`` so that this module
needs nothing beyond torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from labkit.core.checks import positive_int

__all__ = [
    "naive_attention",
    "sdpa_attention",
    "tiled_attention",
    "IMPLEMENTATIONS",
]


def _check_qkv(q: Any, k: Any, v: Any, causal: bool) -> None:
    """Fail early, naming the argument, rather than deep inside a matmul.

    Only ``.ndim`` and ``.shape`` are read, so the MLX versions share this check.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must have shape [B, H, N, d]; got {tuple(t.shape)}")
    if tuple(q.shape[:2]) != tuple(k.shape[:2]) or tuple(k.shape[:3]) != tuple(v.shape[:3]):
        raise ValueError(
            f"q, k, v must share batch and heads, and k, v the sequence length; got "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dimension d; got {q.shape[-1]} and {k.shape[-1]}"
        )
    if causal and q.shape[2] != k.shape[2]:
        # With equal lengths every convention agrees (query i sees keys 0..i); with unequal ones
        # they do not (top-left vs bottom-right alignment), so we refuse instead of guessing.
        raise ValueError(
            f"causal=True needs as many queries as keys; got N_q={q.shape[2]}, N_k={k.shape[2]}"
        )


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """Textbook attention: build ``S = Q K^T / sqrt(d)`` and ``P = softmax(S)`` in full.

    This is the baseline whose ``N x N`` intermediates FlashAttention avoids: ``S`` and ``P``
    each take ``B * H * N^2`` elements.
    """
    _check_qkv(q, k, v, causal)
    scale = 1.0 / math.sqrt(q.shape[-1])
    S = (q @ k.transpose(-2, -1)) * scale  # [B, H, N, N]
    if causal:
        n = q.shape[2]
        above_diagonal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        S = S.masked_fill(above_diagonal, float("-inf"))
    P = torch.softmax(S, dim=-1)
    return P @ v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """PyTorch's fused ``scaled_dot_product_attention``: the reference the others must match."""
    _check_qkv(q, k, v, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """FlashAttention's forward: exact attention holding one ``B_r x B_c`` tile of scores at a time.

    Names follow the paper's Algorithm 1: ``Q_i`` is query block i (``B_r = block_q`` rows),
    ``K_j, V_j`` key/value block j (``B_c = block_k`` rows), ``S_ij`` their score tile, ``m_i``
    the running row maximum, ``l_i`` the running row sum of ``exp(S - m_i)`` and ``O_i`` the
    running output. Two choices differ from Algorithm 1, both from FlashAttention-2 and neither
    changing the result: the outer loop runs over query blocks (so ``m_i, l_i, O_i`` stay local
    to one block instead of being re-read from memory), and ``O_i`` is divided by ``l_i`` once at
    the end instead of after every key block.

    When a new key block raises a row's maximum from ``m_old`` to ``m_new``, everything
    accumulated so far was exponentiated against the old maximum, so it is rescaled by
    ``exp(m_old - m_new)``. That one multiplication is what makes the tiled softmax exact.

    With ``causal=True`` query ``r`` sees keys ``0..r``: key blocks entirely above the diagonal
    are skipped without computing them, and only blocks the diagonal crosses are masked.
    ``N`` need not be a multiple of either block size; the last blocks are simply shorter.
    """
    _check_qkv(q, k, v, causal)
    B_r = positive_int(block_q, "block_q", "tiled_attention")
    B_c = positive_int(block_k, "block_k", "tiled_attention")
    N_q, N_k, d = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)

    for q_start in range(0, N_q, B_r):  # T_r = ceil(N_q / B_r) query blocks
        q_end = min(q_start + B_r, N_q)
        Q_i = q[:, :, q_start:q_end] * scale  # fold 1/sqrt(d) into Q once per block
        rows = q_end - q_start
        m_i = torch.full((*q.shape[:2], rows, 1), float("-inf"), dtype=q.dtype, device=q.device)
        l_i = torch.zeros((*q.shape[:2], rows, 1), dtype=q.dtype, device=q.device)
        O_i = torch.zeros((*q.shape[:2], rows, v.shape[-1]), dtype=q.dtype, device=q.device)

        # Causal: the last query row of this block is q_end - 1, so no key at or beyond q_end is
        # ever visible to it. Key blocks starting there lie entirely above the diagonal: skip.
        k_stop = q_end if causal else N_k
        for k_start in range(0, k_stop, B_c):  # T_c = ceil(N_k / B_c) key blocks
            k_end = min(k_start + B_c, N_k)
            K_j = k[:, :, k_start:k_end]
            V_j = v[:, :, k_start:k_end]

            S_ij = Q_i @ K_j.transpose(-2, -1)  # [B, H, rows, cols]: one tile of S
            if causal and k_end - 1 > q_start:  # the diagonal crosses this tile: mask above it
                S_ij = S_ij.masked_fill(
                    _above_diagonal(q_start, q_end, k_start, k_end, q.device), float("-inf")
                )

            # Online softmax. Every row has seen key 0 after the first block, so m_new is finite
            # and exp(m_i - m_new) is a number even while m_i is still -inf (it gives 0).
            m_ij = S_ij.amax(dim=-1, keepdim=True)
            m_new = torch.maximum(m_i, m_ij)
            P_ij = torch.exp(S_ij - m_new)  # un-normalised probabilities of this tile
            correction = torch.exp(m_i - m_new)  # rescales what was summed against m_old
            l_i = correction * l_i + P_ij.sum(dim=-1, keepdim=True)
            O_i = correction * O_i + P_ij @ V_j
            m_i = m_new

        out[:, :, q_start:q_end] = O_i / l_i
    return out


def _above_diagonal(
    q_start: int, q_end: int, k_start: int, k_end: int, device: torch.device
) -> torch.Tensor:
    """Boolean ``[rows, cols]`` mask, True where key index > query index (future tokens)."""
    query_index = torch.arange(q_start, q_end, device=device).unsqueeze(1)
    key_index = torch.arange(k_start, k_end, device=device).unsqueeze(0)
    return key_index > query_index


IMPLEMENTATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "naive": naive_attention,
    "sdpa": sdpa_attention,
    "tiled": tiled_attention,
}
"""The torch implementations by the name used in records (``params={"impl": ...}``)."""
