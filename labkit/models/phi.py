"""A readable Phi (Phi-1, Phi-1.5, Phi-2): parallel attention and MLP, partial rotary, LayerNorm,
gelu_new, biases everywhere.

What differs from Llama (llama.py), and why it matters for the studies:

* Parallel block — ``x + attn(ln(x)) + mlp(ln(x))``: one LayerNorm per layer, and attention and
  MLP read the same normalized input (GPT-J style), so they could run concurrently.
* Partial rotary — RoPE rotates only the first ``rotary_dim = head_dim * partial_rotary_factor``
  channels of each head; the rest carry no position.
* LayerNorm with bias (mean-centred) instead of RMSNorm; gelu_new (tanh approximation) instead
  of SwiGLU; biases on q/k/v/dense, fc1/fc2 and lm_head.

Parameter names are exactly transformers' ``PhiForCausalLM`` (``model.layers.{i}.self_attn.dense``,
``model.layers.{i}.mlp.fc1``, ``model.final_layernorm``, ``lm_head.bias``...). The forward and
cache interface are the same as ``labkit.models.llama.Llama``. Initialization follows Llama's
(N(0, 0.02), residual projections ``dense``/``fc2`` at 0.02/sqrt(2 * layers), biases zero).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from labkit.models.config import PhiConfig
from labkit.models.layers import (
    Cache,
    Positions,
    apply_rope,
    causal_attention,
    rope_at,
    rope_cos_sin,
)
from labkit.models.llama import INIT_STD


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016), as transformers' NewGELUActivation."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


class PhiAttention(nn.Module):
    """Attention with RoPE on the first ``rotary_dim`` channels of q and k only."""

    def __init__(self, cfg: PhiConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim)
        self.dense = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size)

    def partial_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first rotary_dim channels; pass the rest through unchanged."""
        rot, keep = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((apply_rope(rot, cos, sin), keep), dim=-1)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, heads, T, head_dim]`` of ``x``, partial RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return self.partial_rope(q, cos, sin), self.partial_rope(k, cos, sin), v

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
        return self.dense(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class PhiMLP(nn.Module):
    """fc2(gelu_new(fc1(x)))."""

    def __init__(self, cfg: PhiConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_new(self.fc1(x)))


class PhiBlock(nn.Module):
    """Parallel block: x + attn(ln(x)) + mlp(ln(x)), one LayerNorm shared by both branches."""

    def __init__(self, cfg: PhiConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = PhiAttention(cfg, layer)
        self.mlp = PhiMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, cos, sin, cache: Cache | None = None, mask=None) -> torch.Tensor:
        h = self.input_layernorm(x)
        return self.self_attn(h, cos, sin, cache, mask) + self.mlp(h) + x


class PhiModel(nn.Module):
    """The trunk: embedding, blocks, final LayerNorm (HF's ``model.`` prefix)."""

    def __init__(self, cfg: PhiConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(PhiBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Phi(nn.Module):
    """Phi decoder with an optional explicit KV cache; state dict keys = PhiForCausalLM's."""

    def __init__(self, cfg: PhiConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = PhiModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        self.build_rope_cache()
        self.apply(self._init_weights)

    def build_rope_cache(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent cos/sin buffers for the rotary channels."""
        cfg = self.config
        cos, sin = rope_cos_sin(
            cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling_factor
        )
        if device is None:  # beside the weights (on 'meta' while a loader builds the skeleton)
            device = self.model.embed_tokens.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        # nn.Module.apply visits children first, so the residual projections are re-drawn last.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, (PhiAttention, PhiMLP)):
            proj = module.dense if isinstance(module, PhiAttention) else module.fc2
            std = INIT_STD / math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(proj.weight, mean=0.0, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def rope(self, positions: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotary channels at ``positions`` (``Cache.positions``)."""
        return rope_at(self.rope_cos, self.rope_sin, positions, self.model.embed_tokens.weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        *,
        return_hidden: bool = False,
        last_only: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``[B, T, vocab]``; ``return_hidden`` as in ``Llama.forward``."""
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
        logits = self.lm_head(self.model.final_layernorm(x[:, -1:] if last_only else x))
        return (logits, hidden) if return_hidden else logits
