"""Study of notebook 04 (Swift port parity): how close the Swift port's numbers are to PyTorch's,
and how fast it decodes beside PyTorch eager and llama.cpp.

The method is llm.c's test_gpt2: PyTorch (transformers in float32) computes a reference run with
:func:`labkit.ports.swift.reference`, the port (the ``lmport`` CLI, :func:`labkit.ports.swift.run`)
computes the same thing, and the two are compared step by step and layer by layer. Each model is
stored two ways, float32 and float16; both sides compute in float32, so the float16 rows show what
half-precision storage costs, and :func:`port_only_error` separates the port's own error from the
rounding of the weights.

Errors are teacher-forced: both sides are fed the reference's greedy tokens, so a step compares
the same context even after a float16 model picks a different token.

Speed: the Swift CLI and labkit's own eager PyTorch model (:func:`torch_model`) decode the same
prompt at the same thread counts, alternating so that a change in the machine's load hits both;
llama.cpp's F32 path on the same weights (the prebuilt xllamacpp wheel) joins the comparison.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from labkit.core import results, timing
from labkit.core.skips import skip
from labkit.models.config import LlamaConfig, load_config
from labkit.models.loader import weight_files
from labkit.ports import swift as swiftport

STUDY = "04_swift_port_parity"
FIGURES = {
    "per_layer": f"{STUDY}-per-layer",
    "per_step": f"{STUDY}-per-step",
    "decode_speed": f"{STUDY}-decode-speed",
}
DTYPES = ("float32", "float16")
RUNTIME_LABELS = {
    "torch": "PyTorch eager (labkit)",
    "swift": "Swift port",
    "llama.cpp": "llama.cpp F32",
}
RUNTIME_IMPL = {
    "torch": "labkit eager",
    "swift": "lmport (OpenBLAS/Accelerate)",
    "llama.cpp": "xllamacpp (prebuilt llama.cpp) in process, GGUF F32",
}
LLAMA_CPP_TARGET = 1.3  # Swift's decode within this factor of llama.cpp F32's


def quiet_libraries() -> None:
    """Silence transformers' progress bars and deprecation notices, which would bury the
    outputs of a notebook that loads a dozen models, and tqdm's notice that ipywidgets is
    missing (it falls back to text bars)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import tqdm.auto  # noqa: F401  (warns once, on first import)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _progress(items: Any, desc: str) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without ipywidgets tqdm.auto says so, then uses text bars
        from tqdm.auto import tqdm
    return tqdm(items, desc=desc)


# --- the models ---------------------------------------------------------------------------------


@dataclass
class CheckedModel:
    """A model whose port is checked: where its weights come from, and (after
    :func:`store_both_ways`) its float32 and float16 copies and the prompt both sides decode."""

    label: str
    arch: str
    source: Path
    model: str
    note: str
    stored: str = ""  # the dtype the source folder stores
    dirs: dict[str, Path] = field(default_factory=dict)  # dtype -> converted folder
    prompt: list[int] = field(default_factory=list)


def models_to_check(model: str, phi_path: str, work: Path, seed: int) -> dict[str, CheckedModel]:
    """The Llama ``model`` (a tiny random GQA Llama stands in when it is absent), a tiny random
    Phi with Phi-2's partial rotary, and a real Phi-2 when ``phi_path`` names one."""
    models: dict[str, CheckedModel] = {}
    llama_dir = swiftport.model_folder(model)
    if llama_dir is not None:
        models["llama"] = CheckedModel("llama", "llama", llama_dir, model, f"{model} ({llama_dir})")
    else:
        skip(f"parity on {model}", f"{model} is not in data/models here; a tiny random Llama (GQA) stands in")
        source = swiftport.tiny_llama(work / "tiny-random-llama", seed=seed)
        models["llama"] = CheckedModel(
            "llama", "llama", source, "tiny-random-llama", "tiny random Llama, GQA 4:2 (stand-in)"
        )
    source = swiftport.tiny_phi(work / "tiny-random-phi", seed=seed)
    models["phi"] = CheckedModel(
        "phi", "phi", source, "tiny-random-phi", "tiny random Phi, partial rotary 0.4"
    )
    if phi_path:
        phi2 = swiftport.model_folder(phi_path)
        if phi2 is None:
            raise FileNotFoundError(
                f"PHI_PATH={phi_path!r}: expected a folder with config.json and *.safetensors"
            )
        models["phi-2"] = CheckedModel("phi-2", "phi", phi2, phi2.name, f"Phi-2 from {phi2}")
    else:
        skip("parity on a real Phi-2", "PHI_PATH is empty (no Phi-2 weights ship with the lab)")
    return models


def store_both_ways(m: CheckedModel, work: Path, seed: int) -> CheckedModel:
    """Write ``m``'s float32 and float16 copies under ``work`` and choose its prompt."""
    m.stored = swiftport.weights_dtype(m.source)
    m.dirs = {d: swiftport.convert_weights(m.source, work / f"{m.label}-{d}", d) for d in DTYPES}
    m.prompt = swiftport.prompt_for(m.source, seed=seed)
    return m


# --- parity -------------------------------------------------------------------------------------


def first_mismatch(a: Any, b: Any) -> int:
    """Steps until the two token lists first differ (their length if they never do)."""
    a, b = np.asarray(a), np.asarray(b)
    diff = np.nonzero(a != b)[0]
    return int(diff[0]) if diff.size else int(len(a))


def step_errors(label: str, dtype: str, logits: np.ndarray, ref: np.ndarray) -> list[dict]:
    """Per decode step: max |logit - reference| over the vocabulary, absolute and relative to
    the step's max |reference logit|."""
    d = np.abs(logits.astype(np.float64) - ref)
    scale = np.abs(ref).max(axis=1)
    return [
        dict(model=label, dtype=dtype, step=s, max_abs=d[s].max(), rel=d[s].max() / scale[s])
        for s in range(len(d))
    ]


def layer_errors(label: str, dtype: str, hidden: np.ndarray, ref: Any) -> list[dict]:
    """Per decoder layer: max |h - h_ref| of the hidden state after it, over all positions,
    absolute and relative to max |h_ref|. ``ref`` is a :class:`~labkit.ports.refdump.RefDump`."""
    rows = []
    for k, layer in enumerate(ref.layer_indices):
        h = np.abs(hidden[layer].astype(np.float64) - ref.hidden[k])
        rows.append(dict(model=label, dtype=dtype, layer=layer, max_abs=h.max(),
                         rel=h.max() / np.abs(ref.hidden[k]).max()))
    return rows


def port_only_error(
    m: CheckedModel, dtype: str, logits: np.ndarray, ref: Any, steps: int, logit_n: int
) -> float:
    """The port against PyTorch on the *same* stored weights, over the first ``logit_n`` steps:
    the port's own error, without the rounding of the weights."""
    if dtype == "float32" or m.stored == dtype:
        same = ref  # the reference ran on these very weights
    else:
        same = swiftport.reference(m.dirs[dtype], m.prompt, steps, force=ref.greedy_tokens[:-1])
    return np.abs(logits.astype(np.float64) - same.logits)[:logit_n].max()


def parity_of(m: CheckedModel, steps: int, logit_n: int) -> tuple[list, list, list]:
    """(layer rows, step rows, summary rows) of one model, both weight dtypes: the reference
    greedy run, then the port free-running and teacher-forced on each stored copy."""
    ref = swiftport.reference(m.dirs["float32"], m.prompt, steps)
    forced = ref.greedy_tokens[:-1]
    layer_rows, step_rows, summary_rows = [], [], []
    for dtype, folder in m.dirs.items():
        free = swiftport.run(folder, m.prompt, steps)
        tf = swiftport.run(folder, m.prompt, steps, dump=True, dump_hidden=True, force=forced)
        step_rows += step_errors(m.label, dtype, tf.logits, ref.logits)
        layer_rows += layer_errors(m.label, dtype, tf.hidden, ref)
        d = np.abs(tf.logits.astype(np.float64) - ref.logits)
        summary_rows.append(dict(
            model=m.label, arch=m.arch, dtype=dtype,
            max_abs_logit_err=d[:logit_n].max(), max_abs_logit_err_all=d.max(),
            port_only_err=port_only_error(m, dtype, tf.logits, ref, steps, logit_n),
            greedy_agreement_pct=100.0 * first_mismatch(free.tokens, ref.greedy_tokens) / steps,
            teacher_forced_top1_pct=100.0 * np.mean(np.asarray(tf.tokens) == ref.greedy_tokens),
            first_divergence=first_mismatch(free.tokens, ref.greedy_tokens),
            min_top2_margin=ref.meta["min_top2_margin"],
        ))
    return layer_rows, step_rows, summary_rows


def parity_tables(
    models: dict[str, CheckedModel], steps: int, logit_n: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per-layer errors, per-step errors, one summary row per model and weight dtype); empty
    tables for no models."""
    layer_rows, step_rows, summary_rows = [], [], []
    for m in _progress(models.values(), "parity"):
        layers, steps_, summary = parity_of(m, steps, logit_n)
        layer_rows += layers
        step_rows += steps_
        summary_rows += summary
    return pd.DataFrame(layer_rows), pd.DataFrame(step_rows), pd.DataFrame(summary_rows)


def record_parity(summary: pd.DataFrame, steps: int, logit_n: int) -> None:
    """Each summary row's logit error (first ``logit_n`` steps) and free-running agreement."""
    for r in summary.itertuples():
        params = dict(arch=r.arch, dtype=r.dtype, steps=logit_n, model=r.model,
                      reference="transformers float32 on float32 weights, teacher-forced")
        results.record(STUDY, "max_abs_logit_err", float(r.max_abs_logit_err), "logit",
                       runtime="swift", device="cpu", model=r.model, params=params)
        results.record(STUDY, "greedy_agreement_pct", float(r.greedy_agreement_pct), "%",
                       runtime="swift", device="cpu", model=r.model,
                       params=dict(arch=r.arch, dtype=r.dtype, steps=steps, model=r.model,
                                   mode="free-running"))


def error_growth(layers: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """Per model and weight dtype: the error after the last layer over the error after the
    first (absolute and relative), and the mean error of the last quarter of the decode steps
    over the first quarter's."""
    rows = []
    if layers.empty:
        return pd.DataFrame(rows)
    for (label, dtype), g in layers.groupby(["model", "dtype"], sort=False):
        s = steps[(steps.model == label) & (steps.dtype == dtype)].sort_values("step")
        q = max(len(s) // 4, 1)
        rows.append(dict(model=label, dtype=dtype,
                         depth_growth=g.max_abs.iloc[-1] / g.max_abs.iloc[0],
                         rel_depth_growth=g.rel.iloc[-1] / g.rel.iloc[0],
                         step_growth=s.max_abs.iloc[-q:].mean() / s.max_abs.iloc[:q].mean()))
    return pd.DataFrame(rows)


# --- the parity figures -------------------------------------------------------------------------


def _two_panels(df: pd.DataFrame, x: str, **line: Any) -> tuple[Any, Any]:
    """Absolute (left) and relative (right) error against ``x``, one line per model and dtype:
    solid for float32 weights, dashed for float16."""
    from labkit.core import plotting

    fig, axes = plotting.new_figure(1, 2, figsize=(11, 4))
    for (label, dtype), g in df.groupby(["model", "dtype"], sort=False):
        style = "-" if dtype == "float32" else "--"
        axes[0].plot(g[x], g.max_abs, style, label=f"{label} {dtype}", **line)
        axes[1].plot(g[x], g.rel, style, label=f"{label} {dtype}", **line)
    return fig, axes


def plot_per_layer(layers: pd.DataFrame) -> Any:
    """The hidden-state error after each decoder layer, teacher-forced."""
    fig, axes = _two_panels(layers, "layer", marker="o")
    for ax, what in zip(axes, ["max |h − h_ref|", "max |h − h_ref| / max |h_ref|"], strict=True):
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer (hidden state after it)")
        ax.set_ylabel(what + " (float32 units)" if ax is axes[0] else what + " (ratio)")
        ax.legend(fontsize=8)
    axes[0].set_title("Per-layer error, absolute")
    axes[1].set_title("Per-layer error, relative")
    fig.suptitle("Swift port vs PyTorch float32: hidden states, teacher-forced")
    return fig


def plot_per_step(steps: pd.DataFrame, logit_tol: float, logit_n: int) -> Any:
    """The logit error of each decode step, with the tolerance and the last step it covers."""
    fig, axes = _two_panels(steps, "step", linewidth=1)
    axes[0].axhline(logit_tol, color="black", linestyle=":", label=f"tolerance {logit_tol:g}")
    axes[0].axvline(logit_n - 0.5, color="grey", linestyle=":", linewidth=1)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("decode step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("max |logit − reference| (logits)")
    axes[1].set_ylabel("max |Δlogit| / max |reference logit| (ratio)")
    axes[0].set_title("Per-step logit error, absolute")
    axes[1].set_title("Per-step logit error, relative")
    fig.suptitle("Swift port vs PyTorch float32: logits, teacher-forced")
    return fig


# --- decode speed -------------------------------------------------------------------------------


def shipped_shape_llama(out: str | os.PathLike[str], dtype: str = "float32", seed: int = 0) -> Path:
    """A random Llama of the shipped tiny-llama's configuration (labkit.train's "shipped" config
    through the trainer's own llama_config: hidden 512, 8 layers, 8 heads / 2 KV heads, SwiGLU
    1408, tied embeddings, vocab 8192): a stand-in for speed measurements (decode speed does not
    depend on the weights' values) while data/models/tiny-llama is absent."""
    from transformers import LlamaConfig as HFLlamaConfig

    from labkit.train.configs import CONFIGS
    from labkit.train.loop import llama_config
    from labkit.train.tokenizer import DEFAULT_VOCAB_SIZE

    config = llama_config(CONFIGS["shipped"], DEFAULT_VOCAB_SIZE).to_hf_dict()
    return swiftport.random_model(out, HFLlamaConfig(**config), dtype, seed)


def speed_model(model: str, work: Path, seed: int) -> tuple[Path, str]:
    """(float32 folder, name) of the model both runtimes decode: ``model``, or a random Llama of
    the shipped shape when it is absent."""
    source, name = swiftport.model_folder(model), model
    if source is None:
        skip(f"speed on {model}", f"{model} is absent; a random Llama of the shipped shape stands in")
        source = shipped_shape_llama(work / "shipped-shape-llama", seed=seed)
        name = "shipped-shape-random-llama"
    return swiftport.convert_weights(source, work / "speed-float32", "float32"), name


def torch_model(model_dir: str | os.PathLike[str]) -> Any:
    """labkit's own eager PyTorch model (labkit.models.llama / phi) for ``model_dir``, float32,
    eval mode: the "PyTorch eager" side of the speed comparison. Needs no tokenizer.json."""
    import torch
    from safetensors.torch import load_file

    from labkit.models.llama import Llama
    from labkit.models.phi import Phi

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    model = (Llama if isinstance(config, LlamaConfig) else Phi)(config)
    state: dict[str, Any] = {}
    for f in weight_files(model_dir):
        state.update({k: v.to(torch.float32) for k, v in load_file(str(f)).items()})
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=True)
    return model.eval()


def torch_decode_timing(model: Any, prompt: list[int], steps: int) -> timing.GenerationTiming:
    """Time greedy decoding of ``steps`` tokens with labkit's KV-cached eager model at the
    current torch.get_num_threads() (tpot_s: one latency per decode step, prefill excluded, as
    the Swift CLI reports its decode time)."""
    import torch

    from labkit.inference.kv_cache import KVCache

    with torch.inference_mode():
        cache = KVCache.for_model(model, max_len=len(prompt) + steps)
        ids = torch.tensor([prompt], dtype=torch.long)

        def prefill() -> Any:
            return model(ids, cache=cache)[:, -1].argmax(-1, keepdim=True)

        def decode_step(token: Any) -> Any:
            return model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)

        measured, _ = timing.time_generation(prefill, decode_step, steps)
    return measured


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): how busy this shared CPU was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def rate_row(runtime: str, threads: int, per_token: list[float]) -> dict:
    """Decode tokens/s from seconds per decode token: the median, and the p10-p90 band."""
    stats = timing.Stats.from_samples(per_token)
    return dict(runtime=runtime, threads=threads, tok_s=1 / stats.median,
                tok_s_p10=1 / stats.p90, tok_s_p90=1 / stats.p10)


def time_swift_and_torch(
    folder: Path, prompt: list[int], threads: list[int], steps: int, repeats: int
) -> list[dict]:
    """Swift CLI and PyTorch eager decode rates at each thread count, ``repeats`` generations
    each, alternating between the two (after one warm-up each: page cache, BLAS threads)."""
    import torch

    model = torch_model(folder)
    threads_before = torch.get_num_threads()
    rows = []
    try:
        for n in _progress(threads, "threads"):
            torch.set_num_threads(n)
            swiftport.run(folder, prompt, 4, threads=n)
            torch_decode_timing(model, prompt, 4)
            samples: dict[str, list[float]] = {"swift": [], "torch": []}
            for _ in range(repeats):
                r = swiftport.run(folder, prompt, steps, threads=n)
                if r.threads not in (None, n):
                    raise RuntimeError(f"OpenBLAS used {r.threads} threads, asked for {n}")
                samples["swift"].append(r.decode_s / (steps - 1))
                t = torch_decode_timing(model, prompt, steps)
                samples["torch"].append(sum(t.tpot_s) / len(t.tpot_s))
            rows += [rate_row(runtime, n, per_token) for runtime, per_token in samples.items()]
    finally:
        torch.set_num_threads(threads_before)
    return rows


def llama_cpp_missing(swift_missing: str | None, folder: Path | None = None) -> str | None:
    """Why llama.cpp is not compared here: no Swift to compare with, llama.cpp not installed,
    or a model folder without tokenizer.json (a GGUF file carries its tokenizer)."""
    from labkit.runtimes.llamacpp_rt import LlamaCppF32

    if swift_missing is not None:
        return swift_missing
    if folder is not None and not (Path(folder) / "tokenizer.json").is_file():
        return f"{folder.name} has no tokenizer.json, which a GGUF file needs"
    return LlamaCppF32.available()


def time_llama_cpp(
    folder: Path, prompt: list[int], threads: list[int], steps: int, repeats: int
) -> list[dict]:
    """llama.cpp's F32 decode rate on the same weights (exported to GGUF), timed step by step."""
    from labkit.runtimes.llamacpp_rt import LlamaCppF32

    rows = []
    for n in _progress(threads, "llama.cpp threads"):
        rt = LlamaCppF32(threads=n)
        rt.load(folder)
        rt.timed_generate(prompt, 4)  # warm-up
        per_token = [run.decode_total_s / len(run.decode_s)
                     for run in (rt.timed_generate(prompt, steps) for _ in range(repeats))]
        rt.close()
        rows.append(rate_row("llama.cpp", n, per_token))
    return rows


def speed_ratios(speed: pd.DataFrame) -> pd.DataFrame:
    """Median tok/s per thread count (rows) and runtime (columns), and Swift's ratio to each."""
    ratio = speed.pivot(index="threads", columns="runtime", values="tok_s")
    ratio["swift / torch"] = ratio["swift"] / ratio["torch"]
    if "llama.cpp" in ratio:
        ratio["swift / llama.cpp"] = ratio["swift"] / ratio["llama.cpp"]
    return ratio


def record_speed(
    speed: pd.DataFrame, model: str, steps: int, repeats: int, loads: tuple[float, float]
) -> None:
    """Each runtime's decode rate, with the higher of the load averages before and after.

    The Swift rows also name the BLAS the port ran on and the thread environment it was given
    (``swiftport.blas_thread_env``): on a Mac that is Accelerate, capped through
    VECLIB_MAXIMUM_THREADS rather than by a thread count OpenBLAS reports back.
    """
    for r in speed.itertuples():
        params = dict(runtime=r.runtime, threads=int(r.threads), steps=steps, dtype="float32",
                      repeats=repeats, load_avg_1m=round(max(loads), 1),
                      impl=RUNTIME_IMPL[r.runtime])
        if r.runtime == "swift":
            params["blas"] = swiftport.port_blas()
            params["thread_env"] = swiftport.blas_thread_env(int(r.threads))
        results.record(STUDY, "decode_tok_s", float(r.tok_s), "tok/s", runtime=r.runtime,
                       device="cpu", model=model, params=params)


def plot_decode_speed(speed: pd.DataFrame, threads: list[int], model: str) -> Any:
    """Decode tokens/s per runtime and thread count: median bars, p10-p90 whiskers."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    present = [rt for rt in RUNTIME_LABELS if rt in set(speed.runtime)]
    width = 0.8 / len(present)
    for i, runtime in enumerate(present):
        g = speed[speed.runtime == runtime]
        x = np.arange(len(g)) + (i - (len(present) - 1) / 2) * width
        ax.bar(x, g.tok_s, width, label=RUNTIME_LABELS[runtime])
        ax.errorbar(x, g.tok_s, yerr=[g.tok_s - g.tok_s_p10, g.tok_s_p90 - g.tok_s],
                    fmt="none", color="black")
    ax.set_xticks(np.arange(len(threads)), [str(n) for n in threads])
    ax.set_xlabel("threads (torch.set_num_threads / OpenBLAS)")
    ax.set_ylabel("decode tokens/s (median, p10–p90)")
    ax.set_title(f"Decode speed, {model}, float32")
    ax.legend()
    return fig


# --- what the numbers say -----------------------------------------------------------------------


Claims = list[tuple[str, bool, str]]  # (claim, verdict, the value it rests on): labkit.core.claims


def float32_claims(f32: pd.DataFrame, logit_n: int, steps: int, tol: float) -> Claims:
    """Per model: the port's float32 logits within ``tol`` and its greedy tokens PyTorch's; and
    that both architectures were checked."""
    rows: Claims = []
    for r in f32.itertuples():
        rows.append((f"{r.model}: the Swift port computes PyTorch's float32 logits within {tol:g} "
                     f"over the first {logit_n} steps", bool(r.max_abs_logit_err <= tol),
                     f"max |dlogit| {r.max_abs_logit_err:.1e} ({r.max_abs_logit_err_all:.1e} over {steps})"))
        rows.append((f"{r.model}: the Swift port chooses PyTorch's greedy token at each of {steps} steps",
                     bool(r.greedy_agreement_pct == 100.0), f"{r.greedy_agreement_pct:.0f} % agreement"))
    archs = sorted(set(f32.arch))
    rows.append(("both architectures, Llama and Phi, are checked", set(archs) >= {"llama", "phi"},
                 ", ".join(archs)))
    return rows


@dataclass(frozen=True)
class Float16Finding:
    """What float16 storage did to one model, and the sentence that says so."""

    model: str
    ships_float16: bool  # the source folder stores float16: its float32 copy is an exact upcast
    err: float  # max |dlogit| against the float32 reference
    err_float32: float  # the same for the float32 copy
    port_only: float  # the port against PyTorch on the same float16 weights
    text: str

    def claims(self, tol: float) -> Claims:
        """A model that ships float16 loses nothing; otherwise float16 storage costs more than
        the port's own rounding, which stays within ``tol`` on the float16 weights."""
        if self.ships_float16:  # its float32 copy is an exact upcast: both rows run the same numbers
            return [(f"{self.model}: float16 storage changes nothing (the weights ship as float16)",
                     self.err == self.err_float32 and self.port_only <= tol,
                     f"max |dlogit| {self.err:.1e} both ways")]
        return [(f"{self.model}: float16 storage moves the logits more than the float32 port's rounding",
                 self.err > self.err_float32, f"max |dlogit| {self.err:.1e} vs {self.err_float32:.1e}"),
                (f"{self.model}: the port itself stays within {tol:g} on float16 weights",
                 self.port_only <= tol, f"max |dlogit| {self.port_only:.1e}")]


def float16_findings(
    summary: pd.DataFrame, models: dict[str, CheckedModel], steps: int
) -> list[Float16Finding]:
    """Per model: the float16 row's error beside the float32 row's, and the port's own error."""
    f16 = summary[summary.dtype == "float16"].set_index("model")
    out = []
    for label, r in f16.iterrows():
        e32 = float(summary[(summary.model == label) & (summary.dtype == "float32")]
                    .max_abs_logit_err.iloc[0])
        ships = models[label].stored == "float16"
        if ships:
            text = (f"{label}: weights ship as float16, so the float32 copy holds the same values; "
                    f"both rows give max |dlogit| {e32:.1e} (port alone), teacher-forced top-1 "
                    f"{r.teacher_forced_top1_pct:.1f} %")
        else:
            text = (f"{label} (float16 weights): max |dlogit| vs float32 reference "
                    f"{r.max_abs_logit_err:.1e} ({r.max_abs_logit_err / max(e32, 1e-12):.0f}x the "
                    f"float32 port's {e32:.1e}); port alone {r.port_only_err:.1e}; free-running "
                    f"greedy identical for {r.first_divergence}/{steps} steps, teacher-forced "
                    f"top-1 {r.teacher_forced_top1_pct:.1f} %")
        out.append(Float16Finding(str(label), ships, float(r.max_abs_logit_err), e32,
                                  float(r.port_only_err), text))
    return out


def growth_lines(growth: pd.DataFrame) -> list[str]:
    """One sentence per model and dtype: does the error grow with depth, and over the steps?"""
    lines = []
    for r in growth.itertuples():
        depth = "grows" if r.depth_growth > 1 else "does not grow"
        step = "grows" if r.step_growth > 1 else "does not grow"
        lines.append(
            f"{r.model} {r.dtype}: the absolute error {depth} with depth (last/first layer "
            f"{r.depth_growth:.1f}x, relative {r.rel_depth_growth:.1f}x) and {step} over the "
            f"decode steps (last/first quarter {r.step_growth:.1f}x)"
        )
    return lines


def speed_claims(ratio: pd.DataFrame, threads: list[int]) -> Claims:
    """Both runtimes timed at every thread count, each ratio a measured number."""
    return [
        ("Swift and PyTorch eager are both timed at every thread count",
         set(ratio.index) == set(threads), f"threads {', '.join(str(t) for t in sorted(ratio.index))}"),
        ("every Swift / PyTorch eager speed ratio is measured (finite)",
         bool(np.isfinite(ratio["swift / torch"]).all()),
         ", ".join(f"{v:.2f}x" for v in ratio["swift / torch"])),
    ]


def speed_lines(
    ratio: pd.DataFrame, model: str, machine: str, llama_cpp_reason: str | None
) -> list[str]:
    """Per thread count: Swift against PyTorch eager, and against llama.cpp where measured."""
    lines = []
    for n, row in ratio.iterrows():
        verdict = "faster than" if row["swift / torch"] >= 1 else "slower than"
        lines.append(
            f"{n} thread(s): Swift {row['swift']:.1f} tok/s vs PyTorch eager {row['torch']:.1f} "
            f"tok/s: Swift is {row['swift / torch']:.2f}x, {verdict} PyTorch eager ({model}, "
            f"{machine})"
        )
        if "swift / llama.cpp" in ratio:
            within = "within" if row["swift / llama.cpp"] >= 1 / LLAMA_CPP_TARGET else "not within"
            lines.append(
                f"   vs llama.cpp F32 {row['llama.cpp']:.1f} tok/s: Swift is "
                f"{row['swift / llama.cpp']:.2f}x, {within} the {LLAMA_CPP_TARGET}x target"
            )
    if "swift / llama.cpp" not in ratio:
        lines.append(f"llama.cpp not measured here: {llama_cpp_reason}")
    return lines
