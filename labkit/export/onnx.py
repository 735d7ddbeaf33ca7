"""Export labkit's Llama to ONNX with an explicit attention mask and a KV cache as inputs/outputs.

The graph: ``logits, present.* = f(input_ids [B, T], attention_mask [B, P+T], past.* [B, Hkv, P, d])``
where ``P`` past positions are already cached (0 at prefill). Why each piece:

* an explicit ``attention_mask`` (1 = real token, 0 = padding) instead of ``is_causal``: ONNX has
  no notion of a cache offset, so the causal rule "query i sees keys <= P + i" and padding are
  both written out as one boolean mask;
* positions come from the mask (``cumsum - 1``), so a left-padded batch gets the right RoPE angles;
* the example batch has 2 rows and the example past 3 positions: an exporter specializes a
  dimension of size 1 (or 0) to a constant, so the examples must not use those sizes for the
  dimensions that must stay dynamic (batch, new tokens, past).
* K/V heads are repeated explicitly for grouped-query attention (no ``enable_gqa`` in ONNX).

The wrapper runs the model's own forward with a ``labkit.inference.export_cache.PastKVCache``
(tests/test_runtimes.py compares ONNX Runtime's logits with torch's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from labkit.core.checks import output_path, positive_int
from labkit.core.files import atomic_path
from labkit.inference.export_cache import PastKVCache
from labkit.models.layers import explicit_gqa
from labkit.models.llama import Llama


class OnnxLlama(nn.Module):
    """labkit's Llama as a pure function of (ids, mask, past K/V) -> (logits, present K/V)."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        if not isinstance(model, Llama):
            raise TypeError(f"OnnxLlama needs labkit's Llama, got {type(model).__name__}")
        self.model = model
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        b, t = input_ids.shape
        s = attention_mask.shape[1]  # past + new positions
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, s - t :]  # [B, T]
        query_pos = torch.arange(t, device=input_ids.device) + (s - t)
        causal = torch.arange(s, device=input_ids.device)[None, :] <= query_pos[:, None]  # [T, S]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
        cache = PastKVCache(past[0::2], past[1::2], positions[:, None, :], mask)
        with explicit_gqa():  # no enable_gqa in ONNX
            logits = self.model(input_ids, cache=cache)
        presents = [t for kv in zip(cache.present_k, cache.present_v, strict=True) for t in kv]
        return (logits, *presents)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the exported graph."""
    past = [f"past.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


def example_inputs(model: Llama, batch: int = 2, new: int = 5, past: int = 3) -> tuple[torch.Tensor, ...]:
    """Example arguments whose dynamic dimensions are all >= 2 (see the module docstring)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, new), generator=g)
    mask = torch.ones(batch, past + new, dtype=torch.int64)
    kv = [torch.zeros(batch, cfg.num_key_value_heads, past, cfg.head_dim)
          for _ in range(2 * cfg.num_hidden_layers)]
    return (ids, mask, *kv)


def export_onnx(model: Llama, out_path: str | os.PathLike[str], opset: int = 18) -> Path:
    """Write ``model`` (float32) as an ONNX file with dynamic batch, new-token and past lengths.

    Uses torch.onnx's TorchScript exporter with ``dynamic_axes`` (it keeps the relation
    "mask length = past + new" symbolic without a constraint solver). Written to a temporary
    file, then renamed: a failed export leaves no file (and an earlier one as it was).
    """
    if not isinstance(model, Llama):
        raise TypeError(f"export_onnx needs labkit's Llama, got {type(model).__name__}")
    out = output_path(out_path, "out_path", "export_onnx")
    positive_int(opset, "opset", "export_onnx")
    wrapper = OnnxLlama(model.float().eval())
    inputs, outputs = io_names(wrapper.n_layers)
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "new"},
                                       "attention_mask": {0: "batch", 1: "total"},
                                       "logits": {0: "batch", 1: "new"}}
    for name in inputs[2:]:
        axes[name] = {0: "batch", 2: "past"}
    for name in outputs[1:]:
        axes[name] = {0: "batch", 2: "total"}
    with atomic_path(out) as tmp, torch.no_grad():
        torch.onnx.export(
            wrapper, example_inputs(model), str(tmp), input_names=inputs, output_names=outputs,
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )
    return out


def load_for_export(model_dir: str | os.PathLike[str]) -> Any:
    """labkit's Llama from a model folder, float32 on the CPU (what export_onnx expects)."""
    from labkit.models import load

    return load(Path(model_dir), device="cpu", dtype="float32").model
