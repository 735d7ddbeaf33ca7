"""Study 02 (PyTorch vs Core ML): the export ladder measured in PyTorch, roofline arithmetic, and
the published numbers it is compared with (labelled references, never measurements of ours).

* :func:`pytorch_ladder` runs the ladder's steps in PyTorch on this machine, with the very
  modules that ``labkit.export.coreml`` exports: (a) no cache (the whole window re-run per token),
  (b) the cache copied in and out of every step, (c) a preallocated cache written in place,
  (d) = (c) with int4 per-block-32 weights run by a real int4 kernel (torch's
  ``_weight_int4pack_mm_for_cpu``; the scales are coremltools' symmetric ones from
  ``labkit.quant.linear``). Decode tok/s per step.
* :data:`CHIPS`: memory bandwidth of Apple-silicon chips with the page each figure comes from.
* :func:`roofline_table`: bandwidth / weight bytes = the most tokens per second a memory-bound
  decode can reach (each token reads every weight once), for published configs.
* :func:`published` reads ``data/coreml/published.json``: Apple's Core ML ladder and
  llama.cpp discussion 4167 rows, each with its source.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.core.paths import data_dir

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

STUDY = "02_pytorch_vs_coreml"


# --- chips and the roofline ----------------------------------------------------------------------


@dataclass(frozen=True)
class Chip:
    name: str
    bandwidth_gbs: float  # unified-memory bandwidth, GB/s (10^9 bytes/s)
    source: str


_NEWS = "https://www.apple.com/newsroom/"
#: Apple-silicon memory bandwidth. Apple states GB/s for every chip here except the M1, whose
#: figure is derived from its memory (LPDDR4X-4266 on a 128-bit bus: 4266e6 * 16 B = 68.25 GB/s).
#: The Max figures are the top configuration's (binned M3 Max: 300 GB/s, M4 Max: 410 GB/s).
CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        Chip("M1", 68.25, "derived: LPDDR4X-4266 x 128-bit (Apple states no GB/s for M1)"),
        Chip("M1 Pro", 200.0, _NEWS + "2021/10/introducing-m1-pro-and-m1-max-the-most-powerful-chips-apple-has-ever-built/"),  # noqa: E501
        Chip("M1 Max", 400.0, _NEWS + "2021/10/introducing-m1-pro-and-m1-max-the-most-powerful-chips-apple-has-ever-built/"),  # noqa: E501
        Chip("M2", 100.0, _NEWS + "2022/06/apple-unveils-m2-with-breakthrough-performance-and-capabilities/"),  # noqa: E501
        Chip("M2 Pro", 200.0, _NEWS + "2023/01/apple-unveils-m2-pro-and-m2-max-next-generation-chips-for-next-level-workflows/"),  # noqa: E501
        Chip("M2 Max", 400.0, _NEWS + "2023/01/apple-unveils-m2-pro-and-m2-max-next-generation-chips-for-next-level-workflows/"),  # noqa: E501
        Chip("M2 Ultra", 800.0, _NEWS + "2023/06/apple-introduces-m2-ultra/"),
        Chip("M3", 100.0, _NEWS + "2023/10/apple-unveils-m3-m3-pro-and-m3-max-the-most-advanced-chips-for-a-personal-computer/"),  # noqa: E501
        Chip("M3 Pro", 150.0, _NEWS + "2023/10/apple-unveils-m3-m3-pro-and-m3-max-the-most-advanced-chips-for-a-personal-computer/"),  # noqa: E501
        Chip("M3 Max", 400.0, _NEWS + "2023/10/apple-unveils-m3-m3-pro-and-m3-max-the-most-advanced-chips-for-a-personal-computer/"),  # noqa: E501
        Chip("M4", 120.0, _NEWS + "2024/05/apple-introduces-m4-chip/"),
        Chip("M4 Pro", 273.0, _NEWS + "2024/10/apple-introduces-m4-pro-and-m4-max/"),
        Chip("M4 Max", 546.0, _NEWS + "2024/10/apple-introduces-m4-pro-and-m4-max/"),
    )
}

#: display name -> data/configs file stem (shapes only; the planner prices the bytes)
ROOFLINE_MODELS = {
    "Llama 2 7B": "meta-llama__Llama-2-7b-hf",
    "Phi-2": "microsoft__phi-2",
    "xLAM-1b": "Salesforce__xLAM-1b-fc-r",
}
#: fp16 as stored; int8 / int4 = llama.cpp Q8_0 / Q4_0 (scales included), priced by labkit.studies.will_it_fit
ROOFLINE_DTYPES = ("fp16", "int8", "int4")


def roofline_tok_s(weight_bytes: float, bandwidth_gbs: float) -> float:
    """Upper bound of decode tokens/s when every token reads all weights once: bandwidth / bytes."""
    if not weight_bytes > 0:
        raise ValueError(f"weight_bytes must be > 0, got {weight_bytes!r}")
    if not bandwidth_gbs > 0:
        raise ValueError(f"bandwidth_gbs must be > 0, got {bandwidth_gbs!r}")
    return bandwidth_gbs * 1e9 / weight_bytes


def roofline_table(
    chips: list[str] | None = None, models: dict[str, str] | None = None
) -> pd.DataFrame:
    """One row per (chip, model, dtype): bandwidth, weight bytes, upper-bound tok/s, source."""
    import pandas as pd

    from labkit.studies import will_it_fit as planner

    rows = []
    for chip_name in chips or list(CHIPS):
        if chip_name not in CHIPS:
            raise KeyError(f"unknown chip {chip_name!r}; known: {', '.join(CHIPS)}")
        chip = CHIPS[chip_name]
        for model, stem in (models or ROOFLINE_MODELS).items():
            cfg = planner.load_config(stem)
            for dtype in ROOFLINE_DTYPES:
                nbytes = planner.weights_bytes(cfg, dtype)
                rows.append(
                    dict(
                        chip=chip.name,
                        bandwidth_gbs=chip.bandwidth_gbs,
                        model=model,
                        dtype=dtype,
                        weight_bytes=nbytes,
                        roofline_tok_s=roofline_tok_s(nbytes, chip.bandwidth_gbs),
                        source=chip.source,
                    )
                )
    return pd.DataFrame(rows)


def published_path() -> Path:
    return data_dir() / "coreml" / "published.json"


def published() -> dict[str, Any]:
    """Published measurements (Apple's Core ML ladder, llama.cpp discussion 4167), with sources."""
    path = published_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (it ships with the repo)")
    return json.loads(path.read_text())


# --- the ladder in PyTorch -----------------------------------------------------------------------


class Int4Linear:
    """Factory of an int4 per-block-32 Linear with coremltools' symmetric scales, run by torch's
    CPU int4 kernel. Weight = q * s, q in [-7, 7] (stored as q + 8 in [1, 15]), zero point 0."""

    GROUP = 32

    @staticmethod
    def available() -> str | None:
        import torch

        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
        return None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> nn.Module:
        import numpy as np
        import torch
        from torch import nn

        from labkit.quant.linear import symmetric_quantize

        if linear.bias is not None:
            raise ValueError("Int4Linear: biased Linear layers are not supported")
        w16 = linear.weight.detach().to(torch.float16).numpy()
        q, scale = symmetric_quantize(w16, 4, cls.GROUP)
        q_t = torch.from_numpy(q.astype(np.int32) + 8)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_t, 1)
        s = torch.from_numpy(scale.astype(np.float32))  # [out, in/32]
        scales_zeros = torch.stack([s, torch.zeros_like(s)], -1).transpose(0, 1).contiguous()

        class _Int4(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("packed", packed)
                self.register_buffer("scales_zeros", scales_zeros)
                self.out_features = linear.out_features

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                shape = x.shape
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x.reshape(-1, shape[-1]), self.packed, cls.GROUP, self.scales_zeros
                )
                return y.reshape(*shape[:-1], self.out_features)

        return _Int4()


def int4_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose decoder-layer Linears run int4 per-block-32 (embedding and the
    tied output stay fp32, as the ladder compares weight formats of the layers)."""
    from torch import nn

    m = copy.deepcopy(model)
    for layer in m.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int4Linear.from_linear(child))
    return m


def _decode_loop(step: Callable[[int, int], Any], prompt: list[int], n_new: int) -> float:
    """Feed the prompt token by token, then time ``n_new`` greedy steps; returns tok/s."""
    import torch

    for pos, tok in enumerate(prompt):
        logits = step(tok, pos)
    tok = int(torch.argmax(logits.reshape(-1, logits.shape[-1])[-1]))
    t0 = time.perf_counter()
    for i in range(n_new):
        logits = step(tok, len(prompt) + i)
        tok = int(torch.argmax(logits.reshape(-1, logits.shape[-1])[-1]))
    return n_new / (time.perf_counter() - t0)


def ladder_steps(model: nn.Module, max_len: int) -> dict[str, Callable[[int, int], Any]]:
    """step name -> ``step(token, position) -> logits`` for the PyTorch ladder (fp32 eager)."""
    import torch

    from labkit.export import coreml as cx

    model = model.float().eval()
    cfg = model.config
    io = cx.step_module(model, "b", max_len)
    st = cx.step_module(model, "c", max_len)
    shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, max_len, cfg.head_dim)
    io_cache = {"k": torch.zeros(shape), "v": torch.zeros(shape)}
    window: list[int] = []

    def no_cache(tok: int, pos: int):
        del window[pos:]
        window.append(tok)
        return model(torch.tensor([window]))[:, -1]

    def _inputs(tok: int, pos: int):
        ids = torch.tensor([[tok]], dtype=torch.int32)
        return ids, torch.tensor([pos], dtype=torch.int32), torch.from_numpy(cx.decode_mask(pos, max_len))

    def io_step(tok: int, pos: int):
        logits, io_cache["k"], io_cache["v"] = io(*_inputs(tok, pos), io_cache["k"], io_cache["v"])
        return logits

    steps = {
        "a": no_cache,
        "b": io_step,
        "c": lambda tok, pos: st(*_inputs(tok, pos)),
    }
    if Int4Linear.available() is None:
        st4 = cx.step_module(int4_model(model), "c", max_len)
        steps["d"] = lambda tok, pos: st4(*_inputs(tok, pos))
    return steps


#: the PyTorch ladder's steps, in the words of the notebook
PYTORCH_STEPS = {
    "a": "no cache (window re-run)",
    "b": "cache copied in and out",
    "c": "preallocated, in place",
    "d": "in place + int4 weights",
}


def pytorch_ladder(
    model: nn.Module, prompt: list[int], n_new: int, repeats: int = 1
) -> dict[str, list[float]]:
    """Decode tok/s of each PyTorch ladder step (``repeats`` runs each), on the CPU, fp32.

    The cache holds ``len(prompt) + n_new`` positions, so every step attends over the same span.
    """
    import torch

    if n_new < 1 or not prompt:
        raise ValueError(f"need a non-empty prompt and n_new >= 1, got {len(prompt)}, {n_new}")
    max_len = len(prompt) + n_new + 1
    steps = ladder_steps(model, max_len)
    out: dict[str, list[float]] = {}
    with torch.inference_mode():
        for name, step in steps.items():
            out[name] = [_decode_loop(step, prompt, n_new) for _ in range(repeats)]
    return out


def first_layers(model: nn.Module, n: int | None) -> nn.Module:
    """A copy of ``model`` keeping its first ``n`` decoder layers (None: the model itself).

    Quick runs and tests convert such a slice: real weights and the same per-layer shapes, a
    fraction of the conversion time. (Its outputs are not the full model's: it is a smaller model.)
    """
    import dataclasses

    if n is None:
        return model
    total = model.config.num_hidden_layers
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total:
        raise ValueError(f"layers must be an int in 1..{total} or None, got {n!r}")
    m = copy.deepcopy(model)
    m.model.layers = m.model.layers[:n]
    m.config = dataclasses.replace(model.config, num_hidden_layers=n)
    return m
