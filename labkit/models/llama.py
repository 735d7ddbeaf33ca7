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

import math

import torch
import torch.nn.functional as F
from torch import nn

from labkit.models.config import LlamaConfig
from labkit.models.layers import (
    Cache,
    Positions,
    apply_rope,
    causal_attention,
    rope_at,
    rope_cos_sin,
)

INIT_STD = 0.02


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


class LlamaAttention(nn.Module):
    """Multi-head attention with RoPE on q and k, and fewer K/V heads than query heads (GQA)."""

    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, heads, T, head_dim]`` of ``x``, with RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

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
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


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


class Llama(nn.Module):
    """Llama decoder with an optional explicit KV cache; state dict keys = LlamaForCausalLM's."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.build_rope_cache()
        self.apply(self._init_weights)

    # -- setup --

    def build_rope_cache(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent cos/sin buffers (also after building on 'meta')."""
        cfg = self.config
        cos, sin = rope_cos_sin(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling_factor
        )
        if device is None:  # beside the weights (on 'meta' while a loader builds the skeleton)
            device = self.model.embed_tokens.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self, module: nn.Module) -> None:
        # nn.Module.apply visits children first, so the residual projections are re-drawn last.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, (LlamaAttention, LlamaMLP)):
            proj = module.o_proj if isinstance(module, LlamaAttention) else module.down_proj
            std = INIT_STD / math.sqrt(2 * self.config.num_hidden_layers)
            nn.init.normal_(proj.weight, mean=0.0, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once (a tied lm_head adds nothing)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    @property
    def output_weight(self) -> torch.Tensor:
        """The [vocab, hidden] matrix that turns hidden states into logits."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

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

        With ``return_hidden=True`` also returns the residual stream: ``hidden[0]`` is the
        embedding output and ``hidden[i]`` the output of layer ``i`` (1-based, before the final
        norm) — the same as transformers' ``output_hidden_states`` for ``i < num_hidden_layers``.
        With ``last_only=True`` only the last position's logits are computed (``[B, 1, vocab]``):
        what a prefill needs, without a ``[T, vocab]`` product it would throw away.
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
        logits = F.linear(self.model.norm(x[:, -1:] if last_only else x), self.output_weight)
        return (logits, hidden) if return_hidden else logits
