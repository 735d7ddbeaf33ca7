"""A readable Llama: RMSNorm, rotary position embeddings (RoPE), grouped-query attention, SwiGLU.

Written in the spirit of llama2.c / nanoGPT: one idea per function, names from the papers.
Parameter names are exactly those of transformers' ``LlamaForCausalLM`` (``model.layers.{i}.
self_attn.q_proj.weight``, ...), so a checkpoint saved from this module loads in transformers
and vice versa with no renaming. ``lm_head.weight`` is absent when ``tie_word_embeddings``: the
output projection then reuses ``model.embed_tokens.weight`` (and safetensors, which refuses
shared tensors, can save the state dict as is).

Forward, two modes:

* ``model(input_ids)`` — a plain causal forward over the whole sequence (training, perplexity).
* ``model(input_ids, cache=cache)`` — the new tokens get positions ``cache.length ...``; their K
  and V are written into the preallocated cache and attention runs over everything filled.
  The model calls ``cache.advance(T)`` after its last layer (see ``labkit.inference.kv_cache``).

Initialization (for training from scratch): every Linear and the embedding ~ N(0, 0.02);
the two projections that write into the residual stream (``o_proj`` and ``down_proj``) get
std 0.02 / sqrt(2 * num_hidden_layers), as in GPT-2 / nanoGPT, so the residual stream's variance
does not grow with depth (each layer adds two such writes). Norm weights start at one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit.models.config import LlamaConfig
from labkit.models.decoder import INIT_STD, Attention, Decoder
from labkit.models.layers import Cache, apply_rope, rope_cos_sin

__all__ = ["INIT_STD", "Llama", "LlamaAttention", "LlamaBlock", "LlamaMLP", "RMSNorm",
           "apply_rope", "rope_cos_sin"]


# --- Llama ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w (Zhang & Sennrich 2019), written as explicit ops.

    Not ``nn.RMSNorm``: the Core ML export needs plain ops. Computed in fp32 and cast back before
    the weight multiply, exactly as transformers does, so fp16/bf16 runs agree too.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LlamaAttention(Attention):
    """Multi-head attention with RoPE on q and k, and fewer K/V heads than query heads (GQA)."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, layer)
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def out(self) -> nn.Linear:
        return self.o_proj


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        # Registration order = transformers' order, so state dicts list keys identically.
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache: Cache | None = None, mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The trunk: token embedding, the blocks, the final norm (HF's ``model.`` prefix)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(Decoder):
    """Llama decoder with an optional explicit KV cache; state dict keys = LlamaForCausalLM's.

    The forward over the blocks (positions, mask and cache handling) is ``Decoder.forward``.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        tied = cfg.tie_word_embeddings
        head = None if tied else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        super().__init__(cfg, LlamaModel(cfg), head)

    @property
    def rotary_dim(self) -> int:
        return self.config.head_dim

    def residual_projection(self, module: nn.Module) -> nn.Linear | None:
        if isinstance(module, LlamaAttention):
            return module.o_proj
        return module.down_proj if isinstance(module, LlamaMLP) else None

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, hidden] matrix that turns hidden states into logits."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.model.norm(x), self.output_weight)
