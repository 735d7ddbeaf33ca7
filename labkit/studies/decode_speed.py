"""Study 12, decode speed: where a token's time goes in the lab's own decoders, and how close
each rung of the ladder of levers gets to the memory-bandwidth limit.

Why: a decode step reads every weight once and does about two flops per weight, so on a model
whose weights dwarf the caches (SmolLM2-135M in float32: 540 MB) memory bandwidth sets the limit,
and a Python loop can reach it if its per-token overhead is small. This module measures:

* the ladder (``RUNGS``): the readable loop, then the FastDecoder with one lever added per rung
  (a plain step function, fused projections, ``[in, out]`` weights, matrix-product attention),
  every rung in each of ``rounds`` fresh processes, interleaved, so a gain is a within-process
  ratio and the spread between processes is shown;
* the breakdown of one token (``breakdown``): torch.profiler's self CPU time per operator
  family (matrix products, attention, norms, RoPE, ...) and the rest of the wall time (Python
  dispatch and the interpreter), against the time the bytes need at the read bandwidth;
* on a GPU (``gpu_ladder``, ``python -m labkit.studies.decode_speed --device cuda``): the same
  loops in float32, float16 and bfloat16, and the static-shape step captured as a CUDA graph
  (``torch.compile(mode="reduce-overhead")``), against transformers' own static cache + compile.

The llama.cpp and Swift rows of the comparison come from the runtime matrix of study 08, which
runs every runtime the same way; the notebook runs it and ``goals_table`` reads its results.

At the seed's scale (Llama 2 7B's shapes, seeded random weights: nothing of Meta's is shipped or
fetched) on a host with many cores and no Swift toolchain (the lab's GPU host):
:func:`write_random_folder` writes the fp16 HF folder (13.5 GB; drawn on the GPU) and
``python -m labkit.lab.host_7b`` runs torch, the Swift port, llama.cpp F32 and F16 on it (study
08's matrix), recording each row (:func:`host_7b_record`) as its runtime finishes. The Swift CLI travels prebuilt (``swift build -c release
--static-swift-stdlib`` here, with libopenblas beside it, named by ``$LABKIT_LMPORT``) and
xllamacpp as its package folder on PYTHONPATH; the folder and the GGUF exports belong in
/dev/shm there (``LABKIT_RUNTIME_CACHE``): its disk writes about 75 MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STUDY = "12_decode_speed"

#: The ladder, one lever more per rung: (name, FastDecoder options, or None for the readable loop)
RUNGS: tuple[tuple[str, dict | None], ...] = (
    ("readable loop (generate.greedy)", None),
    ("step function, unfused", {"fuse": False}),
    ("+ fused q/k/v and gate/up", {"fuse": True}),
    ("+ [in, out] weights", {"fuse": True, "transpose": True}),
    ("+ matmul attention", {"fuse": True, "transpose": True, "attention": "matmul"}),
)

#: Operator families of the breakdown: a profiler op name -> the first family whose key it has
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matrix products", ("addmm", "aten::mm", "aten::matmul", "linear", "aten::bmm", "gemv")),
    ("attention", ("scaled_dot_product", "flash", "softmax", "masked_fill")),
    ("norms", ("rsqrt", "aten::pow", "aten::mean")),
    ("RoPE", ("aten::cat", "aten::neg", "index_select")),
    ("embedding and argmax", ("embedding", "argmax")),
    ("copies and casts", ("copy_", "aten::to", "contiguous", "clone", "slice", "select")),
)


@dataclass
class Spec:
    """What the ladder measures; the same for every rung."""

    model: str = "smollm2-135m"
    prompt_len: int = 16
    gen_len: int = 64
    threads: list[int] = field(default_factory=lambda: [1, 2])
    rounds: int = 3
    device: str = "cpu"
    dtype: str = "float32"


def _decoders(model: Any) -> dict[str, Callable[[Any, int], Any]]:
    """rung name -> f(prompt, n) generating n tokens greedily."""
    from labkit.inference.fast_decode import FastDecoder
    from labkit.inference.generate import greedy

    out: dict[str, Callable[[Any, int], Any]] = {}
    for name, options in RUNGS:
        if options is None:
            out[name] = lambda p, n: greedy(model, p, n).tokens
        else:
            dec = FastDecoder(model, **options)
            out[name] = lambda p, n, dec=dec: dec.greedy(p, n)[0]
    return out


def _decode_rate(run: Callable[[Any, int], Any], prompt: Any, n: int, sync: Callable) -> float:
    """Decode tokens/s: a generation of n + 1 tokens minus one of 1 (prefill and first token)."""
    def timed(k: int) -> float:
        sync()
        t0 = time.perf_counter()
        run(prompt, k)
        sync()
        return time.perf_counter() - t0

    return n / max(timed(n + 1) - timed(1), 1e-9)


def measure_round(spec: Spec, threads: int) -> dict[str, Any]:
    """One process's round: every rung's decode tokens/s at ``threads``, interleaved, and its
    greedy tokens (every rung must give the readable loop's). Runs in the child process."""
    import torch

    from labkit.core.timing import device_sync
    from labkit.models import load

    torch.set_num_threads(threads)
    model = load(spec.model, device=spec.device, dtype=spec.dtype).model
    prompt = _prompt(model, spec.prompt_len, spec.device)
    sync = device_sync(spec.device)
    runs = _decoders(model)
    tokens = {name: run(prompt, 16).cpu().tolist() for name, run in runs.items()}  # warm-up too
    rates = {name: _decode_rate(run, prompt, spec.gen_len, sync) for name, run in runs.items()}
    return {"threads": threads, "rates": rates, "tokens": tokens,
            "load_avg_1m": os.getloadavg()[0]}


def _prompt(model: Any, length: int, device: str) -> Any:
    import torch

    g = torch.Generator().manual_seed(12)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(device)


def run_ladder(spec: Spec, progress: bool = True) -> list[dict[str, Any]]:
    """``spec.rounds`` rounds, each thread count in a fresh process per round, interleaved."""
    rounds = []
    for r in range(spec.rounds):
        for threads in spec.threads:
            with tempfile.TemporaryDirectory(prefix="labkit-ladder-") as tmp:
                out = Path(tmp) / "round.json"
                cmd = [sys.executable, "-m", "labkit.studies.decode_speed", "--round",
                       json.dumps(asdict(spec)), "--threads", str(threads), "--result", str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
                if proc.returncode != 0 or not out.is_file():
                    raise RuntimeError(f"ladder round failed: {(proc.stderr or proc.stdout)[-1500:]}")
                rounds.append(json.loads(out.read_text()))
            if progress:
                best = max(rounds[-1]["rates"].values())
                print(f"[ladder] round {r + 1}/{spec.rounds}, {threads} thread(s): best "
                      f"{best:.1f} tok/s", flush=True)
    return rounds


def ladder_table(rounds: list[dict[str, Any]], bytes_per_token: float,
                 read_gbs: dict[int, float]) -> Any:
    """One row per (rung, threads): median tok/s over processes with min-max, the gain over the
    previous rung and over the readable loop (medians of within-process ratios), and the
    fraction of the read-bandwidth limit at that thread count."""
    import pandas as pd

    rows = []
    names = [n for n, _ in RUNGS]
    for threads in sorted({r["threads"] for r in rounds}):
        mine = [r for r in rounds if r["threads"] == threads]
        for i, name in enumerate(names):
            rates = [r["rates"][name] for r in mine]
            step = [r["rates"][name] / r["rates"][names[max(i - 1, 0)]] for r in mine]
            total = [r["rates"][name] / r["rates"][names[0]] for r in mine]
            limit = read_gbs[threads] * 1e9 / bytes_per_token
            rows.append({"rung": name, "threads": threads, "tok_s": float(np.median(rates)),
                         "min": float(min(rates)), "max": float(max(rates)),
                         "gain_vs_previous": float(np.median(step)),
                         "gain_vs_readable": float(np.median(total)),
                         "bandwidth_fraction": float(np.median(rates)) / limit,
                         "processes": len(mine),
                         "load_max": max(r["load_avg_1m"] for r in mine)})
    return pd.DataFrame(rows)


def same_tokens(rounds: list[dict[str, Any]]) -> bool:
    """Every rung gave the readable loop's greedy tokens, in every process."""
    first = RUNGS[0][0]
    return all(toks == r["tokens"][first] for r in rounds for toks in r["tokens"].values())


def record_ladder(table: Any, spec: Spec, bytes_per_token: float) -> list[dict]:
    """The ladder's records (tok/s per rung and thread count, its gains and bandwidth share)."""
    from labkit.core import results

    recs = []
    for row in table.itertuples():
        params = {"rung": row.rung, "threads": row.threads, "prompt_len": spec.prompt_len,
                  "gen_len": spec.gen_len, "processes": row.processes, "min": row.min,
                  "max": row.max, "dtype": spec.dtype, "bytes_per_token": bytes_per_token}
        for metric, value, unit in (("decode_tok_s", row.tok_s, "tok/s"),
                                    ("gain_vs_readable", row.gain_vs_readable, "1"),
                                    ("decode_bandwidth_fraction", row.bandwidth_fraction, "1")):
            recs.append(results.record(STUDY, metric, value, unit, runtime="labkit",
                                       device=spec.device, model=spec.model, params=params,
                                       threads=row.threads))
    return recs


# --------------------------------------------------------------------------- the breakdown


def _family(op: str) -> str:
    for family, keys in FAMILIES:
        if any(k in op for k in keys):
            return family
    return "other operators"


def breakdown(model: Any, options: dict | None, prompt: Any, steps: int = 16) -> dict[str, float]:
    """Milliseconds per decoded token by operator family (torch.profiler's self CPU time), plus
    "Python and dispatch" = the wall time the operators do not account for."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines are noise
    from torch.profiler import ProfilerActivity, profile

    from labkit.inference.fast_decode import FastDecoder
    from labkit.inference.generate import greedy

    dec = None if options is None else FastDecoder(model, **options)  # built once, not timed

    def run(n: int) -> Any:
        return greedy(model, prompt, n) if dec is None else dec.greedy(prompt, n)

    run(4)  # warm-up
    t0 = time.perf_counter()
    run(1)
    prefill = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run(steps + 1)
        wall = time.perf_counter() - t0 - prefill
    per_op: dict[str, float] = {}
    for ev in prof.key_averages():
        per_op[_family(ev.key)] = per_op.get(_family(ev.key), 0.0) + ev.self_cpu_time_total / 1e3
    # the profiled run includes one prefill: subtract its share from the operators pro rata
    total_ops = sum(per_op.values())
    scale = max(wall, 1e-9) / max(wall + prefill, 1e-9)
    out = {k: v * scale / steps for k, v in per_op.items()}
    out["Python and dispatch"] = max(wall * 1e3 / steps - total_ops * scale / steps, 0.0)
    return out


def plot_breakdown(parts: dict[str, dict[str, float]], limit_ms: float, title: str):
    """One stacked bar per rung: ms per token by operator family, and the bandwidth floor."""
    from labkit.core import plotting

    families = [f for f, _ in FAMILIES] + ["other operators", "Python and dispatch"]
    colours = plotting.COLORS + ["tab:gray", "tab:olive"]
    fig, ax = plotting.new_figure(figsize=(10, 4.8))
    names = list(parts)
    left = np.zeros(len(names))
    for i, fam in enumerate(families):
        vals = np.array([parts[n].get(fam, 0.0) for n in names])
        ax.barh(names, vals, left=left, color=colours[i % len(colours)], label=fam)
        left += vals
    ax.axvline(limit_ms, color="black", ls="--", label=f"bandwidth floor {limit_ms:.1f} ms")
    ax.set(xlabel="milliseconds per decoded token", ylabel="decoder", title=title)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_ladder(table: Any, title: str):
    """tok/s per rung (median of processes, min-max), one bar per thread count."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(10, 4.8))
    rungs = list(dict.fromkeys(table.rung))
    counts = sorted(set(table.threads))
    width = 0.8 / len(counts)
    for j, threads in enumerate(counts):
        sel = table[table.threads == threads].set_index("rung").loc[rungs]
        y = np.arange(len(rungs)) + (j - (len(counts) - 1) / 2) * width
        ax.barh(y, sel.tok_s, width * 0.95, color=plotting.COLORS[j],
                xerr=[sel.tok_s - sel["min"], sel["max"] - sel.tok_s], capsize=2,
                label=f"{threads} thread(s)")
        for yy, (v, f) in zip(y, zip(sel.tok_s, sel.bandwidth_fraction, strict=True), strict=True):
            ax.text(v * 0.98, yy, f"{f:.0%}", va="center", ha="right", fontsize=7, color="white")
    ax.set_yticks(range(len(rungs)), rungs)
    ax.invert_yaxis()
    ax.set(xlabel="decode tokens/s (median of processes, min-max; % of the bandwidth limit)",
           ylabel="rung of the ladder", title=title)
    ax.legend(fontsize=8, loc="lower right")
    return fig


# --------------------------------------------------------------------------- limits and goals


def limits(model_name: str, threads: list[int], position: int) -> dict[str, Any]:
    """Bytes one decode step reads (float32 weights, the KV cache at ``position``) and the
    tokens/s that the read bandwidth at each thread count allows (``core.bandwidth``)."""
    from labkit.core.bandwidth import read_bandwidth_gbs
    from labkit.models.config import load_config
    from labkit.models.loader import resolve
    from labkit.models.sizes import decode_bytes_per_token

    cfg = load_config(resolve(model_name)[1])
    nbytes = decode_bytes_per_token(cfg, position, 4)["total"]
    gbs = {t: read_bandwidth_gbs(t) for t in threads}
    return {"bytes_per_token": nbytes, "read_gbs": gbs,
            "limit_tok_s": {t: g * 1e9 / nbytes for t, g in gbs.items()}}


#: The study's targets: (what, the ratio's numerator, its denominator, the test, the target)
GOALS: tuple[tuple[str, str, str, str, float], ...] = (
    ("labkit decode vs llama.cpp F32", "torch-fast", "llama.cpp-f32", "tg", 0.95),
    ("labkit prefill vs llama.cpp F32", "torch-fast", "llama.cpp-f32", "pp", 1.0),
    ("Swift port decode vs llama.cpp F32", "swift", "llama.cpp-f32", "tg", 1.0),
)


def goals_table(matrix: dict, lim: dict[str, Any]) -> Any:
    """Each goal at each thread count: the ratio of medians (within-round ratios where both are
    measured against the same reference), met or not; plus labkit's and llama.cpp's decode as a
    fraction of the bandwidth limit."""
    import pandas as pd

    done = {k: r for k, r in matrix.items() if "pp" in r}  # the (runtime, threads) that ran
    rows = []
    for threads in sorted({t for _, t in done}):
        for what, num, den, test, target in GOALS:
            a, b = done.get((num, threads)), done.get((den, threads))
            if a is None or b is None:
                rows.append({"goal": what, "threads": threads, "value": None, "target": target,
                             "met": None, "why": f"{num if a is None else den} did not run"})
                continue
            ratio = _within_round_ratio(a, b, test)
            rows.append({"goal": what, "threads": threads, "value": ratio, "target": target,
                         "met": ratio >= target, "why": ""})
        for name in ("torch-fast", "llama.cpp-f32", "swift"):
            r = done.get((name, threads))
            if r is not None:
                frac = r["tg"]["mean"] / lim["limit_tok_s"][threads]
                rows.append({"goal": f"{name} decode / bandwidth limit", "threads": threads,
                             "value": frac, "target": 0.75 if name == "torch-fast" else None,
                             "met": (frac >= 0.75) if name == "torch-fast" else None, "why": ""})
    return pd.DataFrame(rows)


def _within_round_ratio(a: dict, b: dict, test: str) -> float:
    """a/b from the per-round ratios each has to the same reference, else of the medians."""
    ra, rb_ = a.get(f"{test}_vs_reference"), b.get(f"{test}_vs_reference")
    if ra and rb_ and len(ra["processes"]) == len(rb_["processes"]):
        return float(np.median([x / y for x, y in zip(ra["processes"], rb_["processes"], strict=True)]))
    return a[test]["mean"] / b[test]["mean"]


# --------------------------------------------------------------------------- the GPU


#: SmolLM2-135M's shapes, for GPU runs with seeded random weights (no conversion needed there)
SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
                     tie_word_embeddings=True)


def random_model(shape: dict, dtype: str, device: str, seed: int = 0) -> Any:
    """labkit's Llama of ``shape`` with seeded random weights, in ``dtype`` on ``device``."""
    import torch

    from labkit.models.config import LlamaConfig
    from labkit.models.llama import Llama

    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**shape)).eval()
    return model.to(device=device, dtype=getattr(torch, dtype))


def _cuda_graph_step(fast: Any, kv: Any) -> Callable:
    """The static step compiled with mode="reduce-overhead": torch.compile captures it as a CUDA
    graph and replays it each token; the KV buffers are marked static so the in-place writes stay
    inside the graph."""
    import torch

    for t in kv.k + kv.v:
        torch._dynamo.mark_static_address(t)
    return torch.compile(fast.static_step, mode="reduce-overhead", fullgraph=True)


def gpu_ladder(model: Any, prompt_len: int = 16, gen_len: int = 128,
               compile_graph: bool = True, device: str = "cuda") -> list[dict[str, Any]]:
    """On a CUDA device: the readable loop and every rung of the ladder, and the static-shape
    step replayed as a CUDA graph, at batch 1; decode tok/s each."""
    from labkit.core.timing import device_sync
    from labkit.inference.fast_decode import FastDecoder
    from labkit.inference.kv_cache import KVCache

    sync = device_sync(device)
    prompt = _prompt(model, prompt_len, device)
    runs = dict(_decoders(model))
    if compile_graph:
        fast = FastDecoder(model)
        kv = KVCache.for_model(model, max_len=prompt_len + gen_len + 2)
        step = _cuda_graph_step(fast, kv)
        runs["FastDecoder static step as a CUDA graph"] = \
            lambda p, n: fast.greedy(p, n, cache=kv, static=True, step_fn=step)[0]
    rows = []
    for name, run in runs.items():
        run(prompt, gen_len + 1)  # warm-up / capture, at the timed length
        ref = run(prompt, 8).tolist()
        rows.append({"decoder": name, "tok_s": _decode_rate(run, prompt, gen_len, sync),
                     "first_tokens": ref[0][prompt_len:]})
    return rows


def hf_static_compiled(model: Any, prompt_len: int = 16, gen_len: int = 128,
                       device: str = "cuda", compile_forward: bool = True) -> float:
    """transformers' own fast path as the peer: generate with a static cache and the forward
    compiled with mode="reduce-overhead", on the same weights; decode tok/s."""
    import torch
    import transformers

    from labkit.core.timing import device_sync

    cfg = transformers.LlamaConfig(**{k: v for k, v in model.config.to_hf_dict().items()
                                      if k not in ("architectures", "model_type")})
    hf = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=model.output_weight.dtype)
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.eval()
    hf.generation_config.cache_implementation = "static"  # generate then compiles the forward
    if not compile_forward:  # itself (transformers' own static-cache + compile path)
        hf.generation_config.disable_compile = True
    prompt = _prompt(model, prompt_len, device)

    def run(p: Any, n: int) -> Any:
        with torch.inference_mode():
            return hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)

    run(prompt, 8)
    run(prompt, gen_len + 1)  # the static cache is sized by the longest run: warm that too
    return _decode_rate(run, prompt, gen_len, device_sync(device))


def gpu_main(dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16"),
             gen_len: int = 128) -> list[dict]:
    """Every GPU row on SmolLM2's shapes (random weights): the ladder per dtype, the CUDA graph
    in the half precisions, transformers' static+compile peer; recorded under this study."""
    import torch

    from labkit.core import results

    recs = []
    for dtype in dtypes:
        model = random_model(SMOLLM2_SHAPE, dtype, "cuda")
        rows = gpu_ladder(model, gen_len=gen_len, compile_graph=dtype != "float32")
        try:
            rows.append({"decoder": "transformers.generate, static cache + compile",
                         "tok_s": hf_static_compiled(model, gen_len=gen_len)})
        except Exception as exc:  # noqa: BLE001 - the peer's failure is reported, not fatal
            print(f"[gpu] {dtype} transformers static+compile failed: {str(exc)[:300]}", flush=True)
        for row in rows:
            print(f"[gpu] {dtype} {row['decoder']}: {row['tok_s']:.1f} tok/s", flush=True)
            recs.append(results.record(
                STUDY, "decode_tok_s", row["tok_s"], "tok/s", runtime="labkit"
                if "transformers" not in row["decoder"] else "transformers", device="cuda",
                model="smollm2-135m-shape-random", params={"decoder": row["decoder"],
                "dtype": dtype, "batch": 1, "prompt_len": 16, "gen_len": gen_len,
                "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
        del model
        torch.cuda.empty_cache()
    return recs


def gpu_table(df: Any) -> Any:
    """The GPU records of this study (``load_results`` frame) as decoder x dtype in tok/s, one
    table per GPU and run: the latest run of each machine, so reruns do not mix."""
    import pandas as pd

    gpu = df[df["device"].astype(str).str.startswith("cuda")] if not df.empty else df
    if gpu.empty:
        return pd.DataFrame()
    gpu = gpu[gpu["run_id"] == gpu.groupby("machine")["run_id"].transform("max")]
    rows = [{"gpu": r.params.get("gpu"), "run_id": r.run_id, "decoder": r.params["decoder"],
             "dtype": r.params["dtype"], "tok_s": round(float(r.value), 1)}
            for r in gpu.itertuples()]
    order = list(dict.fromkeys(row["decoder"] for row in rows))
    table = pd.DataFrame(rows).pivot_table(index=["gpu", "run_id", "decoder"], columns="dtype",
                                           values="tok_s", sort=False)
    return table.reindex(order, level="decoder")


#: the label of every record made on Llama-2-7B's shapes with seeded random weights
HOST_7B_MODEL = "llama-2-7b-shape-random"


def host_7b_table(df: Any) -> Any:
    """Study 08's Llama-2-7B-shape rows (:func:`cpu_7b_main`, :func:`host_7b_matrix`;
    ``load_results`` frame): tok/s and the fraction of the host's read bandwidth probed in the
    same process, latest run of each machine."""
    import pandas as pd

    rows = df[df["model"] == HOST_7B_MODEL] if not df.empty else df
    if rows.empty:
        return pd.DataFrame()
    rows = rows[rows["run_id"] == rows.groupby("machine")["run_id"].transform("max")]
    return pd.DataFrame([{"machine": r.machine, "run_id": r.run_id, "runtime": r.runtime,
                          "dtype": r.params.get("dtype"), "threads": r.threads,
                          "tok_s": round(float(r.value), 2),
                          "read_gbs": r.params["read_bandwidth_gbs"],
                          "bandwidth_fraction": r.params["bandwidth_fraction"]}
                         for r in rows.itertuples()])


def llama2_7b_shape(max_positions: int = 1024) -> dict[str, Any]:
    """Llama-2-7B's shapes from data/configs (the weights are never shipped or fetched), with a
    shorter window: these runs decode a few dozen tokens, and the weights' shapes are what set
    the bytes a token reads."""
    from labkit.core import paths
    from labkit.models.config import read_config

    raw = read_config(paths.configs_dir() / "meta-llama__Llama-2-7b-hf.json")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta")
    return {k: raw[k] for k in keys if raw.get(k) is not None} | {
        "max_position_embeddings": max_positions}


def cpu_7b_main(threads: int, gen_len: int = 8, dtypes: tuple[str, ...] = ("float32",)) -> list[dict]:
    """Llama-2-7B's shapes (data/configs, seeded random weights) decoded on this host's CPU by
    labkit's readable loop and its fast one, against the host's read bandwidth at ``threads``;
    recorded as study 08's rows for this machine (tg_tok_s, runtime torch-eager / torch-fast)."""
    import torch

    from labkit.core.bandwidth import read_bandwidth_gbs
    from labkit.core.timing import device_sync
    from labkit.models.sizes import decode_bytes_per_token

    torch.set_num_threads(threads)
    shape = llama2_7b_shape(256)
    gbs = read_bandwidth_gbs(threads)
    recs = []
    for dtype in dtypes:
        model = random_model(shape, dtype, "cpu")
        nbytes = decode_bytes_per_token(model.config, 16 + gen_len // 2, model.output_weight.element_size())["total"]
        prompt = _prompt(model, 16, "cpu")
        for runtime, run in (("torch-eager", _decoders(model)[RUNGS[2][0]]),
                             ("torch-fast", _decoders(model)[RUNGS[-1][0]])):
            run(prompt, 2)
            rate = _decode_rate(run, prompt, gen_len, device_sync("cpu"))
            recs.append(host_7b_record(runtime, dtype, rate, [rate], threads, nbytes, gbs,
                                        prompt_len=16, gen_len=gen_len))
        del model
    return recs


def host_7b_record(runtime: str, dtype: str, rate: float, processes: list[float], threads: int,
                    nbytes: float, gbs: float, **params: Any) -> dict:
    """One host-7B decode row of study 08 (tg_tok_s), with the read-bandwidth fraction."""
    from labkit.core import results
    from labkit.core.bandwidth import NOISE_MARGIN, roofline_fraction

    frac = roofline_fraction(nbytes, 1 / rate, gbs, margin=NOISE_MARGIN)
    print(f"[7b] {runtime} ({dtype}) {threads} threads: {rate:.2f} tok/s, {frac:.2f} of "
          f"{gbs:.0f} GB/s", flush=True)
    return results.record(
        "08_runtime_benchmark", "tg_tok_s", rate, "tok/s", runtime=runtime, device="cpu",
        model=HOST_7B_MODEL, threads=threads,
        params={"runtime": runtime, "dtype": dtype, "threads": threads, **params,
                "processes": [round(x, 3) for x in processes],
                "read_bandwidth_gbs": round(gbs, 1), "bytes_per_token": int(nbytes),
                "bandwidth_fraction": round(frac, 3), "weights": "seeded random"})


def write_random_folder(shape: dict, out: str | os.PathLike[str], dtype: str = "float16",
                        seed: int = 0, device: str = "cpu", label: str = "") -> Path:
    """An HF Llama folder of ``shape`` with seeded random weights stored as ``dtype``: the
    interchange every runtime reads, so the Swift port and llama.cpp can run a model the lab
    cannot ship. The tokenizer is tiny-llama's (its ids lie below any vocabulary here; llama.cpp's
    GGUF pads the rest). ``device`` only draws the weights (a GPU draws 7B of them in seconds).
    Written atomically."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from labkit.core import files, paths
    from labkit.models.config import LlamaConfig

    out = Path(out)
    tiny = paths.repo_models_dir() / "tiny-llama"
    cfg = LlamaConfig(**shape, bos_token_id=0, eos_token_id=1)
    model = random_model(shape, "float32", device, seed=seed)
    state = {k: v.to(dtype=getattr(torch, dtype), device="cpu").contiguous()
             for k, v in model.state_dict().items()}
    del model
    with files.atomic_dir(out) as tmp:
        hf = cfg.to_hf_dict() | {"torch_dtype": dtype, "dtype": dtype, "_note": "seeded random weights "
                                 f"(seed {seed}) in the shapes of {label or 'this config'}"}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy2(tiny / name, tmp / name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.studies.decode_speed",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="the GPU rows (SmolLM2's shapes, random weights)")
    ap.add_argument("--out", default=None, help="write records under OUT/data/results/")
    ap.add_argument("--cpu-7b", type=int, default=None, metavar="THREADS",
                    help="Llama-2-7B's shapes on this CPU at THREADS threads (random weights)")
    ap.add_argument("--round", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.round:  # a child process of run_ladder
        res = measure_round(Spec(**json.loads(args.round)), args.threads)
        Path(args.result).write_text(json.dumps(res))
        return 0
    if args.out:
        os.environ["LABKIT_OUTPUT_ROOT"] = str(Path(args.out).resolve())
    if args.gpu:
        gpu_main()
    if args.cpu_7b:
        cpu_7b_main(args.cpu_7b)
    if args.gpu or args.cpu_7b:
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
