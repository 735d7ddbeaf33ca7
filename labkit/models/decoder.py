"""What every decoder here shares around its blocks: attention over a cache, RoPE tables, the
forward over the blocks, weight init. ``llama.py`` and ``phi.py`` add what makes each itself
(their norms, MLPs, block wiring and HF parameter names).

Why one base and not two copies: a fix to how positions, masks or the cache are handled is made
once for every architecture (the Swift port and the exporters depend on these being identical).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from labkit.models.layers import (
    Cache,
    Positions,
    apply_rope,
    causal_attention,
    rope_at,
    rope_cos_sin,
)

INIT_STD = 0.02


class Attention(nn.Module):
    """Multi-head attention with RoPE on q and k and grouped K/V heads, reading a cache.

    Subclasses create ``q_proj``, ``k_proj``, ``v_proj`` and the output projection under their
    checkpoint's names, return the latter from ``out``, and may change how RoPE rotates.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim

    def out(self) -> nn.Linear:
        raise NotImplementedError

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on q or k ``[B, heads, T, head_dim]`` (all channels; Phi rotates a part)."""
        return apply_rope(x, cos, sin)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, heads, T, head_dim]`` of ``x``, with RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Cache | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = causal_attention(q, k, v, mask)
        return self.out()(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class Decoder(nn.Module):
    """A causal LM: ``self.model.embed_tokens``, ``self.model.layers`` (blocks taking
    ``(x, cos, sin, cache, mask)``), then ``head`` (final norm and output matrix).

    Subclasses pass their config, trunk (``model.``) and output Linear (None when tied) to
    ``__init__``, and define ``rotary_dim``, ``head`` and ``residual_projection``.
    """

    def __init__(self, cfg: Any, trunk: nn.Module, lm_head: nn.Linear | None) -> None:
        super().__init__()
        self.config = cfg
        self.model = trunk  # registered first: state-dict keys in transformers' order
        if lm_head is not None:
            self.lm_head = lm_head
        self.build_rope_cache()
        self.apply(self._init_weights)

    @property
    def rotary_dim(self) -> int:
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the residual stream ``x`` (final norm, then the output matrix)."""
        raise NotImplementedError

    def residual_projection(self, module: nn.Module) -> nn.Linear | None:
        """The projection of ``module`` that writes into the residual stream, if it has one."""
        raise NotImplementedError

    # -- setup --

    def build_rope_cache(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent cos/sin buffers (also after building on 'meta')."""
        cfg = self.config
        cos, sin = rope_cos_sin(
            self.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling_factor
        )
        if device is None:  # beside the weights (on 'meta' while a loader builds the skeleton)
            device = self.model.embed_tokens.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        """Every Linear and the embedding ~ N(0, 0.02), biases zero; residual projections at
        0.02 / sqrt(2 * layers) (GPT-2 / nanoGPT), so the residual stream's variance does not
        grow with depth. ``nn.Module.apply`` visits children first, so they are re-drawn last."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        proj = self.residual_projection(module)
        if proj is not None:
            std = INIT_STD / math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(proj.weight, mean=0.0, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (a tied output matrix adds nothing)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    # -- forward --

    def rope(self, positions: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at ``positions`` (a slice or a tensor: ``Cache.positions``)."""
        return rope_at(self.rope_cos, self.rope_sin, positions, self.model.embed_tokens.weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        *,
        return_hidden: bool = False,
        last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[B, T, vocab]`` for ``input_ids`` ``[B, T]``.

        With a ``cache``, the new tokens get the positions it gives and attention reads what it
        returns (``labkit.models.layers``). ``return_hidden=True`` also returns the residual
        stream: ``hidden[0]`` is the embedding output and ``hidden[i]`` the output of layer
        ``i`` (before the final norm), as transformers' ``output_hidden_states`` for
        ``i < num_hidden_layers``. ``last_only=True`` computes only the last position's logits
        (``[B, 1, vocab]``): what a prefill needs, without a product it would throw away.
        """
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}"
            )
        t = input_ids.shape[1]
        cos, sin = self.rope(slice(0, t) if cache is None else cache.positions(t))
        mask = None if cache is None else cache.mask(t)
        x = self.model.embed_tokens(input_ids)
        hidden = [x] if return_hidden else []
        for block in self.model.layers:
            x = block(x, cos, sin, cache, mask)
            if return_hidden:
                hidden.append(x)
        if cache is not None:
            cache.advance(t)
        logits = self.head(x[:, -1:] if last_only else x)
        return (logits, hidden) if return_hidden else logits
