"""A fast decode loop for labkit's Llama: the per-token overhead of a Python decoder, cut down.

A separate, tested variant beside the readable model (which stays the reference: same logits
within ``tolerances.SAME_MATH``, same greedy tokens; tests/test_fast_decode.py). Prefill runs
the readable model into a ``KVCache``; each decode step then runs as a plain function over the
layer weights, continuing in the same cache. Each lever is an option, so a study can measure
the ladder one rung at a time:

* ``fuse``: q, k, v in one matrix-vector product, gate and up in another (5 weight reads per
  layer instead of 7 calls: fewer kernel launches, the same bytes);
* ``transpose``: weights stored ``[in, out]`` and applied as ``x @ W`` instead of nn.Linear's
  ``[out, in]``: for one token per row, a BLAS reads the ``[in, out]`` layout as a GEMV over
  contiguous rows of ``x``'s width, which on x86 MKL streams much closer to the memory
  bandwidth than the transposed call ``F.linear`` makes;
* ``attention="matmul"``: one query token's attention as two small batched products
  (``q K^T``, softmax, ``p V``) instead of SDPA, whose CPU flash kernel has a large fixed cost
  per call for a single query;
* ``greedy(static=True)``: the step over a fixed-size ``StaticCache`` with the position as a
  tensor, so one graph serves every step (what torch.compile's ``mode="reduce-overhead"`` turns
  into a replayed CUDA graph: no Python and no host sync per token).

The fused and transposed copies cost memory (those weights exist twice while the decoder lives);
bytes read per token are unchanged. Every dtype the model has (fp32, fp16, bf16) works: norms
upcast to fp32 as the readable RMSNorm does, and RoPE tables are cast to the activations' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from labkit.core.checks import positive_int
from labkit.inference.export_cache import StaticCache
from labkit.inference.generate import check_generation
from labkit.inference.kv_cache import KVCache
from labkit.models.layers import Cache, apply_rope, causal_attention
from labkit.models.llama import Llama

ATTENTION = ("sdpa", "matmul")


@dataclass
class _Proj:
    """One projection, stored as the decoder applies it: ``[out, in]`` through F.linear, or
    ``[in, out]`` through a matrix product (``transposed``)."""

    w: torch.Tensor
    b: torch.Tensor | None
    transposed: bool

    @classmethod
    def of(cls, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
           transposed: bool) -> _Proj:
        """Several Linears stacked along their outputs (one product for all), laid out once."""
        w = torch.cat([t.detach() for t in weights]) if len(weights) > 1 else weights[0].detach()
        present = [b for b in biases if b is not None]
        b = torch.cat([t.detach() for t in present]) if present else None
        return cls(w.t().contiguous() if transposed else w.contiguous(), b, transposed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.w, self.b)
        return torch.addmm(self.b, x, self.w) if self.b is not None else x @ self.w


def _layer_projections(block: Any, fuse: bool, transpose: bool) -> dict[str, list[_Proj]]:
    """The five (fused) or seven projections of one block, in the order a step applies them."""
    a, m = block.self_attn, block.mlp

    def group(*lins):
        if fuse:
            return [_Proj.of([x.weight for x in lins], [x.bias for x in lins], transpose)]
        return [_Proj.of([x.weight], [x.bias], transpose) for x in lins]

    return {"qkv": group(a.q_proj, a.k_proj, a.v_proj), "o": group(a.o_proj),
            "gate_up": group(m.gate_proj, m.up_proj), "down": group(m.down_proj)}


class FastDecoder:
    """Greedy decoding of labkit's ``Llama`` with the per-token overhead cut down (see the
    module docstring for the levers: ``fuse``, ``transpose``, ``attention``, static steps)."""

    def __init__(self, model: Any, *, fuse: bool = True, transpose: bool = False,
                 attention: str = "sdpa") -> None:
        if not isinstance(model, Llama):
            raise TypeError(f"FastDecoder needs labkit's Llama, got {type(model).__name__}")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.fuse, self.transpose, self.attention = fuse, transpose, attention
        self.n_heads, self.n_kv, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                  cfg.head_dim)
        self.eps = cfg.rms_norm_eps
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.inter = cfg.intermediate_size
        with torch.no_grad():
            self.norms = [(b.input_layernorm.weight.detach(), b.post_attention_layernorm.weight.detach())
                          for b in model.model.layers]
            self.projs = [_layer_projections(b, fuse, transpose) for b in model.model.layers]
            self.embed = model.model.embed_tokens.weight.detach()
            self.final_norm = model.model.norm.weight.detach()
            self.out = _Proj.of([model.output_weight], [None], transpose)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """RMSNorm in fp32, cast back before the weight multiply (as labkit's RMSNorm)."""
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v ``[B, size]`` of layer ``i``: one fused product, or three."""
        p = self.projs[i]["qkv"]
        if len(p) == 1:
            return p[0](h).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        return tuple(proj(h) for proj in p)

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU of layer ``i``: down(silu(gate(h)) * up(h)), gate/up fused or not."""
        p = self.projs[i]
        if len(p["gate_up"]) == 1:
            gate, up = p["gate_up"][0](h).split(self.inter, dim=-1)
        else:
            gate, up = (proj(h) for proj in p["gate_up"])
        return p["down"][0](F.silu(gate) * up)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """One query per row: ``[B, H, 1, d]`` against ``[B, H_kv, S, d]`` -> ``[B, H * d]``."""
        b = q.shape[0]
        if self.attention == "sdpa":
            return causal_attention(q, k, v, mask).view(b, self.q_size)
        group = self.n_heads // self.n_kv  # query heads sharing one KV head, batched together
        qg = q.view(b, self.n_kv, group, self.head_dim)
        scores = (qg @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # [B, Hkv, g, S]
        if mask is not None:  # [B|1, 1, 1, S]: True = attend, or an additive float mask
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
                else scores + mask
        return (torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v).reshape(b, self.q_size)

    def step(self, token: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Logits ``[B, vocab]`` for one new token per row (``token`` is ``[B]``), reading and
        extending ``cache`` (any ``labkit.models.layers.Cache``: the ``KVCache`` prefill
        filled, or a ``StaticCache`` over its buffers for a static-shape compiled step)."""
        b, d = token.shape[0], self.head_dim
        cos, sin = self.model.rope(cache.positions(1))
        mask = cache.mask(1)
        x = F.embedding(token, self.embed)  # [B, H]
        for i, (attn_norm, mlp_norm) in enumerate(self.norms):
            q, k, v = self._qkv(i, self._rms(x, attn_norm))
            q = apply_rope(q.view(b, self.n_heads, 1, d), cos, sin)
            k = apply_rope(k.view(b, self.n_kv, 1, d), cos, sin)
            keys, values = cache.update(i, k, v.view(b, self.n_kv, 1, d))
            x = x + self.projs[i]["o"][0](self._attend(q, keys, values, mask))
            x = x + self._mlp(i, self._rms(x, mlp_norm))
        cache.advance(1)
        return self.out(self._rms(x, self.final_norm))

    def static_step(self, token: torch.Tensor, pos: torch.Tensor, kv: KVCache) -> torch.Tensor:
        """``step`` with static shapes: attention over all ``max_len`` slots of ``kv``, masked
        beyond ``pos`` (a 0-d tensor, not a Python int), so torch.compile builds one graph."""
        max_len = kv.k[0].shape[2]
        mask = (torch.arange(max_len, device=token.device) <= pos).view(1, 1, 1, max_len)
        return self.step(token, StaticCache(kv.k, kv.v, pos.view(1), mask))

    def greedy(
        self, input_ids: torch.Tensor, max_new_tokens: int, *, cache: Any | None = None,
        return_logits: bool = False, static: bool = False,
        step_fn: Callable[..., torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill with the readable model, then one step per token. Returns ``(tokens [B, T+n],
        logits [B, n, V] or None)``: the same tokens as ``labkit.inference.generate.greedy``.

        ``static=True`` decodes with ``static_step`` (or ``step_fn(token, pos, kv)``, e.g. its
        compiled form), the position a device tensor: no host sync per token.
        """
        positive_int(max_new_tokens, "max_new_tokens", "FastDecoder.greedy")
        check_generation(self.model, input_ids, max_new_tokens)
        b, t = input_ids.shape
        device = input_ids.device
        with torch.inference_mode():
            kv = cache if cache is not None else KVCache.for_model(
                self.model, max_len=t + max_new_tokens, batch=b)
            kv.reset()
            out = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=device)
            out[:, :t] = input_ids
            logits_out = (torch.empty(b, max_new_tokens, self.cfg.vocab_size, device=device,
                                      dtype=self.embed.dtype) if return_logits else None)
            logits = self.model(input_ids, cache=kv)[:, -1]
            run = step_fn or self.static_step
            # static: the step's inputs are the same tensors every token (a compiled graph
            # guards on them; a view into ``out`` would move its offset each step)
            pos = torch.tensor(t, device=device) if static else None
            token = torch.empty(b, dtype=torch.long, device=device) if static else None
            for step in range(max_new_tokens):
                if step and static:
                    token.copy_(out[:, t + step - 1])
                    logits = run(token, pos, kv)
                    pos += 1
                elif step:
                    logits = self.step(out[:, t + step - 1], kv)
                if logits_out is not None:
                    logits_out[:, step] = logits
                out[:, t + step] = logits.argmax(-1)
        return out, logits_out
