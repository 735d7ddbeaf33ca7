"""Core ML export of labkit's Llama: the ladder of Apple's "On Device Llama 3.1 with Core ML".

Steps (``STEPS``), each an ``nn.Module`` wrapper around the same weights (a, b, c, d, e run the
model's own forward; b-e with a ``labkit.inference.export_cache.StaticCache``), exported with
``torch.export(...).run_decompositions({})`` and converted by ``coremltools.convert`` to an ML
program with fp16 compute. The stateful steps (c-f) target iOS18 / macOS 15 (specification 9:
Core ML states); the stateless a and b target macOS 14 (specification 8), so that they run on
macOS 14 too (:data:`DEPLOYMENT`, :data:`MIN_MACOS`):

* ``"a"`` no cache: ``input_ids [1, S]`` -> logits ``[1, S, V]``; every new token re-runs the
  whole (right-padded) window. Causal attention makes the padding invisible to earlier positions.
* ``"b"`` cache as inputs/outputs: one token, its position, an additive mask ``[1, 1, 1, S]`` and
  the whole cache ``[L, 1, H_kv, S, d]`` (K and V) go in; logits and the updated cache come out.
  The caller copies the cache in and out every step.
* ``"c"`` stateful cache: the same one-token step, but K/V live in registered buffers that
  coremltools turns into Core ML states (``ct.StateType``), updated in place
  (``cache[:, :, position] = k``, an ``index_put`` that coremltools lowers to a slice update).
* ``"d"`` = (c) + int4 per-block-32 symmetric weights (``linear_quantize_weights``).
* ``"e"`` = (c) + 4-bit k-means LUT per tensor (``palettize_weights``).

What works with coremltools 9.0 and torch 2.13 (checked by tests/test_export_coreml.py and the
``probe_*`` functions below, which notebook 02 runs):

* ``torch.jit.trace`` -> ``ct.convert`` fails: coremltools' ``int`` op calls ``int()`` on a
  1-element numpy array, which numpy 2 refuses ("only 0-dimensional arrays can be converted to
  Python scalars"). Only the torch.export path is used.
* ``torch.export(...).run_decompositions({})`` converts every step with fixed shapes, given plain
  ops: labkit's RMSNorm is explicit, and grouped-query attention is exported with an explicit
  ``repeat_kv`` (coremltools' SDPA has no ``enable_gqa``; ``layers.explicit_gqa`` switches it
  on while exporting).
* The query length is fixed at export (1 for b-e: prefill runs token by token). With a flexible
  query length (:func:`probe_flexible_query`: a ``torch.export.Dim`` on the new tokens, the
  cache written by ``cache[:, :, positions] = k``) torch.export succeeds, but coremltools'
  ``index_put`` lowering takes only a single position ("Input squeeze_0 has rank 1 != other
  inputs rank 0"). (A slice write ``cache[:, :, start:end]`` with symbolic bounds is the other
  way; the issue's probe saw torch.export reject it with a guard violation.)
* Compression (d, e) would also hit the RoPE cos/sin tables (any constant of 2048+ elements);
  :func:`compress` excludes them by name.

On Linux the packages cannot run (Core ML is macOS-only), so :func:`read_weights` reads every
weight back out of the saved .mlpackage (``milproto.load`` + each ``constexpr_*`` op's
``materialized_val_inference()``), and the caller runs labkit's PyTorch Llama on them: that is
what the package computes, up to kernel precision.

coremltools is imported inside the functions that need it; importing this module is light.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labkit.core.checks import is_int, output_path
from labkit.core.files import atomic_dir
from labkit.inference.export_cache import StaticCache
from labkit.models.layers import apply_rope, explicit_gqa, repeat_kv
from labkit.models.llama import Llama

#: ladder step -> what it is (the order of Apple's ladder)
STEPS: dict[str, str] = {
    "a": "no cache",
    "b": "cache as inputs/outputs",
    "c": "stateful cache",
    "d": "stateful + int4 per-block-32",
    "e": "stateful + 4-bit k-means LUT",
    "f": "stateful, ANE layout (B, C, 1, S)",
}
#: step -> compression applied after conversion ("none", "int4-block32", "lut4")
COMPRESSION: dict[str, str] = {
    "a": "none", "b": "none", "c": "none", "d": "int4-block32", "e": "lut4", "f": "none"
}
#: steps whose K/V cache lives in Core ML states
STATEFUL = ("c", "d", "e", "f")
#: step -> coremltools deployment target: states and per-block int4 need iOS18 / macOS 15
#: (specification 9); a and b need neither, and macOS 14's Core ML loads specification 8 at most
DEPLOYMENT: dict[str, str] = {s: "iOS18" if s in STATEFUL else "macOS14" for s in STEPS}
#: step -> the macOS version whose Core ML runs its package (MLModel.make_state needs 15)
MIN_MACOS: dict[str, tuple[int, int]] = {s: (15, 0) if s in STATEFUL else (14, 0) for s in STEPS}
#: additive mask value for positions a query may not see (finite: fp16 -inf arithmetic is risky)
MASK_MIN = -1e4


def _check_llama(model: nn.Module) -> Llama:
    if not isinstance(model, Llama):
        raise TypeError(
            f"model must be labkit.models.llama.Llama (Phi export is not implemented), "
            f"got {type(model).__name__}"
        )
    return model


# --- the wrappers that get exported ----------------------------------------------------------


class NoCacheStep(nn.Module):
    """(a) logits for a whole window; the caller re-runs it for every new token."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


class IOCacheStep(nn.Module):
    """(b) one token; the whole K/V cache is an input and the updated one an output."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position, mask, k_cache, v_cache):
        layers = range(self.model.config.num_hidden_layers)
        cache = StaticCache([k_cache[i] for i in layers], [v_cache[i] for i in layers],
                            position, mask, in_place=False)
        logits = self.model(input_ids, cache=cache)
        return logits, torch.stack(cache.new_k), torch.stack(cache.new_v)


class StatefulStep(nn.Module):
    """(c) one token; K/V in registered buffers (Core ML states), written in place."""

    def __init__(self, model: Llama, max_len: int) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        shape = (1, cfg.num_key_value_heads, max_len, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape))
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape))

    def forward(self, input_ids, position, mask):
        layers = range(self.model.config.num_hidden_layers)
        cache = StaticCache([getattr(self, f"k_cache_{i}") for i in layers],
                            [getattr(self, f"v_cache_{i}") for i in layers], position, mask)
        return self.model(input_ids, cache=cache)


class ANEStatefulStep(nn.Module):
    """(f) step (c) in the Neural Engine layout of apple/ml-ane-transformers: activations as
    (B, C, 1, S) and every Linear as a 1x1 Conv2d (the ANE's native op and layout; the channel
    axis is the one normalized). Attention itself runs per head as in (c).

    The weights are registered on this module as copies named after the state-dict keys
    ('.' -> '_'), already in their conv shapes ([out, in, 1, 1]; norms [1, C, 1, 1]), so
    :func:`read_weights` finds them; the embedding stays 2-D (a gather), and the output
    projection uses it as a Linear (tied).
    """

    def __init__(self, model: Llama, max_len: int) -> None:
        super().__init__()
        cfg = model.config
        self.config = cfg
        self.register_buffer("rope_cos", model.rope_cos.clone(), persistent=False)
        self.register_buffer("rope_sin", model.rope_sin.clone(), persistent=False)
        for key, p in model.named_parameters():
            if key == "model.embed_tokens.weight":  # a gather (and the tied output): stays 2-D
                w = p.detach().clone()
            elif p.dim() == 2:
                w = p.detach().clone()[:, :, None, None]
            else:
                w = p.detach().clone().reshape(1, -1, 1, 1)
            self.register_parameter(key.replace(".", "_"), nn.Parameter(w, requires_grad=False))
        self.eps = cfg.rms_norm_eps
        shape = (1, cfg.num_key_value_heads, max_len, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape))
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape))

    def _w(self, key: str) -> torch.Tensor:
        return getattr(self, key.replace(".", "_"))

    def _norm(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """RMSNorm over the channel axis of (B, C, 1, S)."""
        x = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)
        return self._w(key) * x

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(1, n*d, 1, T) -> (1, n, T, d)."""
        d = self.config.head_dim
        return x.reshape(1, n, d, x.shape[-1]).transpose(2, 3)

    def forward(self, input_ids, position, mask):
        cfg = self.config
        cos = self.rope_cos.index_select(0, position)
        sin = self.rope_sin.index_select(0, position)
        emb = self._w("model.embed_tokens.weight")
        x = F.embedding(input_ids, emb).transpose(1, 2).unsqueeze(2)  # (1, C, 1, T)
        t = x.shape[-1]
        n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
        for i in range(cfg.num_hidden_layers):
            pre = f"model.layers.{i}."
            h = self._norm(x, pre + "input_layernorm.weight")
            q = self._heads(F.conv2d(h, self._w(pre + "self_attn.q_proj.weight")), cfg.num_attention_heads)
            k = self._heads(F.conv2d(h, self._w(pre + "self_attn.k_proj.weight")), cfg.num_key_value_heads)
            v = self._heads(F.conv2d(h, self._w(pre + "self_attn.v_proj.weight")), cfg.num_key_value_heads)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k_cache, v_cache = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            k_cache[:, :, position] = k
            v_cache[:, :, position] = v
            y = F.scaled_dot_product_attention(
                q, repeat_kv(k_cache, n_rep), repeat_kv(v_cache, n_rep), attn_mask=mask
            )  # (1, H, T, d)
            y = y.transpose(2, 3).reshape(1, -1, 1, t)
            x = x + F.conv2d(y, self._w(pre + "self_attn.o_proj.weight"))
            h = self._norm(x, pre + "post_attention_layernorm.weight")
            gate = F.conv2d(h, self._w(pre + "mlp.gate_proj.weight"))
            up = F.conv2d(h, self._w(pre + "mlp.up_proj.weight"))
            x = x + F.conv2d(F.silu(gate) * up, self._w(pre + "mlp.down_proj.weight"))
        x = self._norm(x, "model.norm.weight")
        out_w = emb if cfg.tie_word_embeddings else self._w("lm_head.weight")[:, :, 0, 0]
        return F.linear(x[:, :, 0, :].transpose(1, 2), out_w)  # (1, T, vocab)


def decode_mask(position: int, max_len: int) -> np.ndarray:
    """Additive mask [1, 1, 1, S] for the token at ``position``: 0 on [0, position], else MASK_MIN."""
    if not 0 <= position < max_len:
        raise ValueError(f"position must be in [0, max_len={max_len}), got {position}")
    mask = np.full((1, 1, 1, max_len), MASK_MIN, np.float32)
    mask[..., : position + 1] = 0.0
    return mask


def _check_max_len(model: Llama, max_len: Any) -> int:
    """Cache positions of an exported step: an integer within the model's context."""
    context = model.config.max_position_embeddings
    if not is_int(max_len) or not 1 <= max_len <= context:
        raise ValueError(f"max_len must be an integer in 1..{context} (max_position_embeddings), "
                         f"got {max_len!r}")
    return int(max_len)


def step_module(model: nn.Module, step: str, max_len: int) -> nn.Module:
    """The fp32 wrapper of ladder ``step`` ("a".."e"; d and e share c's graph)."""
    model = _check_llama(model)
    if step not in STEPS:
        raise ValueError(f"step must be one of {list(STEPS)}, got {step!r}")
    _check_max_len(model, max_len)
    if step == "a":
        return NoCacheStep(model).eval()
    if step == "b":
        return IOCacheStep(model).eval()
    if step == "f":
        return ANEStatefulStep(model, max_len).eval()
    return StatefulStep(model, max_len).eval()


def example_inputs(model: Llama, step: str, max_len: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes/dtypes for tracing ``step`` (token 0 at position 0)."""
    cfg = model.config
    if step == "a":
        return (torch.zeros(1, max_len, dtype=torch.int32),)
    ids = torch.zeros(1, 1, dtype=torch.int32)
    position = torch.zeros(1, dtype=torch.int32)
    mask = torch.from_numpy(decode_mask(0, max_len))
    if step == "b":
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return ids, position, mask, torch.zeros(shape), torch.zeros(shape)
    return ids, position, mask


# --- conversion ---------------------------------------------------------------------------------


@dataclass
class Export:
    """One converted ladder step, saved as an .mlpackage."""

    step: str
    compression: str
    path: Path
    package_bytes: int
    export_seconds: float  # torch.export + run_decompositions
    convert_seconds: float  # coremltools.convert (+ compression for d/e)
    op_counts: dict[str, int] = field(default_factory=dict)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _buffer_consts(mlmodel: Any) -> list[str]:
    """Names of the constants that come from registered buffers (RoPE tables: ``b_...``)."""
    program = getattr(mlmodel, "_mil_program", None)
    if program is None:
        return []
    return [op.name for op in _ops(program) if op.op_type == "const" and op.name.startswith("b_")]


def compress(mlmodel: Any, compression: str) -> Any:
    """Apply coremltools' weight compression: "none", "int4-block32" or "lut4" (k-means, per tensor).

    Weights only: coremltools would also compress the RoPE cos/sin tables (any constant of
    2048+ elements), so those are excluded by name. Norm weights (512 elements) stay fp16 under
    coremltools' default weight_threshold.
    """
    import coremltools.optimize.coreml as cto

    if compression == "none":
        return mlmodel
    if compression == "int4-block32":
        cfg = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32
        )
        run = cto.linear_quantize_weights
    elif compression == "lut4":
        cfg = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_tensor")
        run = cto.palettize_weights
    else:
        raise ValueError(
            f"compression must be 'none', 'int4-block32' or 'lut4', got {compression!r}"
        )
    skip = {name: None for name in _buffer_consts(mlmodel)}
    return run(mlmodel, cto.OptimizationConfig(global_config=cfg, op_name_configs=skip))


def _kv_states(model: Llama, max_len: int) -> list[Any]:
    """One fp16 Core ML state per K and V buffer of every layer (the names StatefulStep registers)."""
    import coremltools as ct

    cfg = model.config
    shape = (1, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return [
        ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name)
        for i in range(cfg.num_hidden_layers)
        for name in (f"k_cache_{i}", f"v_cache_{i}")
    ]


def _to_mlmodel(model: Llama, step: str, max_len: int) -> tuple[Any, float, float]:
    """(uncompressed ML program of ``step``'s graph, export seconds, convert seconds)."""
    import coremltools as ct

    from labkit.core import env

    wrapper = step_module(model, step, max_len)
    args = example_inputs(model, step, max_len)
    t0 = time.perf_counter()
    with explicit_gqa(), torch.no_grad():
        ep = torch.export.export(wrapper, args).run_decompositions({})
    t1 = time.perf_counter()
    states = _kv_states(model, max_len) if step in STATEFUL else None
    mlmodel = ct.convert(
        ep,
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT[step]),
        compute_precision=ct.precision.FLOAT16,
        states=states,
        skip_model_load=not env.macos_at_least(MIN_MACOS[step]),  # loadable on this Mac only
    )
    return mlmodel, t1 - t0, time.perf_counter() - t1


def _save(mlmodel: Any, path: Path) -> None:
    """Save the .mlpackage folder atomically (a complete old or new package, never half)."""
    with atomic_dir(path) as tmp:
        mlmodel.save(str(tmp / "m.mlpackage"))
        for entry in (tmp / "m.mlpackage").iterdir():
            entry.rename(tmp / entry.name)
        (tmp / "m.mlpackage").rmdir()


def convert(
    model: nn.Module,
    steps: str | list[str],
    out_dir: str | os.PathLike[str],
    max_len: int,
    on_done: Any = None,
) -> list[Export]:
    """Export ladder ``steps`` of ``model`` to ``out_dir/step_<s>.mlpackage`` and measure each.

    Converted from fp32 with fp16 compute precision (weights stored fp16). Steps d and e
    compress step c's converted program, so c's graph is exported once; their
    ``convert_seconds`` include that conversion plus the compression. ``on_done(export)`` is
    called after each package is saved (for progress bars).
    """
    model = _check_llama(model)
    steps = list(steps)
    for step in steps:  # every argument checked before the first conversion
        if step not in STEPS:
            raise ValueError(f"step must be one of {list(STEPS)}, got {step!r}")
    _check_max_len(model, max_len)
    output_path(out_dir, "out_dir", "convert", folder=True)
    if on_done is not None and not callable(on_done):
        raise TypeError(f"convert: on_done must be callable or None, got {on_done!r}")
    model = model.float().eval()
    out: list[Export] = []
    stateful: tuple[Any, float, float] | None = None
    for step in steps:
        if step in ("c", "d", "e"):  # one conversion of (c)'s graph, compressed two ways
            if stateful is None:
                stateful = _to_mlmodel(model, "c", max_len)
            base, export_s, convert_s = stateful
        else:
            base, export_s, convert_s = _to_mlmodel(model, step, max_len)
        t0 = time.perf_counter()
        mlmodel = compress(base, COMPRESSION[step])
        convert_s += time.perf_counter() - t0
        path = Path(out_dir) / f"step_{step}.mlpackage"
        _save(mlmodel, path)
        e = Export(
            step=step,
            compression=COMPRESSION[step],
            path=path,
            package_bytes=_dir_bytes(path),
            export_seconds=export_s,
            convert_seconds=convert_s,
            op_counts=op_counts(path),
        )
        out.append(e)
        if on_done is not None:
            on_done(e)
    return out


# --- reading a package back ---------------------------------------------------------------------


def load_program(path: str | os.PathLike[str]) -> Any:
    """The MIL program of a saved .mlpackage (works on Linux: no Core ML runtime needed)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise FileNotFoundError(f"{path} is not an .mlpackage (no Manifest.json)")
    loaded = ct.models.MLModel(str(path), skip_model_load=True)
    spec = loaded.get_spec()
    return milproto_load(spec, spec.specificationVersion, loaded.weights_dir)


def _ops(program: Any) -> list[Any]:
    out = []

    def walk(block):
        for op in block.operations:
            out.append(op)
            for b in op.blocks:
                walk(b)

    for f in program.functions.values():
        walk(f)
    return out


def op_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """How many ops of each type the package's program has (const included)."""
    counts: dict[str, int] = {}
    for op in _ops(load_program(path)):
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return dict(sorted(counts.items()))


#: what coremltools adds around a lifted parameter's name: "p_" + the wrapper's "model_" prefix,
#: then casts and compression suffixes
_PREFIXES = ("p_model_", "p_")
_SUFFIXES = ("_quantized", "_palettized", "_to_fp16", "_to_fp32")


def _param_key(name: str, flat: dict[str, str]) -> str | None:
    """Map a MIL constant name back to a state-dict key (keys with '.' -> '_'), else None."""
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name, changed = name[: -len(suffix)], True
    for prefix in _PREFIXES:
        if name.startswith(prefix) and name[len(prefix) :] in flat:
            return flat[name[len(prefix) :]]
    return None


def read_weights(path: str | os.PathLike[str], state_keys: list[str]) -> dict[str, np.ndarray]:
    """Every weight of ``state_keys`` found in the package, decompressed to numpy.

    ``const`` ops give their value, ``constexpr_*`` ops (int4 blocks, LUTs) their
    ``materialized_val_inference()`` — the dense tensor Core ML's op defines.
    """
    flat = {k.replace(".", "_"): k for k in state_keys}
    out: dict[str, np.ndarray] = {}
    for op in _ops(load_program(path)):
        if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
            continue
        key = _param_key(op.name, flat)
        if key is None:
            continue
        val = op.val.val if op.op_type == "const" else op.materialized_val_inference()
        out[key] = np.asarray(val)
    return out


def readback_model(model: nn.Module, weights: dict[str, np.ndarray]) -> Llama:
    """A float32 copy of ``model`` carrying the weights read back from a package.

    Every parameter must be among ``weights`` (a KeyError names the missing ones), so the
    copy computes what the package computes, not a mix with the original weights.
    """
    model = _check_llama(model)
    missing = sorted(k for k, _ in model.named_parameters() if k not in weights)
    if missing:
        raise KeyError(f"package lacks weights for {len(missing)} parameters: {missing[:5]} ...")
    out = _copy_float(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            w = weights[name]
            if w.size == p.numel() and w.ndim != p.dim():  # the ANE layout's conv shapes
                w = w.reshape(tuple(p.shape))
            if tuple(w.shape) != tuple(p.shape):
                raise ValueError(f"{name}: package has shape {w.shape}, model {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
    return out


def _copy_float(model: Llama) -> Llama:
    import copy

    return copy.deepcopy(model).float().eval()


def logits_error(
    reference: nn.Module, candidate: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype
) -> float:
    """max |logits(candidate run in ``dtype``) - logits(reference in fp32)| over ``input_ids``."""
    with torch.no_grad():
        ref = _copy_float(reference)(input_ids)
        cand = _copy_float(candidate).to(dtype)(input_ids).float()
    return float((cand - ref).abs().max())


# --- running a package (macOS only) -------------------------------------------------------------

#: Core ML compute units the notebook times (names of coremltools.ComputeUnit)
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


def coreml_unavailable(step: str | None = None) -> str | None:
    """None where Core ML can run the package of ladder ``step`` here, else why not and what to
    install; ``step`` None asks for the whole ladder (macOS 15: the stateful steps)."""
    from labkit.core import env

    if step is not None and step not in STEPS:
        raise ValueError(f"step must be one of {list(STEPS)}, got {step!r}")
    return env.coreml_reason(max(MIN_MACOS.values()) if step is None else MIN_MACOS[step])


def _loaded(path: str, compute_unit: str) -> Any:
    """The package at ``path`` opened once per compute unit (and per version of the package on
    disk): loading compiles and specialises it for the unit (seconds for the ANE), which a timed
    run must not include."""
    stamp = (Path(path) / "Manifest.json").stat().st_mtime_ns
    return _open(str(path), compute_unit, stamp)


@functools.lru_cache(maxsize=32)
def _open(path: str, compute_unit: str, stamp: int) -> Any:
    import coremltools as ct

    return ct.models.MLModel(path, compute_units=getattr(ct.ComputeUnit, compute_unit))


def compute_plan(path: str | os.PathLike[str], compute_unit: str = "ALL") -> dict[str, int]:
    """How many of the package's operations Core ML prefers to run on each device ("cpu",
    "gpu", "neural_engine"; "unknown" where it cannot say) for ``compute_unit``, from
    ``MLComputePlan`` (macOS 14.4+). Ops the ANE cannot run fall back to the CPU silently, so a
    CPU_AND_NE speed means little without this."""
    from labkit.core import env

    reason = env.coreml_reason((14, 4))
    if reason:
        raise RuntimeError(f"MLComputePlan: {reason}")
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    compiled = _loaded(str(path), compute_unit).get_compiled_model_path()
    plan = MLComputePlan.load_from_path(compiled, getattr(ct.ComputeUnit, compute_unit))
    counts: dict[str, int] = {}
    for op in plan.model_structure.program.functions["main"].block.operations:
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        name = type(usage.preferred_compute_device).__name__ if usage else "unknown"
        kind = {"MLCPUComputeDevice": "cpu", "MLGPUComputeDevice": "gpu",
                "MLNeuralEngineComputeDevice": "neural_engine"}.get(name, "unknown")
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@dataclass
class CoreMLRun:
    """One greedy run of a package: time to first token, decode tok/s, tokens, last logits."""

    ttft_s: float
    decode_tok_s: float
    tokens: list[int]
    first_logits: np.ndarray


def coreml_generate(
    path: str | os.PathLike[str],
    step: str,
    prompt: list[int],
    n_new: int,
    max_len: int,
    compute_unit: str = "CPU_ONLY",
) -> CoreMLRun:
    """Greedy-decode ``n_new`` tokens with the package of ladder ``step`` (macOS only).

    The prompt goes in token by token (the packages take one query token, see the module
    docstring); TTFT is the time until the first new token's logits. The package is loaded once
    per compute unit (:func:`_loaded`) and predicts once untimed before the clock starts, so
    neither compilation nor first-predict specialisation is timed.
    """
    reason = coreml_unavailable(step)
    if reason:
        raise RuntimeError(reason)
    if compute_unit not in COMPUTE_UNITS:
        raise ValueError(f"compute_unit must be one of {COMPUTE_UNITS}, got {compute_unit!r}")
    if len(prompt) + n_new > max_len:
        raise ValueError(f"prompt + n_new = {len(prompt) + n_new} exceeds max_len={max_len}")
    mlmodel = _loaded(str(path), compute_unit)
    _greedy_run(mlmodel, step, prompt[:1], 1, max_len)  # warm-up, on a state of its own
    return _greedy_run(mlmodel, step, prompt, n_new, max_len)


def _greedy_run(mlmodel: Any, step: str, prompt: list[int], n_new: int, max_len: int) -> CoreMLRun:
    """One timed greedy run of an opened package (a fresh state or cache)."""
    spec = mlmodel.get_spec()
    names_in = [i.name for i in spec.description.input]
    names_out = [o.name for o in spec.description.output]
    window: list[int] = []
    state = mlmodel.make_state() if step in STATEFUL else None
    cache: list[np.ndarray] = []
    if step == "b":
        shape = tuple(spec.description.input[3].type.multiArrayType.shape)
        cache = [np.zeros(shape, np.float16), np.zeros(shape, np.float16)]

    def run(tok: int, pos: int) -> np.ndarray:
        if step == "a":
            window[pos:] = [tok]
            ids = np.zeros((1, max_len), np.int32)
            ids[0, : len(window)] = window
            out = mlmodel.predict({names_in[0]: ids})
            return np.asarray(out[names_out[0]])[0, len(window) - 1]
        feeds = {
            names_in[0]: np.array([[tok]], np.int32),
            names_in[1]: np.array([pos], np.int32),
            names_in[2]: decode_mask(pos, max_len),
        }
        if step == "b":
            feeds[names_in[3]], feeds[names_in[4]] = cache
            out = mlmodel.predict(feeds)
            cache[:] = [out[names_out[1]], out[names_out[2]]]
        else:
            out = mlmodel.predict(feeds, state=state)
        return np.asarray(out[names_out[0]]).reshape(-1)

    t0 = time.perf_counter()
    for pos, tok in enumerate(prompt):
        logits = run(tok, pos)
    ttft = time.perf_counter() - t0
    first = logits.astype(np.float32)
    tokens = [int(np.argmax(logits))]
    t1 = time.perf_counter()
    for i in range(n_new - 1):
        logits = run(tokens[-1], len(prompt) + i)
        tokens.append(int(np.argmax(logits)))
    dt = time.perf_counter() - t1
    return CoreMLRun(ttft, (n_new - 1) / dt if n_new > 1 else float("nan"), tokens, first)


# --- probes: what does and does not convert with this coremltools / torch -----------------------


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}"


def probe_jit_trace(model: nn.Module, seq_len: int = 8) -> str:
    """Try the classic path (torch.jit.trace -> coremltools.convert) on step (a): "ok" or the error."""
    import coremltools as ct

    model = _check_llama(model).float().eval()
    ids = torch.zeros(1, seq_len, dtype=torch.int32)
    try:
        with explicit_gqa(), torch.no_grad():
            traced = torch.jit.trace(NoCacheStep(model), (ids,), check_trace=False)
        ct.convert(
            traced,
            inputs=[ct.TensorType(name="input_ids", shape=ids.shape, dtype=np.int32)],
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            skip_model_load=True,
        )
    except Exception as e:  # noqa: BLE001 - the probe reports whatever breaks
        return _short(e)
    return "ok"


def probe_flexible_query(model: nn.Module, max_len: int) -> str:
    """Try step (c) with a flexible query length 1..max_len (one graph for prefill and decode):
    torch.export with a dynamic dimension, then coremltools with a RangeDim. "ok" or the error."""
    import coremltools as ct

    model = _check_llama(model).float().eval()
    wrapper = StatefulStep(model, max_len).eval()
    t = 2
    ids = torch.zeros(1, t, dtype=torch.int32)
    position = torch.arange(t, dtype=torch.int32)
    mask = torch.zeros(1, 1, t, max_len)
    q = torch.export.Dim("q", min=1, max=max_len)
    dynamic = {"input_ids": {1: q}, "position": {0: q}, "mask": {2: q}}
    try:
        with explicit_gqa(), torch.no_grad():
            ep = torch.export.export(
                wrapper, (ids, position, mask), dynamic_shapes=dynamic
            ).run_decompositions({})
        ct.convert(
            ep,
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            states=_kv_states(model, max_len),
            skip_model_load=True,
        )
    except Exception as e:  # noqa: BLE001 - the probe reports whatever breaks
        return _short(e)
    return "ok"


def top1_agreement(
    reference: nn.Module, candidate: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype
) -> float:
    """Share of positions where the candidate (run in ``dtype``) picks fp32's most likely token."""
    with torch.no_grad():
        ref = _copy_float(reference)(input_ids).argmax(-1)
        cand = _copy_float(candidate).to(dtype)(input_ids).float().argmax(-1)
    return float((ref == cand).float().mean())
