"""Study 02 (PyTorch vs Core ML): the export ladder converted, read back, measured in PyTorch,
and set against the roofline and the published numbers (labelled references, never ours).

The notebook's parts, each a function here:

1. :func:`conversion_probes`: which ways into coremltools work (``labkit.export.coreml``'s probes).
2. :func:`conversion_table` / :func:`record_conversions` / :func:`plot_package_sizes`: the ladder's
   packages (conversion time, size, op counts).
3. :func:`read_back`: every weight read back out of each saved package must equal what
   coremltools' compressors produce (:func:`compressor_weight`); our Llama on the read-back
   weights gives the logits error against fp32.
4. :func:`pytorch_ladder` runs the ladder's steps in PyTorch on this machine, with the very
   modules that ``labkit.export.coreml`` exports: (a) no cache (the whole window re-run per token),
   (b) the cache copied in and out of every step, (c) a preallocated cache written in place,
   (d) = (c) with int4 per-block-32 weights run by a real int4 kernel (torch's
   ``_weight_int4pack_mm_for_cpu``; the scales are coremltools' symmetric ones from
   ``labkit.quant.linear``). :func:`ladder_table` sets it beside Apple's published ladder.
5. :func:`coreml_speeds`: TTFT and decode tok/s per Core ML compute unit (macOS only).
6. :func:`roofline_table`: a chip's bandwidth (``labkit.core.chips``) / weight bytes
   (``labkit.quant.footprint``) = the most tokens per second a memory-bound decode can reach
   (each token reads every weight once), beside llama.cpp's published decode speeds.
7. :func:`ane_comparison`: step (f), the Neural Engine layout, against (c).

:func:`published` reads ``data/coreml/published.json``: Apple's Core ML ladder and llama.cpp
discussion 4167 rows, each with its source.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.core import chips, results
from labkit.core.paths import build_dir, configs_dir, data_dir

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch
    from matplotlib.figure import Figure
    from torch import nn

    from labkit.export.coreml import Export
    from labkit.models.loader import LoadedModel

STUDY = "02_pytorch_vs_coreml"


def _no_progress(items: Iterable[Any], **_: Any) -> Iterable[Any]:
    return items


#: torch's own deprecation notice, raised inside torch.export for every package converted.
_LEAFSPEC_NOTICE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def quiet_coremltools() -> None:
    """Keep coremltools' import-time notices out of the notebook (call before importing it).

    On import coremltools logs that this scikit-learn and torch are newer than it was tested
    with, and on Linux that its compiled prediction proxies are missing (Core ML predicts only
    on macOS, which part 5 reports as a skip). Its warnings, and torch.export's LeafSpec
    deprecation notice raised for every conversion, say nothing about the study. Errors stay.
    """
    import logging
    import warnings

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="coremltools")
    warnings.filterwarnings("ignore", message=_LEAFSPEC_NOTICE, category=FutureWarning)


@contextlib.contextmanager
def _expected_failures():
    """Around a probe that is expected to fail: its error is the probe's result (a table row),
    so coremltools' own error log and torch.jit's tracer warnings would only repeat it."""
    import logging
    import warnings

    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


# --- the model and its slices --------------------------------------------------------------------


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


@dataclass
class LadderModel:
    """What the notebook converts: the loaded model, the slice it exports, where packages go."""

    loaded: LoadedModel
    full: nn.Module  # the whole model, fp32 (the probes take their own slice of it)
    model: nn.Module  # its first ``layers`` layers (the whole model when layers is None)
    name: str  # the card's name, "[:N layers]" for a slice
    out: Path  # build/coreml/<name>: the .mlpackage folders

    def summary(self, coremltools_version: str) -> str:
        """Parameters, layers, vocabulary and versions, where packages go, the load average."""
        import platform

        import torch

        cfg = self.model.config
        n = sum(p.numel() for p in self.model.parameters())
        return (
            f"{self.name}: {n / 1e6:.1f} M parameters, {cfg.num_hidden_layers} layers, vocab "
            f"{cfg.vocab_size}; coremltools {coremltools_version}, torch {torch.__version__}, "
            f"{platform.system()} {platform.machine()}\npackages go to {self.out}; load average "
            f"(1 min) {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )


def load_ladder_model(name: str, layers: int | None) -> LadderModel:
    """``name`` loaded on the CPU in fp32, sliced to its first ``layers`` layers for export."""
    from labkit.models import load

    loaded = load(name, device="cpu")
    full = loaded.model.float().eval()
    model_name = loaded.card["name"] + ("" if layers is None else f"[:{layers} layers]")
    out = build_dir() / "coreml" / model_name.replace("/", "_").replace(":", "_")
    return LadderModel(loaded, full, first_layers(full, layers), model_name, out)


def fp16_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters in fp16: what an uncompressed package must hold."""
    return 2 * sum(p.numel() for p in model.parameters())


# --- 1-2: what converts, and the converted ladder ------------------------------------------------


def conversion_probes(full: nn.Module, probe_layers: int) -> pd.DataFrame:
    """One row per way into coremltools and what it gave ("ok" or the error it hit).

    The probes need only shapes, so they run on a ``probe_layers``-layer slice of ``full``.
    """
    import pandas as pd

    from labkit.export import coreml as cx

    probe_model = first_layers(full, probe_layers)
    with _expected_failures():
        traced, flexible = cx.probe_jit_trace(probe_model), cx.probe_flexible_query(probe_model, 16)
    return pd.DataFrame([
        {"path": "torch.jit.trace -> ct.convert (step a)", "result": traced},
        {"path": "torch.export, flexible query length (step c)", "result": flexible},
        {"path": "torch.export, fixed query length (steps a-f)", "result": "ok (part 2)"},
    ])


def _op_summary(ops: dict[str, int]) -> dict[str, int]:
    """The op counts the table shows: program ops, compressed constants, state r/w, SDPA."""
    return {
        "ops (non-const)": sum(v for k, v in ops.items() if not k.startswith("const")),
        "constexpr": sum(v for k, v in ops.items() if k.startswith("constexpr_")),
        "state r/w": ops.get("read_state", 0) + ops.get("coreml_update_state", 0),
        "sdpa": ops.get("scaled_dot_product_attention", 0),
    }


def conversion_table(exports: dict[str, Export]) -> pd.DataFrame:
    """One row per converted step: compression, package MB, export and convert seconds, ops."""
    import pandas as pd

    from labkit.export import coreml as cx

    rows = [
        {"step": s, "what": cx.STEPS[s], "compression": e.compression,
         "package_MB": e.package_bytes / 1e6, "export_s": e.export_seconds,
         "convert_s": e.convert_seconds, **_op_summary(e.op_counts)}
        for s, e in exports.items()
    ]
    return pd.DataFrame(rows).set_index("step")


def record_conversions(exports: dict[str, Export], model_name: str, max_len: int, layers: int) -> None:
    """Package bytes and conversion seconds of every step (runtime "coremltools")."""
    for s, e in exports.items():
        params = {"step": s, "compression": e.compression, "max_len": max_len, "layers": layers}
        for metric, value, unit in (("package_bytes", e.package_bytes, "B"),
                                    ("convert_seconds", e.convert_seconds, "s")):
            results.record(STUDY, metric, value, unit, runtime="coremltools", model=model_name,
                           params=params)


#: bar colour of each compression in the package-size figure
COMPRESSION_COLORS = {"none": "#888888", "int4-block32": "#1f77b4", "lut4": "#ff7f0e"}


def plot_package_sizes(conv: pd.DataFrame, fp16_param_bytes: int, model_name: str) -> Figure:
    """Package size on disk per step, coloured by compression, against the fp16 parameters."""
    from labkit.core import plotting
    from labkit.export import coreml as cx

    fig, ax = plotting.new_figure(figsize=(7, 3.6))
    ax.bar([f"({s}) {cx.STEPS[s]}" for s in conv.index], conv.package_MB * 1e6,
           color=[COMPRESSION_COLORS[c] for c in conv.compression])
    ax.axhline(fp16_param_bytes, ls="--", color="k", lw=1, label="fp16 parameters")
    plotting.set_bytes_axis(ax.yaxis)
    ax.set_ylabel("package size on disk (bytes)")
    ax.set_xlabel("ladder step")
    ax.set_title(f"Core ML package size by step and compression ({model_name})")
    ax.tick_params(axis="x", rotation=20)
    ax.legend()
    return fig


# --- 3: what the packages compute ----------------------------------------------------------------


def compressor_weight(w16: np.ndarray, compression: str) -> np.ndarray:
    """The dense weight coremltools' own compressor makes of the fp16 weight ``w16``.

    "int4-block32": ``linear_quantize_weights``' blockwise int4 (symmetric, blocks of 32 along
    the input axis), dequantized; "lut4": ``palettize_weights``' 4-bit k-means table per tensor,
    looked up; "none" and vectors (norms stay fp16): ``w16`` itself.
    """
    import numpy as np

    if compression == "none" or w16.ndim == 1:
        return w16
    from coremltools.optimize import _utils as ct_utils
    from coremltools.optimize.coreml import _quantization_passes as passes

    if compression == "int4-block32":
        r = passes.linear_quantize_weights.blockwise_compress(
            w16, nbits=4, mode="LINEAR_SYMMETRIC", signed=True, block_sizes=[1, 32])
        return ct_utils.dequantize_by_scale_and_zp(r.data, r.scale, None)
    if compression == "lut4":
        r = passes.palettize_weights.blockwise_compress(w16, mode="KMEANS", nbits=4, block_sizes=[0, 0])
        return np.asarray(r.lut).reshape(-1)[np.asarray(r.indices)].reshape(w16.shape)
    raise ValueError(f"compression must be 'none', 'int4-block32' or 'lut4', got {compression!r}")


def package_weights(model: nn.Module, e: Export) -> tuple[dict[str, np.ndarray], bool]:
    """(every weight read back from ``e``'s package, in the model's shapes; whether each equals
    :func:`compressor_weight`, and int4 weights also labkit.quant's ``coreml-int4-block32``)."""
    import numpy as np

    from labkit.export import coreml as cx
    from labkit.quant.ops import fake_quantize

    orig16 = {k: p.detach().half().numpy() for k, p in model.named_parameters()}
    w = cx.read_weights(e.path, list(orig16))
    if sorted(w) != sorted(orig16):
        raise KeyError(f"step {e.step}: weights missing from the package")
    checks = []
    for k, v in orig16.items():
        if w[k].shape != v.shape and w[k].size == v.size:  # (f) stores conv shapes [out, in, 1, 1]
            w[k] = w[k].reshape(v.shape)
        if e.compression == "int4-block32" and v.ndim > 1:
            checks.append(np.array_equal(w[k].astype(np.float32), fake_quantize(v, "coreml-int4-block32")))
        checks.append(np.array_equal(w[k], compressor_weight(v, e.compression)))
    return w, all(checks)


@dataclass
class ReadBack:
    """Part 3's results: the error table, which packages equal their compressor, the logit std."""

    errors: pd.DataFrame  # index (step, compression); columns float16, float32, top-1, exact
    exact: dict[str, bool]
    logit_std: float  # std of the fp32 logits on the same text: the scale of the errors


def read_back(
    model: nn.Module, exports: dict[str, Export], ids: torch.Tensor, model_name: str,
    progress: Callable = _no_progress,
) -> ReadBack:
    """Read every package back, check its weights, and run our Llama on them in fp32 and fp16:
    max |logit error| against the fp32 model (recorded) and top-1 agreement, per step."""
    import pandas as pd
    import torch

    from labkit.export import coreml as cx

    rows, exact = [], {}
    for s, e in progress(exports.items(), desc="read back"):
        w, exact[s] = package_weights(model, e)
        rb = cx.readback_model(model, w)
        for compute in (torch.float32, torch.float16):
            err = cx.logits_error(model, rb, ids, compute)
            name = str(compute).removeprefix("torch.")
            rows.append({"step": s, "compression": e.compression, "compute": name,
                         "max_abs_logit_err": err,
                         "top1_agreement": cx.top1_agreement(model, rb, ids, compute)})
            results.record(STUDY, "readback_max_abs_logit_err", err, "1", runtime="coremltools-readback",
                           model=model_name, params={"step": s, "compression": e.compression,
                                                     "compute": name, "tokens": ids.shape[1]})
    df = pd.DataFrame(rows)
    errs = df.pivot(index=["step", "compression"], columns="compute", values="max_abs_logit_err")
    fp16 = df[df.compute == "float16"].set_index(["step", "compression"])
    errs["top-1 agreement (fp16 compute)"] = fp16.top1_agreement
    errs["read-back == compressor"] = [exact[s] for s, _ in errs.index]
    with torch.no_grad():
        logit_std = float(model(ids).std())
    return ReadBack(errs, exact, logit_std)


# --- 4: the ladder in PyTorch --------------------------------------------------------------------


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


def record_ladder(
    ladder: dict[str, list[float]], model_name: str, prompt: list[int], n_new: int, threads: int
) -> None:
    """The median decode tok/s of each PyTorch step, with the load it ran under."""
    import numpy as np

    for s, runs in ladder.items():
        results.record(STUDY, "ladder_tok_s", float(np.median(runs)), "tok/s", runtime="torch-eager",
                       device="cpu", model=model_name,
                       params={"step": s, "compute_unit": "cpu", "threads": threads,
                               "prompt": len(prompt), "new_tokens": n_new,
                               "load_avg_1m": round(os.getloadavg()[0], 2),
                               "max_len": len(prompt) + n_new + 1, "repeats": len(runs)})


#: the column of Apple's published ladder in :func:`ladder_table`
APPLE = "Apple M1 Max, Llama 3.1 8B (published)"


def ladder_table(ladder: dict[str, list[float]], apple: dict[str, Any]) -> pd.DataFrame:
    """Median tok/s per step here beside Apple's published ladder, and each step's gain."""
    import numpy as np
    import pandas as pd

    lad = pd.DataFrame([
        {"step": s, "what": PYTORCH_STEPS[s], "tok_s": float(np.median(runs)), "runs": len(runs)}
        for s, runs in ladder.items()
    ]).set_index("step")
    lad[APPLE] = [apple["steps"][s]["tok_s"] for s in lad.index]
    lad["gain vs previous (here)"] = lad.tok_s / lad.tok_s.shift(1)
    lad["gain vs previous (Apple)"] = lad[APPLE] / lad[APPLE].shift(1)
    return lad


def plot_ladder(lad: pd.DataFrame, model_name: str) -> Figure:
    """Two panels on log axes: the ladder measured here, and Apple's published one."""
    import numpy as np

    from labkit.core import plotting

    fig, axes = plotting.new_figure(1, 2, figsize=(11, 4.2))
    x = np.arange(len(lad))
    labels = [f"({s}) {PYTORCH_STEPS[s]}" for s in lad.index]
    axes[0].bar(x, lad.tok_s, color="#1f77b4")
    axes[0].set_title(f"Measured here: PyTorch eager, CPU ({model_name})")
    axes[1].bar(x, lad[APPLE], color="#aaaaaa", hatch="//")
    axes[1].set_title("Published (Apple): Core ML,\nM1 Max, Llama 3.1 8B")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xticks(x, labels, rotation=25, ha="right")
        ax.set_ylabel("decode tokens/s (log)")
        ax.set_xlabel("ladder step")
    fig.suptitle("The export ladder: each step's decode speed")
    return fig


# --- 5: Core ML per compute unit (macOS) ---------------------------------------------------------


def coreml_speeds(
    exports: dict[str, Export], prompt: list[int], n_new: int, max_len: int,
    units: list[str], repeats: int, model_name: str, progress: Callable = _no_progress,
) -> pd.DataFrame:
    """Median TTFT and decode tok/s of every package on every compute unit (recorded); macOS.

    A step this Mac cannot run (the stateful ones before macOS 15) is left out and named in
    ``df.attrs["skipped"]`` (step -> why), so macOS 14 still measures the stateless steps."""
    import numpy as np
    import pandas as pd

    from labkit.export import coreml as cx

    rows, skipped = [], {}
    for s, e in exports.items():
        why = cx.coreml_unavailable(s)
        if why:
            skipped[s] = why
            continue
        for unit in progress(units, desc=f"step {s}"):
            runs = [cx.coreml_generate(e.path, s, prompt, n_new, max_len, unit) for _ in range(repeats)]
            ttft = float(np.median([r.ttft_s for r in runs]))
            tps = float(np.median([r.decode_tok_s for r in runs]))
            rows.append({"step": s, "compute_unit": unit, "ttft_s": ttft, "decode_tok_s": tps})
            p = {"step": s, "compute_unit": unit, "compression": e.compression, "prompt": len(prompt)}
            results.record(STUDY, "ladder_tok_s", tps, "tok/s", runtime="coreml", device=unit,
                           model=model_name, params=p)
            results.record(STUDY, "ttft_seconds", ttft, "s", runtime="coreml", device=unit,
                           model=model_name, params=p)
    df = pd.DataFrame(rows, columns=["step", "compute_unit", "ttft_s", "decode_tok_s"])
    df.attrs["skipped"] = skipped
    return df


# --- 6: the roofline -----------------------------------------------------------------------------

#: display name -> data/configs file stem (shapes only; labkit.quant.footprint prices the bytes)
ROOFLINE_MODELS = {
    "Llama 2 7B": "meta-llama__Llama-2-7b-hf",
    "Phi-2": "microsoft__phi-2",
    "xLAM-1b": "Salesforce__xLAM-1b-fc-r",
}
#: fp16 as stored; int8 / int4 = llama.cpp Q8_0 / Q4_0 (scales included)
ROOFLINE_DTYPES = ("fp16", "int8", "int4")


def roofline_tok_s(weight_bytes: float, bandwidth_gbs: float) -> float:
    """Upper bound of decode tokens/s when every token reads all weights once: bandwidth / bytes."""
    if not weight_bytes > 0:
        raise ValueError(f"weight_bytes must be > 0, got {weight_bytes!r}")
    if not bandwidth_gbs > 0:
        raise ValueError(f"bandwidth_gbs must be > 0, got {bandwidth_gbs!r}")
    return bandwidth_gbs * 1e9 / weight_bytes


def roofline_table(
    chip_names: list[str] | None = None, models: dict[str, str] | None = None
) -> pd.DataFrame:
    """One row per (chip, model, dtype): bandwidth, weight bytes, upper-bound tok/s, source."""
    import pandas as pd

    from labkit.models.config import read_config
    from labkit.quant.footprint import weights_bytes

    rows = []
    for chip in [chips.chip(name) for name in chip_names or list(chips.CHIPS)]:
        for model, stem in (models or ROOFLINE_MODELS).items():
            cfg = read_config(configs_dir() / f"{stem}.json")
            for dtype in ROOFLINE_DTYPES:
                nbytes = weights_bytes(cfg, dtype)
                rows.append(dict(chip=chip.name, bandwidth_gbs=chip.bandwidth_gbs, model=model,
                                 dtype=dtype, weight_bytes=nbytes,
                                 roofline_tok_s=roofline_tok_s(nbytes, chip.bandwidth_gbs),
                                 source=chip.source))
    return pd.DataFrame(rows)


def record_roofline(roof: pd.DataFrame) -> None:
    """Every roofline row as a record (runtime "roofline", device = the chip)."""
    for r in roof.itertuples():
        results.record(STUDY, "roofline_tok_s", r.roofline_tok_s, "tok/s", runtime="roofline",
                       device=r.chip, model=r.model,
                       params={"chip": r.chip, "model": r.model, "dtype": r.dtype,
                               "bandwidth_gbs": r.bandwidth_gbs, "weight_bytes": r.weight_bytes})


def roofline_pivot(roof: pd.DataFrame) -> pd.DataFrame:
    """The roofline as a chip x (model, dtype) table of tok/s."""
    return roof.pivot_table(index=["chip", "bandwidth_gbs"], columns=["model", "dtype"],
                            values="roofline_tok_s", sort=False)


def published_vs_roofline(roof: pd.DataFrame) -> pd.DataFrame:
    """llama.cpp's published Llama 2 7B decode speeds, each beside its chip's roofline."""
    import pandas as pd

    ref = pd.DataFrame(published()["llamacpp_4167"]["rows"])
    llama = roof[roof.model == "Llama 2 7B"][["chip", "dtype", "roofline_tok_s"]]
    ref = ref.merge(llama, on=["chip", "dtype"])
    ref["fraction of roofline"] = ref.tok_s / ref.roofline_tok_s
    return ref


#: line colour and marker of each dtype in the roofline figure
DTYPE_STYLES = {"fp16": ("#d62728", "o"), "int8": ("#2ca02c", "s"), "int4": ("#1f77b4", "^")}


def plot_roofline(roof: pd.DataFrame, ref: pd.DataFrame) -> Figure:
    """Llama 2 7B's roofline against bandwidth per dtype, llama.cpp's published points on it."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(8, 4))
    llama = roof[roof.model == "Llama 2 7B"]
    for dtype, (color, marker) in DTYPE_STYLES.items():
        d = llama[llama.dtype == dtype]
        ax.plot(d.bandwidth_gbs, d.roofline_tok_s, color=color, lw=1, label=f"roofline {dtype}")
        p = ref[ref.dtype == dtype]
        ax.scatter(p.chip.map(lambda c: chips.CHIPS[c].bandwidth_gbs), p.tok_s, color=color,
                   marker=marker, edgecolor="k", zorder=3, label=f"llama.cpp {dtype} (published, #4167)")
    ax.set_xlabel("memory bandwidth (GB/s)")
    ax.set_ylabel("decode tokens/s, Llama 2 7B")
    ax.set_title("Roofline (bandwidth / weight bytes) vs published llama.cpp decode")
    ax.legend(fontsize=7, ncol=2)
    return fig


def published_path() -> Path:
    return data_dir() / "coreml" / "published.json"


def published() -> dict[str, Any]:
    """Published measurements (Apple's Core ML ladder, llama.cpp discussion 4167), with sources."""
    path = published_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (it ships with the repo)")
    return json.loads(path.read_text())


# --- 7: the ANE layout ---------------------------------------------------------------------------


def ane_comparison(conv: pd.DataFrame, exports: dict[str, Export]) -> pd.DataFrame | None:
    """Steps (c) and (f) side by side: size, ops, conversion time, conv and linear ops
    (None unless both were converted)."""
    if not {"c", "f"} <= set(conv.index):
        return None
    cmp = conv.loc[["c", "f"], ["what", "package_MB", "ops (non-const)", "convert_s"]].copy()
    cmp["conv ops"] = [exports[s].op_counts.get("conv", 0) for s in cmp.index]
    cmp["linear ops"] = [exports[s].op_counts.get("linear", 0) for s in cmp.index]
    return cmp
