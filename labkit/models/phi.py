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
from labkit.models.decoder import Attention, Decoder
from labkit.models.layers import Cache, apply_rope


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016), as transformers' NewGELUActivation."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


class PhiAttention(Attention):
    """Attention with RoPE on the first ``rotary_dim`` channels of q and k only."""

    def __init__(self, cfg: PhiConfig, layer: int) -> None:
        super().__init__(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, layer)
        self.rotary_dim = cfg.rotary_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim)
        self.dense = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size)

    def out(self) -> nn.Linear:
        return self.dense

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first rotary_dim channels; pass the rest through unchanged."""
        rot, keep = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        return torch.cat((apply_rope(rot, cos, sin), keep), dim=-1)


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


class Phi(Decoder):
    """Phi decoder with an optional explicit KV cache; state dict keys = PhiForCausalLM's.

    The forward over the blocks (positions, mask and cache handling) is ``Decoder.forward``.
    """

    def __init__(self, cfg: PhiConfig) -> None:
        super().__init__(cfg, PhiModel(cfg), nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True))

    @property
    def rotary_dim(self) -> int:
        return self.config.rotary_dim

    def residual_projection(self, module: nn.Module) -> nn.Linear | None:
        if isinstance(module, PhiAttention):
            return module.dense
        return module.fc2 if isinstance(module, PhiMLP) else None

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.final_layernorm(x))
