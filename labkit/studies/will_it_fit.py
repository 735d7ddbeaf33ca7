"""Study 09 (Will it fit?): bytes of a decoder's weights, KV cache and activations, from its config
alone, against the unified memory of Apple-silicon Macs; and what a device map does when it does not.

The question users ask first: which model, at which precision and context length, fits in the
unified memory of which Mac. Everything in the plan is computed from a ``config.json`` (no
weights are read), so a 7B or 8B model can be planned on a laptop that could never load it.

* Weights: ``labkit.quant.footprint`` (every tensor of the checkpoint at a precision; exact, a
  test checks it on the shipped model, byte for byte).
* KV cache: ``labkit.inference.kv_cache.kv_cache_bytes_for_config`` (the lab's one formula).
* Activations: an *estimate* of the transient buffers of one forward (see
  :func:`activation_bytes`); unlike the other two it is not exact and is labelled so.
* Mac memory: ``labkit.core.chips`` (the sizes Macs ship with, and the share the GPU may use by
  default, an approximation with its sources).

The notebook's sections, each a function here: the plan (:func:`plan_table`,
:func:`record_plans`, :func:`plot_plan`, :func:`scheme_table`), the planner against the shipped
model's real tensors (:func:`shipped_checks`), and accelerate's device map with disk offload
(:func:`offload_benchmark`, :func:`mps_offload`): served from the page cache and, where the
platform can drop files from it (``posix_fadvise``), at disk speed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkit.core import chips, results
from labkit.core.checks import positive_int
from labkit.inference.kv_cache import kv_cache_bytes_for_config
from labkit.quant.footprint import (
    decoder_dims,
    num_parameters,
    precision_name,
    scheme_of,
    weights_bytes,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

STUDY = "09_will_it_fit"
GiB = 2**30

#: display names of the configs in data/configs (a model without one is shown by its name)
LABELS = {
    "meta-llama__Llama-2-7b-hf": "Llama 2 7B",
    "microsoft__phi-2": "Phi-2",
    "Salesforce__xLAM-1b-fc-r": "xLAM-1b",
    "meta-llama__Meta-Llama-3-8B": "Llama 3 8B",
}


def label(name: str) -> str:
    """The display name of a planned model."""
    return LABELS.get(name, name)


# --- configs -------------------------------------------------------------------------------------


def load_config(source: Any) -> dict[str, Any]:
    """A config dict from a dict, a config .json file, a model folder, ``"tiny-llama"``, or the
    stem of a file in data/configs (e.g. ``"microsoft__phi-2"``). Keys starting with ``_``
    (provenance notes) are dropped. The file is read by ``labkit.models.config.read_config``."""
    from labkit.core import paths
    from labkit.models.config import read_config

    if isinstance(source, Mapping):
        config = dict(source)
    else:
        text = os.fspath(source)
        path = Path(text).expanduser()
        if text == "tiny-llama":
            path = paths.models_dir() / "tiny-llama"
        elif not path.exists() and (paths.configs_dir() / f"{text}.json").is_file():
            path = paths.configs_dir() / f"{text}.json"
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            known = sorted(p.stem for p in paths.configs_dir().glob("*.json"))
            raise FileNotFoundError(
                f"{path}: no config found; expected a config .json, a model folder with "
                f"config.json, 'tiny-llama', or one of data/configs: {', '.join(known)}"
            )
        config = read_config(path)
    return {k: v for k, v in config.items() if not str(k).startswith("_")}


def planned_configs(stems: list[str], model: str) -> tuple[dict[str, dict[str, Any]], Path, str]:
    """(name -> config of every model planned, the folder of ``model``, its name).

    ``stems`` name files of data/configs; ``model`` (a name or folder ``labkit.models`` loads)
    is always planned too, under its own name ("tiny-llama") or its folder's.
    """
    from labkit.models.loader import resolve

    name, folder, source = resolve(model)  # a registry name ("smollm2-135m") keeps its name
    if source == "local folder" or "/" in name:
        name = folder.name
    configs = {stem: load_config(stem) for stem in stems}
    configs[name] = load_config(folder)
    return configs, folder, name


# --- KV cache and activations --------------------------------------------------------------------

_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}


def element_bytes(precision: str) -> float:
    """Bytes per element of an activation or cache tensor at ``precision`` (int8: 1, int4: 0.5)."""
    name = precision_name(precision)
    if name in _BYTES:
        return _BYTES[name]
    if name == "int4":
        return 0.5
    raise ValueError(f"precision {precision!r} has no element size; use fp32, fp16, bf16, int8, int4")


def kv_bytes(config: Mapping[str, Any], context: int, batch: int = 1, kv_precision: str = "fp16") -> int:
    """KV-cache bytes for ``context`` positions (``kv_cache_bytes_for_config``, the one formula)."""
    return kv_cache_bytes_for_config(
        config, positions=context, dtype_bytes=element_bytes(kv_precision), batch=batch
    )


#: Tokens a prefill processes per forward (llama.cpp's default micro-batch is 512).
PREFILL_CHUNK = 512


def activation_bytes(
    config: Mapping[str, Any],
    context: int,
    batch: int = 1,
    act_precision: str = "fp16",
    chunk: int = PREFILL_CHUNK,
) -> int:
    """An ESTIMATE of the transient bytes of one prefill forward of ``min(chunk, context)`` tokens.

    Counted: the residual stream and one layer's working tensors (q, k, v, attention output,
    gate/up/act of the MLP) for the chunk, the attention scores of the chunk against the whole
    context (unfused attention: a fused kernel needs far less), and fp32 logits for the last
    position. Only one layer is alive at a time in inference, so layers do not multiply it.
    Real runtimes add allocator slack and scratch buffers; treat this as an order of magnitude.
    """
    _, hidden, inter, _, heads, kv_heads, head_dim = decoder_dims(config)
    vocab = int(config["vocab_size"])
    t = min(chunk, context)
    per_token = 2 * hidden + heads * head_dim * 2 + 2 * kv_heads * head_dim + 3 * inter
    scores = heads * t * context
    return int(element_bytes(act_precision) * batch * (t * per_token + scores) + 4 * batch * vocab)


# --- a plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Bytes one model needs at one precision, context length and batch."""

    model: str
    precision: str
    context: int
    batch: int
    kv_precision: str
    parameters: int
    weights_bytes: int
    kv_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def plan(
    config: Any,
    precision: str,
    context: int,
    batch: int = 1,
    *,
    kv_precision: str = "fp16",
    name: str | None = None,
) -> Plan:
    """Weights + KV cache + activation estimate for ``config`` (anything ``load_config`` takes)."""
    context = positive_int(context, "context (tokens)")
    batch = positive_int(batch, "batch")
    cfg = load_config(config)
    if name is None:
        name = config if isinstance(config, str) else "model"
    scheme_of(precision)  # refuse an unknown precision by name
    return Plan(
        model=str(name),
        precision=precision,
        context=context,
        batch=batch,
        kv_precision=kv_precision,
        parameters=num_parameters(cfg),
        weights_bytes=weights_bytes(cfg, precision),
        kv_bytes=kv_bytes(cfg, context, batch, kv_precision),
        activation_bytes=activation_bytes(cfg, context, batch, kv_precision),
    )


def fits(p: Plan, memory_gb: float) -> bool:
    """Does the plan's total fit in the default GPU budget of a ``memory_gb`` Mac?"""
    return p.total_bytes <= chips.mac_gpu_budget_bytes(memory_gb)


def smallest_mac(p: Plan, sizes: tuple[int, ...] = chips.MAC_MEMORY_GB) -> int | None:
    """The smallest Mac memory size (GB) the plan fits in, or None if none does."""
    return next((gb for gb in sorted(sizes) if fits(p, gb)), None)


# --- section 1: the plan, as tables, records and a figure ---------------------------------------


def mac_budgets() -> pd.DataFrame:
    """Every Mac memory size, the GPU's default share of it and that budget in GiB."""
    import pandas as pd

    return pd.DataFrame([
        dict(mac_memory_gb=gb, gpu_share=chips.mac_gpu_share(gb),
             gpu_budget_GiB=chips.mac_gpu_budget_bytes(gb) / GiB)
        for gb in chips.MAC_MEMORY_GB
    ]).set_index("mac_memory_gb")


def window_of(config: Mapping[str, Any], default: int) -> int:
    """The context a model was trained for (``max_position_embeddings``; ``default`` if unset)."""
    return int(config.get("max_position_embeddings", default))


def plan_table(
    configs: Mapping[str, Mapping[str, Any]], precisions: list[str], contexts: list[int],
    batch: int, kv_precision: str,
) -> pd.DataFrame:
    """One plan per model, precision and context up to the model's window, with its smallest Mac."""
    import pandas as pd

    rows = []
    for name, cfg in configs.items():
        window = window_of(cfg, max(contexts))
        for precision in precisions:
            for context in (c for c in contexts if c <= window):
                p = plan(cfg, precision, context, batch, kv_precision=kv_precision, name=name)
                rows.append(dict(p.to_dict(), label=label(name), window=window,
                                 smallest_mac_gb=smallest_mac(p)))
    return pd.DataFrame(rows)


#: the budget a "fits" record was judged against (its params say so)
BUDGET_NOTE = ("Metal's default recommended working set (0.74 of 16 GB, 0.84 of 128 GB, "
               "linear in log2 RAM through them, held above 128 GB)")


def _planner_record(metric: str, value: int, unit: str, model: str, params: dict) -> dict:
    return dict(study=STUDY, metric=metric, value=value, unit=unit, runtime="planner",
                device="none", model=model, params=dict(model=model, **params))


def record_plans(plans: pd.DataFrame, batch: int, kv_precision: str) -> None:
    """Weight bytes per (model, precision), KV bytes per (model, context), and whether each plan
    fits each Mac (1 or 0, its total bytes in the params)."""
    batch_records = [
        _planner_record("weights_bytes", int(r.weights_bytes), "bytes", r.model,
                        dict(dtype=r.precision, parameters=int(r.parameters)))
        for r in plans.drop_duplicates(["model", "precision"]).itertuples()
    ] + [
        _planner_record("kv_bytes", int(r.kv_bytes), "bytes", r.model,
                        dict(dtype=kv_precision, context=int(r.context), batch=batch))
        for r in plans.drop_duplicates(["model", "context"]).itertuples()
    ] + [
        _planner_record("fits", int(r.total_bytes <= chips.mac_gpu_budget_bytes(gb)), "1", r.model,
                        dict(dtype=r.precision, context=int(r.context), mac_memory_gb=gb, batch=batch,
                             kv_dtype=kv_precision, total_bytes=int(r.total_bytes), budget=BUDGET_NOTE))
        for r in plans.itertuples() for gb in chips.MAC_MEMORY_GB
    ]
    results.record_many(batch_records)


def plan_summary(plans: pd.DataFrame) -> pd.DataFrame:
    """The plan in GiB per (model, precision, context), with the smallest Mac that holds it."""
    import pandas as pd

    table = plans.assign(
        weights_GiB=plans.weights_bytes / GiB, kv_GiB=plans.kv_bytes / GiB,
        act_GiB=plans.activation_bytes / GiB, total_GiB=plans.total_bytes / GiB,
        smallest_mac=plans.smallest_mac_gb.map(lambda gb: "none" if pd.isna(gb) else f"{int(gb)} GB"))
    columns = ["label", "precision", "context", "parameters", "weights_GiB", "kv_GiB", "act_GiB",
               "total_GiB", "smallest_mac"]
    return table[columns].set_index(["label", "precision", "context"]).round(3)


def figure_table(
    configs: Mapping[str, Mapping[str, Any]], precisions: list[str], context: int, batch: int,
    kv_precision: str,
) -> pd.DataFrame:
    """Bytes of weights, KV cache and activations per model and precision at ``context`` (or the
    model's window, if shorter): the bars of :func:`plot_plan`."""
    import pandas as pd

    rows = []
    for name, cfg in configs.items():
        ctx = min(context, window_of(cfg, context))
        for precision in precisions:
            p = plan(cfg, precision, ctx, batch, kv_precision=kv_precision, name=name)
            rows.append(dict(label=f"{label(name)} {precision} @{ctx}", weights=p.weights_bytes,
                             kv=p.kv_bytes, act=p.activation_bytes))
    return pd.DataFrame(rows)


def plot_plan(fig_df: pd.DataFrame, batch: int, kv_precision: str) -> Figure:
    """Stacked bars (weights, KV cache, activations) against the GPU budget of each Mac in range.

    The budgets are dotted lines named on a second axis above the plot, so no label sits on a
    bar; the byte axis has its ticks at multiples of a power-of-two size.
    """
    import math

    import numpy as np
    from matplotlib.ticker import MultipleLocator

    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(10, 0.32 * len(fig_df) + 1.8))
    y = np.arange(len(fig_df))[::-1]
    left = np.zeros(len(fig_df))
    for col, name in (("weights", "weights"), ("kv", f"KV cache ({kv_precision})"),
                      ("act", "activations (estimate)")):
        ax.barh(y, fig_df[col], left=left, label=name)
        left += fig_df[col].to_numpy(dtype=float)
    top = float(left.max()) * 1.15
    macs = [(gb, chips.mac_gpu_budget_bytes(gb)) for gb in chips.MAC_MEMORY_GB
            if chips.mac_gpu_budget_bytes(gb) <= top]
    for _, budget in macs:
        ax.axvline(budget, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, top)
    ax.xaxis.set_major_locator(MultipleLocator(2.0 ** math.ceil(math.log2(top / 8))))
    ax.xaxis.set_major_formatter(plotting.bytes_formatter())
    macs_axis = ax.secondary_xaxis("top")
    macs_axis.set_xticks([b for _, b in macs], [f"{gb} GB Mac" for gb, _ in macs], fontsize=7)
    macs_axis.tick_params(length=0, labelcolor="dimgrey")
    ax.set_ylim(y.min() - 0.7, y.max() + 0.7)
    ax.set_yticks(y, fig_df.label, fontsize=8)
    ax.set_xlabel("memory (bytes); dotted: Metal's default GPU working set of a Mac")
    ax.set_ylabel("model, precision @ context (tokens)")
    ax.set_title(f"Will it fit? Weights + KV cache + activations (batch {batch})", pad=18)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def scheme_table(configs: Mapping[str, Mapping[str, Any]], schemes: list[str]) -> pd.DataFrame:
    """Weight bytes and whole-checkpoint bits per weight of every model in every scheme."""
    import pandas as pd

    rows = []
    for name, cfg in configs.items():
        params = num_parameters(cfg)
        for scheme in schemes:
            nbytes = weights_bytes(cfg, scheme)
            rows.append(dict(model=name, label=label(name), scheme=scheme, weights_bytes=nbytes,
                             bits_per_weight=8 * nbytes / params))
    return pd.DataFrame(rows)


def record_schemes(schemes_df: pd.DataFrame, lab_schemes: list[str]) -> None:
    """Weight bytes of every model in each of ``lab_schemes``."""
    results.record_many([
        _planner_record("weights_bytes", int(r.weights_bytes), "bytes", r.model, dict(dtype=r.scheme))
        for r in schemes_df.itertuples() if r.scheme in lab_schemes
    ])


# --- section 2: the planner against the shipped model's tensors ---------------------------------

_SAFETENSORS_PRECISIONS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


def safetensors_tensors(folder: Path) -> tuple[dict[str, tuple[int, ...]], int, str]:
    """(name -> shape, data bytes, precision) of the checkpoint in ``folder``, from its headers."""
    from labkit.models.loader import read_safetensors_header, weight_files

    shapes, nbytes, dtypes = {}, 0, set()
    for path in weight_files(folder):
        for name, info in read_safetensors_header(path).items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
                nbytes += info["data_offsets"][1] - info["data_offsets"][0]
                dtypes.add(info["dtype"])
    if len(dtypes) != 1:
        raise ValueError(f"{folder}: expected one dtype for every tensor, found {sorted(dtypes)}")
    return shapes, nbytes, _SAFETENSORS_PRECISIONS[dtypes.pop()]


def kv_checks(
    models: Mapping[str, Any], config: Mapping[str, Any], lengths: list[int]
) -> list[dict[str, Any]]:
    """A real KVCache's bytes after a prefill of each length (capped at the model's window), for
    each ``models`` entry (precision name -> the loaded model), beside the planner's."""
    import torch

    from labkit.inference.kv_cache import KVCache

    window = min(m.config.max_position_embeddings for m in models.values())
    rows = []
    for n in sorted({min(n, window) for n in lengths}):
        for name, model in models.items():
            cache = KVCache.for_model(model, max_len=n)
            with torch.inference_mode():
                model(torch.randint(0, config["vocab_size"], (1, n)), cache=cache)
            if cache.length != n:
                raise RuntimeError(f"the prefill filled {cache.length} of {n} cache positions")
            rows.append(dict(what=f"KVCache {name}, {n} positions", measured=cache.nbytes(),
                             planner=kv_bytes(config, n, 1, name)))
    return rows


@dataclass
class ShippedChecks:
    """Section 2: measured bytes against the planner's, and what the tables do not show."""

    table: pd.DataFrame  # what, measured, planner, equal
    header_shapes: dict[str, tuple[int, ...]]  # the checkpoint's tensors, from its header
    buffer_bytes: int  # non-persistent buffers accelerate counts (RoPE frequencies): not weights


def shipped_checks(folder: Path, config: Mapping[str, Any], kv_lengths: list[int]) -> ShippedChecks:
    """The shipped checkpoint's file bytes, its loaded parameters, real KV caches and
    accelerate's module sizes (minus buffers), each beside what the planner says."""
    import pandas as pd
    import torch
    from accelerate.utils import compute_module_sizes

    from labkit.models import load

    shapes, file_bytes, file_precision = safetensors_tensors(folder)
    loaded = load(folder, device="cpu", dtype=torch.float32).model
    loaded_bytes = sum(p.numel() * p.element_size() for p in loaded.parameters())
    by_dtype = {"fp32": loaded, "fp16": load(folder, device="cpu", dtype=torch.float16).model}
    kv_rows = kv_checks(by_dtype, config, kv_lengths)
    empty = empty_hf_model(folder)
    buffer_bytes = sum(b.numel() * b.element_size() for b in empty.buffers())
    fp32 = weights_bytes(config, "fp32")
    table = pd.DataFrame([
        dict(what=f"model.safetensors data ({file_precision})", measured=file_bytes,
             planner=weights_bytes(config, file_precision)),
        dict(what="loaded parameters (fp32)", measured=loaded_bytes, planner=fp32),
        *kv_rows,
        dict(what="accelerate module sizes (fp32) minus buffers",
             measured=compute_module_sizes(empty)[""] - buffer_bytes, planner=fp32),
    ])
    table["equal"] = table.measured == table.planner
    return ShippedChecks(table, shapes, buffer_bytes)


# --- Hugging Face accelerate: a device map for a model that does not fit ------------------------


def empty_hf_model(folder: str | os.PathLike[str], dtype: Any = None) -> Any:
    """A transformers model of ``folder``'s config with no memory behind it (meta tensors),
    its tied weights tied, for ``infer_auto_device_map`` to size. Reads config.json only."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    cfg = transformers.AutoConfig.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False
    )
    with init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)
    model.tie_weights()  # else the map may put a tied lm_head on another device than its weight
    return model


def hf_no_split_modules(model: Any) -> list[str]:
    """The block classes a device map must keep whole (a decoder layer: its residual add)."""
    return list(getattr(model, "_no_split_modules", None) or [])


def auto_device_map(
    folder: str | os.PathLike[str], max_memory: Mapping[str, int | str], dtype: Any = None
) -> dict[str, str | int]:
    """accelerate's ``infer_auto_device_map`` for ``folder`` under ``max_memory``.

    ``max_memory`` maps devices ("mps", "cuda:0" or 0, "cpu", "disk") to byte budgets; modules
    fill the devices in that order, and what does not fit goes to "disk" (offload files).
    """
    from accelerate import infer_auto_device_map

    if not max_memory:
        raise ValueError("max_memory must name at least one device with a byte budget")
    model = empty_hf_model(folder, dtype)
    return dict(
        infer_auto_device_map(
            model,
            max_memory=dict(max_memory),
            no_split_module_classes=hf_no_split_modules(model),
            dtype=dtype or model.dtype,
        )
    )


def load_with_device_map(
    folder: str | os.PathLike[str],
    device_map: Mapping[str, str | int],
    offload_folder: str | os.PathLike[str],
    dtype: Any = None,
) -> Any:
    """The transformers model of ``folder`` placed by ``device_map``: loaded whole, then
    dispatched by accelerate (``dispatch_model``), which writes the "disk" modules' weights to
    ``offload_folder`` (a file per tensor) and hooks every offloaded module to read its weights
    in for its forward and drop them after. safetensors only.

    Why not ``from_pretrained(device_map=...)``: for a safetensors checkpoint it reads the
    offloaded weights in place from the checkpoint, a file the in-memory modules keep mapped, so
    their pages never leave the page cache and no pass can read them at disk speed. The whole
    model is loaded first (this machine holds it; the budget that forces the split is simulated).
    """
    import torch
    import transformers
    from accelerate import dispatch_model

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype or torch.float32,
        use_safetensors=True,
        local_files_only=True,
        trust_remote_code=False,
    )
    return dispatch_model(model, device_map=dict(device_map), offload_dir=os.fspath(offload_folder))


# --- section 3: a split model, timed: from the page cache and at disk speed ---------------------


def generate_fixed(model: Any, prompt: Any, new_tokens: int) -> Any:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (the same work for every placement:
    ``new_tokens`` forward passes, the prefill and one per further token)."""
    import torch

    with torch.inference_mode():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)


def page_cache_eviction_unavailable() -> str | None:
    """None where files can be dropped from the page cache (``posix_fadvise``), else why not."""
    if hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED"):
        return None
    return ("this platform has no posix_fadvise (macOS: fcntl's F_NOCACHE only bypasses the cache "
            "for reads through the descriptor that sets it, and accelerate opens the weight files "
            "itself), so the weights cannot be made to come from the disk")


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop ``paths``' pages from the OS page cache (``POSIX_FADV_DONTNEED``, after writing back
    any dirty page): their next read comes from the disk. Pages a live mapping holds may stay."""
    reason = page_cache_eviction_unavailable()
    if reason is not None:
        raise OSError(reason)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # a page not yet written back (a fresh file) is not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (Linux ``/proc/self/io``
    ``read_bytes``: page-cache hits do not count), or None where the kernel does not say."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def offload_files(offload_dir: str | os.PathLike[str]) -> list[Path]:
    """The files an offloaded forward reads its weights from: what accelerate wrote to
    ``offload_dir`` (:func:`load_with_device_map`)."""
    return sorted(p for p in Path(offload_dir).rglob("*") if p.is_file())


def offloaded_bytes(offload_dir: str | os.PathLike[str]) -> int:
    """Bytes of the offloaded weights as accelerate stored them (its tensor files, at the model's
    dtype, not its JSON index): what every forward pass must read back."""
    return sum(p.stat().st_size for p in offload_files(offload_dir) if p.suffix != ".json")


def _timed_generate(model: Any, prompt: Any, new_tokens: int, warmup: int, repeats: int,
                    evict: list[Path] | None = None) -> tuple[Any, Any, int | None]:
    """(the tokens of a first, untimed run; timing.measure's stats of further runs; bytes read
    from the disk per forward pass during them). With ``evict``, those files leave the page
    cache before every forward pass (a pre-hook on the model), so each pass reads them from disk."""
    from labkit.core import timing

    hook = None
    if evict is not None:
        hook = model.register_forward_pre_hook(lambda *_: evict_from_page_cache(evict))
    try:
        tokens = generate_fixed(model, prompt, new_tokens)
        before = disk_read_bytes()
        stats = timing.measure(lambda: generate_fixed(model, prompt, new_tokens), warmup=warmup,
                               repeats=repeats)
        after = disk_read_bytes()
    finally:
        if hook is not None:
            hook.remove()
    forwards = (warmup + repeats) * new_tokens
    per_forward = None if before is None or after is None else (after - before) // forwards
    return tokens, stats, per_forward


#: the placements of section 3, in the order they run
UNSPLIT, PAGE_CACHE, DISK_SPEED = "unsplit (cpu)", "cpu+disk, page cache", "cpu+disk, disk speed"


@dataclass
class Offload:
    """Section 3: the device map accelerate chose under ``budget`` and the timed generations."""

    budget: dict[str, int]  # max_memory: bytes per device
    device_map: dict[str, str | int]
    table: pd.DataFrame  # index placement; median_s, p10_s, p90_s, tok_s, n, disk_bytes_per_pass
    same_tokens: bool  # every split run generated exactly the unsplit one's tokens
    prompt: Any  # the random prompt both generated from, [1, prompt_tokens]
    offloaded_bytes: int  # the disk modules' weights as accelerate wrote them (:func:`offloaded_bytes`)
    disk_skipped: str | None = None  # why there is no disk-speed row, where there is none

    @property
    def disk_modules(self) -> list[str]:
        return sorted(k for k, v in self.device_map.items() if v == "disk")

    def slowdown(self, placement: str = PAGE_CACHE) -> float:
        """Unsplit tok/s over ``placement``'s tok/s: what offloading costs there."""
        return float(self.table.loc[UNSPLIT, "tok_s"] / self.table.loc[placement, "tok_s"])


def _split_and_whole(folder: Path, device_map: dict, offload_dir: Any) -> tuple[Any, Any]:
    """The model placed by ``device_map`` and the same model whole on the CPU (fp32)."""
    import warnings

    import torch
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split_model = load_with_device_map(folder, device_map, offload_dir)
        whole_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True, local_files_only=True)
    return split_model, whole_model


def offload_benchmark(
    folder: Path, config: Mapping[str, Any], cpu_share: float, prompt_tokens: int,
    new_tokens: int, warmup: int, repeats: int, offload_dir: str | os.PathLike[str],
) -> Offload:
    """Split ``folder``'s model over "cpu" (``cpu_share`` of its fp32 bytes) and "disk", and time
    ``generate`` unsplit, split with the offloaded weights in the page cache (as the OS leaves
    them after the first pass), and split with them evicted before every forward pass (read at
    disk speed; where the platform allows). transformers' implementation, fp32, one random prompt.
    """
    import pandas as pd
    import torch

    fp32_bytes = weights_bytes(config, "fp32")
    budget = {"cpu": int(cpu_share * fp32_bytes), "disk": 100 * fp32_bytes}
    device_map = auto_device_map(folder, budget)
    if not {"cpu", "disk"} <= set(device_map.values()):
        raise ValueError(f"budget {budget} did not force a split: {device_map}")
    split_model, whole_model = _split_and_whole(folder, device_map, offload_dir)
    prompt = torch.randint(3, config["vocab_size"], (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    skipped = page_cache_eviction_unavailable()
    runs = [(UNSPLIT, whole_model, None), (PAGE_CACHE, split_model, None)]
    if skipped is None:
        runs.append((DISK_SPEED, split_model, offload_files(offload_dir)))
    rows, outputs = [], {}
    for placement, model, evict in runs:
        outputs[placement], stats, per_pass = _timed_generate(model, prompt, new_tokens, warmup,
                                                              repeats, evict)
        rows.append(dict(placement=placement, median_s=stats.median, p10_s=stats.p10,
                         p90_s=stats.p90, tok_s=new_tokens / stats.median, n=stats.n,
                         disk_bytes_per_pass=per_pass))
    same = all(torch.equal(outputs[UNSPLIT], out) for out in outputs.values())
    return Offload(budget, device_map, pd.DataFrame(rows).set_index("placement"), same, prompt,
                   offloaded_bytes(offload_dir), skipped)


def _int_or_none(x: Any) -> int | None:
    """An int, or None for a missing number (None or NaN in a table)."""
    return None if x is None or x != x else int(x)


def record_offload(off: Offload, model: str, cpu_share: float, new_tokens: int) -> None:
    """Median generation tok/s of each placement, with the budget, the disk modules and the
    bytes each forward pass read from the disk."""
    import torch

    results.record_many([
        dict(study=STUDY, metric="offload_tok_s", value=r.tok_s, unit="tokens/s",
             runtime="transformers+accelerate", device="cpu", model=model,
             params=dict(placement=placement, max_memory_cpu=off.budget["cpu"], cpu_share=cpu_share,
                         disk_modules=len(off.disk_modules) if placement != UNSPLIT else 0,
                         weights_read="disk" if placement == DISK_SPEED else "memory",
                         disk_bytes_per_pass=_int_or_none(r.disk_bytes_per_pass),
                         offloaded_bytes=off.offloaded_bytes,
                         prompt_tokens=off.prompt.shape[1], new_tokens=new_tokens, dtype="float32",
                         stat="median", threads=torch.get_num_threads(), repeats=int(r.n),
                         p10_s=r.p10_s, p90_s=r.p90_s))
        for placement, r in off.table.iterrows()
    ])


def plot_offload(table: pd.DataFrame, new_tokens: int, model: str) -> Figure:
    """Median tok/s of each placement, whiskers from the p10 and p90 times; each bar says where
    its weights were read from."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(8, 4.5))
    colors = [plotting.COLORS[i] for i in range(len(table))]
    ax.bar(table.index, table.tok_s, color=colors, capsize=4,
           yerr=[table.tok_s - new_tokens / table.p90_s, new_tokens / table.p10_s - table.tok_s])
    for x, r in enumerate(table.itertuples()):
        read = r.disk_bytes_per_pass
        note = "" if read is None or read != read else f"\n{plotting.format_bytes(read)}/pass from disk"
        ax.annotate(f"{r.tok_s:.1f} tok/s{note}", (x, r.tok_s), textcoords="offset points",
                    xytext=(0, 4), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.3 * float(table.tok_s.max()))
    ax.set_xlabel("placement of the weights (device map; where the offloaded weights are read from)")
    ax.set_ylabel("generation speed (new tokens/s, median)")
    ax.set_title(f"{model}: accelerate disk offload vs unsplit, {new_tokens} new tokens")
    return fig


def mps_offload(
    folder: Path, config: Mapping[str, Any], prompt: Any, cpu_share: float, new_tokens: int,
    warmup: int, repeats: int, offload_dir: str | os.PathLike[str], model: str,
) -> tuple[dict[str, str | int], float]:
    """(the map over "mps" (``cpu_share`` of the fp32 bytes) + "cpu", its median tok/s, recorded)
    on ``prompt``; macOS on Apple silicon only."""
    import warnings

    import torch

    from labkit.core import timing

    fp32_bytes = weights_bytes(config, "fp32")
    mps_map = auto_device_map(folder, {"mps": int(cpu_share * fp32_bytes), "cpu": 100 * fp32_bytes})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mps_model = load_with_device_map(folder, mps_map, offload_dir)
    stats = timing.measure(lambda: generate_fixed(mps_model, prompt, new_tokens), warmup=warmup,
                           repeats=repeats, sync=timing.device_sync("mps"))
    tok_s = new_tokens / stats.median
    results.record(STUDY, "offload_tok_s", tok_s, "tokens/s", runtime="transformers+accelerate",
                   device="mps", model=model,
                   params=dict(placement="mps+cpu", max_memory_mps=int(cpu_share * fp32_bytes),
                               prompt_tokens=prompt.shape[1], new_tokens=new_tokens,
                               dtype="float32", stat="median", threads=torch.get_num_threads(),
                               repeats=stats.n))
    return mps_map, tok_s


# --- what the numbers say ------------------------------------------------------------------------


def read_from_disk(off: Offload) -> bool:
    """Did each disk-speed forward pass read at least the offloaded weights' bytes from storage?

    The kernel counts whole pages fetched, so a pass that read every offloaded tensor from the
    disk counts at least their bytes; a page-cache hit counts nothing.
    """
    if DISK_SPEED not in off.table.index:
        return False
    read = off.table.loc[DISK_SPEED, "disk_bytes_per_pass"]
    return read is not None and read == read and read >= off.offloaded_bytes


def describe_offload(off: Offload) -> str:
    """The placements' speeds, the slowdowns, and what the disk-speed passes read from storage."""
    from labkit.core import plotting

    t = off.table
    lines = [f"{len(off.disk_modules)} of {len(off.device_map)} modules on disk "
             f"({plotting.format_bytes(off.offloaded_bytes)} of offloaded weights); "
             f"same greedy tokens in every placement: {off.same_tokens}",
             f"unsplit {t.loc[UNSPLIT, 'tok_s']:.2f} tok/s; split, page cache "
             f"{t.loc[PAGE_CACHE, 'tok_s']:.2f} tok/s ({off.slowdown():.2f}x slower)"]
    if off.disk_skipped:
        lines.append(f"offload at disk speed not measured: {off.disk_skipped}")
    else:
        d, c = t.loc[DISK_SPEED], t.loc[PAGE_CACHE]
        passes = d.tok_s * d.median_s  # new tokens = forward passes per generate
        extra = (d.median_s - c.median_s) / passes
        rate = f"{d.disk_bytes_per_pass / extra / 1e9:.2f} GB/s" if extra > 0 else "n/a"
        lines.append(f"split, disk speed {d.tok_s:.2f} tok/s ({off.slowdown(DISK_SPEED):.2f}x "
                     f"slower than unsplit), reading {plotting.format_bytes(d.disk_bytes_per_pass)} "
                     f"from the disk per forward pass (implied read rate over the page-cache run: "
                     f"{rate})")
    return "\n".join(lines)


def weights_by_precision(plans: pd.DataFrame) -> pd.DataFrame:
    """Weight bytes, model x precision."""
    return plans.drop_duplicates(["model", "precision"]).pivot(
        index="model", columns="precision", values="weights_bytes")


def smallest_macs(plans: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """(smallest Mac GB, model x precision, at each model's largest planned context; that context)."""
    largest = plans.loc[plans.groupby(["model", "precision"]).context.idxmax()]
    verdict = largest.pivot(index="model", columns="precision", values="smallest_mac_gb")
    return verdict, largest.drop_duplicates("model").set_index("model").context
