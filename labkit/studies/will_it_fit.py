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
(:func:`offload_benchmark`, :func:`mps_offload`).
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

    _, folder, _ = resolve(model)
    name = "tiny-llama" if model == "tiny-llama" else folder.name
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
BUDGET_NOTE = "default GPU working set (approx. 2/3 <= 36 GB, 3/4 above)"


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
    """GiB of weights, KV cache and activations per model and precision at ``context`` (or the
    model's window, if shorter): the bars of :func:`plot_plan`."""
    import pandas as pd

    rows = []
    for name, cfg in configs.items():
        ctx = min(context, window_of(cfg, context))
        for precision in precisions:
            p = plan(cfg, precision, ctx, batch, kv_precision=kv_precision, name=name)
            rows.append(dict(label=f"{label(name)} {precision} @{ctx}", weights=p.weights_bytes / GiB,
                             kv=p.kv_bytes / GiB, act=p.activation_bytes / GiB))
    return pd.DataFrame(rows)


def plot_plan(fig_df: pd.DataFrame, batch: int, kv_precision: str) -> Figure:
    """Stacked bars (weights, KV cache, activations) against the GPU budget of each Mac in range."""
    import numpy as np

    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(10, 0.32 * len(fig_df) + 1.5))
    y = np.arange(len(fig_df))[::-1]
    left = np.zeros(len(fig_df))
    for col, name in (("weights", "weights"), ("kv", f"KV cache ({kv_precision})"),
                      ("act", "activations (estimate)")):
        ax.barh(y, fig_df[col], left=left, label=name)
        left += fig_df[col].to_numpy()
    for gb in chips.MAC_MEMORY_GB:
        budget = chips.mac_gpu_budget_bytes(gb) / GiB
        if budget <= left.max() * 1.15:
            ax.axvline(budget, color="grey", linestyle=":", linewidth=1)
            ax.text(budget, y.max() + 1.7, f"{gb} GB Mac", rotation=90, fontsize=7, va="top",
                    ha="right", color="dimgrey")
    ax.set_ylim(y.min() - 0.7, y.max() + 1.8)
    ax.set_yticks(y, fig_df.label, fontsize=8)
    ax.set_xlabel("memory (GiB); dotted: default GPU budget of a Mac (approx.)")
    ax.set_ylabel("model, precision @ context (tokens)")
    ax.set_title(f"Will it fit? Weights + KV cache + activations (batch {batch})")
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
    """The transformers model of ``folder`` placed by ``device_map`` (accelerate hooks move each
    offloaded block's weights in for its forward and out after). safetensors only."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder,
        device_map=dict(device_map),
        offload_folder=os.fspath(offload_folder),
        dtype=dtype or torch.float32,
        use_safetensors=True,
        local_files_only=True,
        trust_remote_code=False,
    )


# --- section 3: a split model, timed -------------------------------------------------------------


def generate_fixed(model: Any, prompt: Any, new_tokens: int) -> Any:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (the same work for every placement)."""
    import torch

    with torch.inference_mode():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)


def _timed_generate(model: Any, prompt: Any, new_tokens: int, warmup: int, repeats: int,
                    sync: Any = None) -> tuple[Any, Any]:
    """(the tokens of a first, untimed run; timing.measure's stats of further runs)."""
    from labkit.core import timing

    tokens = generate_fixed(model, prompt, new_tokens)
    stats = timing.measure(lambda: generate_fixed(model, prompt, new_tokens), warmup=warmup,
                           repeats=repeats, sync=sync)
    return tokens, stats


@dataclass
class Offload:
    """Section 3: the device map accelerate chose under ``budget`` and the timed generations."""

    budget: dict[str, int]  # max_memory: bytes per device
    device_map: dict[str, str | int]
    table: pd.DataFrame  # index placement; median_s, p10_s, p90_s, tok_s, n
    same_tokens: bool  # the split model generated exactly the unsplit one's tokens
    prompt: Any  # the random prompt both generated from, [1, prompt_tokens]

    @property
    def disk_modules(self) -> list[str]:
        return sorted(k for k, v in self.device_map.items() if v == "disk")

    @property
    def slowdown(self) -> float:
        """Unsplit tok/s over split tok/s: what offloading to disk costs."""
        return float(self.table.loc["unsplit (cpu)", "tok_s"] / self.table.loc["cpu+disk", "tok_s"])


def offload_benchmark(
    folder: Path, config: Mapping[str, Any], cpu_share: float, prompt_tokens: int,
    new_tokens: int, warmup: int, repeats: int, offload_dir: str | os.PathLike[str],
) -> Offload:
    """Split ``folder``'s model over "cpu" (``cpu_share`` of its fp32 bytes) and "disk", and time
    ``generate`` split and unsplit (transformers' implementation, fp32) on one random prompt."""
    import warnings

    import pandas as pd
    import torch
    import transformers

    fp32_bytes = weights_bytes(config, "fp32")
    budget = {"cpu": int(cpu_share * fp32_bytes), "disk": 100 * fp32_bytes}
    device_map = auto_device_map(folder, budget)
    if not {"cpu", "disk"} <= set(device_map.values()):
        raise ValueError(f"budget {budget} did not force a split: {device_map}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split_model = load_with_device_map(folder, device_map, offload_dir)
        whole_model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True, local_files_only=True)
    prompt = torch.randint(3, config["vocab_size"], (1, prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    rows, outputs = [], {}
    for placement, model in (("unsplit (cpu)", whole_model), ("cpu+disk", split_model)):
        outputs[placement], stats = _timed_generate(model, prompt, new_tokens, warmup, repeats)
        rows.append(dict(placement=placement, median_s=stats.median, p10_s=stats.p10,
                         p90_s=stats.p90, tok_s=new_tokens / stats.median, n=stats.n))
    same = torch.equal(outputs["unsplit (cpu)"], outputs["cpu+disk"])
    return Offload(budget, device_map, pd.DataFrame(rows).set_index("placement"), same, prompt)


def record_offload(off: Offload, model: str, cpu_share: float, new_tokens: int) -> None:
    """Median generation tok/s of each placement, with the budget and the disk modules."""
    import torch

    results.record_many([
        dict(study=STUDY, metric="offload_tok_s", value=r.tok_s, unit="tokens/s",
             runtime="transformers+accelerate", device="cpu", model=model,
             params=dict(placement=placement, max_memory_cpu=off.budget["cpu"], cpu_share=cpu_share,
                         disk_modules=len(off.disk_modules) if placement != "unsplit (cpu)" else 0,
                         prompt_tokens=off.prompt.shape[1], new_tokens=new_tokens, dtype="float32",
                         stat="median", threads=torch.get_num_threads(), repeats=int(r.n),
                         p10_s=r.p10_s, p90_s=r.p90_s))
        for placement, r in off.table.iterrows()
    ])


def plot_offload(table: pd.DataFrame, new_tokens: int, model: str) -> Figure:
    """Median tok/s of each placement, whiskers from the p10 and p90 times."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    ax.bar(table.index, table.tok_s, yerr=[table.tok_s - new_tokens / table.p90_s,
                                           new_tokens / table.p10_s - table.tok_s], capsize=4)
    ax.set_xlabel("placement of the weights (device map)")
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


def weights_by_precision(plans: pd.DataFrame) -> pd.DataFrame:
    """Weight bytes, model x precision."""
    return plans.drop_duplicates(["model", "precision"]).pivot(
        index="model", columns="precision", values="weights_bytes")


def smallest_macs(plans: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """(smallest Mac GB, model x precision, at each model's largest planned context; that context)."""
    largest = plans.loc[plans.groupby(["model", "precision"]).context.idxmax()]
    verdict = largest.pivot(index="model", columns="precision", values="smallest_mac_gb")
    return verdict, largest.drop_duplicates("model").set_index("model").context
