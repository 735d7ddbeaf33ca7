"""The runtime benchmark matrix: every runtime x (pp, tg, TTFT, peak RSS, bytes, parity).

``python -m labkit.studies.runtime_benchmark --device cpu --out DIR`` (no Jupyter needed: this is how the
CUDA column is measured on a GPU machine) or ``labkit bench runtimes`` or notebook 08.

How it runs, and why:

* each runtime in its own Python process (``--one``), so its peak RSS is its own (a shared
  process would report the largest runtime's peak for every later one) and a crash, a compile
  cache or a thread pool of one runtime cannot touch the next;
* torch eager float32 runs first: its greedy tokens and logits are the parity reference;
* pp = prompt tokens / prefill seconds on ``prompt_len`` tokens, tg = ``gen_len`` decode steps
  after one token, both repeated within the process (mean +- sd, as llama-bench), after one
  untimed warm-up;
* the whole matrix runs ``rounds`` times, each runtime in a new process every round and the
  runtimes interleaved (round 1: all runtimes, then round 2: all again, ...): on a shared VM
  speed drifts from one process to the next by more than within one, so the figure shows the
  median over processes and their spread, and a ratio to torch eager is taken within a round
  (the same minutes of the machine) and then its median across rounds;
* every thread count of ``thread_counts`` is its own column of the matrix;
* TTFT = prefill seconds of a prompt, for each length of ``ttft_lens``;
* parity: greedy ``parity_gen`` tokens after a held-out prompt vs the reference
  (``base.parity``).

Records (study "08_runtime_benchmark"): pp_tok_s, tg_tok_s (median over processes),
pp_vs_reference, tg_vs_reference (median within-round ratio to torch eager), ttft_ms,
peak_rss_bytes, model_bytes, load_s, greedy_agreement_pct, max_abs_logit_err; params carry
runtime, dtype, prompt_len, gen_len, repeats, rounds, the per-process values and their spread,
threads, the load average (max over the rounds), noisy (load above half the cores) and the
runtime's note.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STUDY = "08_runtime_benchmark"
REFERENCE = "torch-eager"
#: Runtimes that run the float32 weights in float32 and expose logits: held to
#: ``tolerances.RUNTIME_MATRIX`` on the device each ran on.
FLOAT32 = ("torch-eager", "torch-fast", "torch-compile", "torch-cuda", "onnxruntime", "mlx", "swift", "llama.cpp-f32",
           "llama.cpp-server")
#: Max |dlogit| against torch float32 over the positions where both saw the same tokens: the
#: reordered sums of another runtime, accumulated over the parity run's greedy steps.


@dataclass
class Spec:
    """What to measure; the same for every runtime of one matrix."""

    model: str = "tiny-llama"
    prompt_len: int = 512  # pp512
    gen_len: int = 128  # tg128
    repeats: int = 5
    ttft_lens: list[int] = field(default_factory=lambda: [16, 64, 256, 512])
    parity_prompt: int = 32
    parity_gen: int = 64
    threads: int | None = None
    device: str = "cpu"
    rounds: int = 3  # separate processes per runtime, interleaved

    @classmethod
    def quick(cls, **kw: Any) -> Spec:
        """Small sizes, few repeats: every code path, a fraction of the time."""
        base = dict(prompt_len=64, gen_len=16, repeats=2, ttft_lens=[16, 64], parity_prompt=16,
                    parity_gen=16, rounds=2)
        base.update(kw)
        return cls(**base)


def model_dir(model: str) -> Path:
    """The model folder for a registry name or a path (the same resolution as labkit.models)."""
    from labkit.models.loader import resolve

    return Path(resolve(model)[1])


def prompt_ids(folder: Path, length: int, window: int = 0) -> list[int]:
    """``length`` token ids of real text: a held-out window of the model when it ships one
    (heldout_slice.safetensors), else seeded random ids (any vocabulary works for timing)."""
    path = folder / "heldout_slice.safetensors"
    if path.is_file():
        from safetensors.numpy import load_file

        windows = load_file(str(path))["windows"]
        if length <= windows.shape[1]:
            return [int(t) for t in windows[window % windows.shape[0], :length]]
    vocab = int(json.loads((folder / "config.json").read_text())["vocab_size"])
    return [int(t) for t in np.random.default_rng(window).integers(3, vocab, size=length)]


def runtime_kwargs(name: str, spec: Spec) -> dict[str, Any]:
    """Constructor arguments of runtime ``name`` for this spec (threads; the device for torch)."""
    kw: dict[str, Any] = {"threads": spec.threads}
    if name in ("torch-eager", "torch-fast", "torch-compile") and spec.device != "cpu":
        kw["device"] = spec.device
    return kw


def peak_rss(rt: Any) -> tuple[int, str | None]:
    """(peak RSS in bytes, the runtime's note saying where the peak came from) after its runs.

    A runtime whose work runs in a process of its own reports that process's peak
    (``cli_peak_rss_bytes``: the Swift CLI, through os.wait4). ``RUSAGE_CHILDREN`` would also
    hold the ``swift build`` its ``load`` ran: SwiftPM's peak, not the CLI's. Any other runtime:
    this process's peak, or its finished children's where larger (an upper bound).
    """
    from labkit.runtimes import base

    prefix = f"{rt.note}; " if rt.note else ""
    own = getattr(rt, "cli_peak_rss_bytes", None)
    if own:  # on Linux a child's ru_maxrss starts at its parent's size at fork
        bound = "" if sys.platform == "darwin" else ", an upper bound"
        return own, f"{prefix}peak RSS: the CLI process's own ru_maxrss (wait4{bound})"
    peak, children = base.peak_rss_bytes(), base.children_peak_rss_bytes()
    if children > peak:  # the runtime ran in child processes
        return children, f"{prefix}peak RSS: its child processes' ru_maxrss (an upper bound)"
    return peak, rt.note


def measure_one(name: str, spec: Spec, parity_file: Path | None) -> dict[str, Any]:
    """Load runtime ``name`` and measure it (runs in the child process). Never raises for an
    unavailable runtime: returns {"skipped": reason}."""
    from labkit import runtimes
    from labkit.runtimes.base import time_pp, time_tg

    cls = runtimes.runtime_class(name)
    reason = cls.available()
    if reason is not None:
        return {"runtime": name, "skipped": reason}
    folder = model_dir(spec.model)
    rt = cls(**runtime_kwargs(name, spec))
    t0 = time.perf_counter()
    rt.load(folder)
    out: dict[str, Any] = {"runtime": name, "load_s": time.perf_counter() - t0}
    # parity run first (it doubles as the warm-up of small shapes)
    prompt = prompt_ids(folder, spec.parity_prompt, window=1)
    run = rt.timed_generate(prompt, spec.parity_gen, keep_logits=rt.exposes_logits)
    if parity_file is not None:
        logits = np.stack(run.logits) if run.logits else np.zeros((0,), np.float32)
        np.savez(parity_file, tokens=np.asarray(run.tokens), logits=logits,
                 logprobs=np.bool_(rt.returns_logprobs))
    pp, pp_s = time_pp(rt, prompt_ids(folder, spec.prompt_len), spec.repeats)
    tg = time_tg(rt, spec.gen_len, spec.repeats, start=prompt_ids(folder, 1))
    ttft = {}
    for n in spec.ttft_lens:
        ttft[n] = asdict(time_pp(rt, prompt_ids(folder, n, window=2), spec.repeats)[1])
    peak, note = peak_rss(rt)
    out.update(
        pp=asdict(pp), pp_s=asdict(pp_s), tg=asdict(tg), ttft=ttft, peak_rss_bytes=peak,
        model_bytes=rt.model_bytes(), device=rt.device, dtype=rt.dtype, note=note,
    )
    rt.close()
    return out


def run_isolated(name: str, spec: Spec, parity_file: Path, timeout: float = 3600) -> dict[str, Any]:
    """``measure_one`` in a fresh Python process; a crash becomes {"failed": stderr tail}."""
    with tempfile.TemporaryDirectory(prefix="labkit-matrix-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "labkit.studies.runtime_benchmark", "--one", name,
               "--spec", json.dumps(asdict(spec)), "--parity-file", str(parity_file),
               "--result", str(result)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not result.is_file():
            return {"runtime": name, "failed": (proc.stderr or proc.stdout)[-2000:]}
        return json.loads(result.read_text())


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def record_result(res: dict[str, Any], spec: Spec, parity: dict[str, Any] | None) -> list[dict]:
    """Write one runtime's measurements as records; returns them."""
    from labkit.core import results

    name = res["runtime"]
    base = {"runtime": name, "dtype": res["dtype"], "repeats": spec.repeats,
            "rounds": res.get("rounds", 1), "threads": spec.threads,
            "load_avg_1m": res.get("load_avg_1m"), "noisy": bool(res.get("noisy")),
            "note": res.get("note", "")}
    kw = {"runtime": name, "device": res["device"], "model": spec.model}
    recs = []

    def rec(metric: str, value: float, unit: str, **params: Any) -> None:
        recs.append(results.record(STUDY, metric, value, unit, **kw, params={**base, **params}))

    for key, metric, lens in (("pp", "pp_tok_s", (spec.prompt_len, 0)),
                              ("tg", "tg_tok_s", (1, spec.gen_len))):
        st = res[key]
        spread = {k: st[k] for k in ("min", "max", "processes") if k in st}
        rec(metric, st["mean"], "tok/s", prompt_len=lens[0], gen_len=lens[1], sd=st["sd"],
            **spread)
        ratio = res.get(f"{key}_vs_reference")
        if ratio is not None:
            rec(f"{key}_vs_reference", ratio["median"], "1", prompt_len=lens[0], gen_len=lens[1],
                reference=REFERENCE, min=ratio["min"], max=ratio["max"],
                processes=ratio["processes"])
    for n, st in res["ttft"].items():
        rec("ttft_ms", st["mean"] * 1e3, "ms", prompt_len=int(n), gen_len=1, sd=st["sd"] * 1e3)
    rec("peak_rss_bytes", res["peak_rss_bytes"], "bytes", prompt_len=spec.prompt_len,
        gen_len=spec.gen_len)
    if res.get("model_bytes"):
        rec("model_bytes", res["model_bytes"], "bytes", prompt_len=0, gen_len=0)
    rec("load_s", res["load_s"], "s", prompt_len=0, gen_len=0)
    if parity is not None:
        p = {"prompt_len": spec.parity_prompt, "gen_len": spec.parity_gen,
             "first_divergence": parity["first_divergence"], "reference": f"{REFERENCE} float32 cpu"}
        rec("greedy_agreement_pct", parity["greedy_agreement_pct"], "%", **p)
        if parity["max_abs_logit_err"] is not None:
            rec("max_abs_logit_err", parity["max_abs_logit_err"], "1", **p)
    return recs


def _parity_of(path: Path, ref_path: Path) -> dict[str, Any]:
    from labkit.runtimes.base import GenerationRun, parity

    def read(p: Path) -> GenerationRun:
        z = np.load(p)
        logits = list(z["logits"]) if z["logits"].ndim == 2 else []
        return GenerationRun(0.0, [], [int(t) for t in z["tokens"]], logits)

    with np.load(path) as z:  # did the runtime give log-probabilities (Runtime.returns_logprobs)?
        logprobs = bool(z["logprobs"]) if "logprobs" in z.files else False
    return parity(read(path), read(ref_path), exposes_logits=True, logprobs=logprobs)


def one_round(spec: Spec, order: list[str], tmp: Path, ref_file: Path) -> dict[str, dict]:
    """Every runtime of ``order`` once, each in a fresh process, the reference first."""
    out = {}
    ref_spec = Spec(**{**asdict(spec), "device": "cpu"})
    for name in order:
        t0 = time.time()
        parity_file = ref_file if name == REFERENCE else tmp / f"{name}-{spec.threads}.npz"
        res = run_isolated(name, ref_spec if name == REFERENCE else spec, parity_file)
        res.update(load_avg_1m=load_average(), wall_s=time.time() - t0)
        out[name] = res
    return out


def round_parity(res: dict, name: str, spec: Spec, tmp: Path, ref_file: Path) -> dict | None:
    """Round 0's parity of runtime ``name`` against the reference's greedy run (its own for the
    reference: 100 % by construction)."""
    if name == REFERENCE:
        return {"greedy_agreement_pct": 100.0, "first_divergence": spec.parity_gen,
                "max_abs_logit_err": 0.0}
    return _parity_of(tmp / f"{name}-{spec.threads}.npz", ref_file)


def _spread(values: list[float]) -> dict[str, Any]:
    """median, min, max and every value: the spread between processes."""
    return {"median": float(np.median(values)), "min": float(min(values)),
            "max": float(max(values)), "processes": [float(v) for v in values]}


def aggregate(rounds: list[dict[str, dict]], name: str) -> dict[str, Any]:
    """One runtime's rounds as one result: pp/tg median over processes with their spread, the
    within-round ratios to the reference, TTFT medians, the first round's other fields."""
    rounds = [r for r in rounds if name in r]  # a runtime may run fewer (Runtime.rounds_here)
    done = [r[name] for r in rounds if "pp" in r[name]]
    if len(done) < len(rounds):  # a round skipped or failed: report the first reason
        bad = next(r[name] for r in rounds if "pp" not in r[name])
        return bad
    first = dict(done[0])
    for key in ("pp", "tg"):
        first[key] = {**_spread([d[key]["mean"] for d in done]), "sd": done[0][key]["sd"]}
        first[key]["mean"] = first[key]["median"]  # tables read "mean": the process median
        refs = [r[REFERENCE][key]["mean"] for r in rounds if "pp" in r[REFERENCE]]
        if len(refs) == len(done):
            first[f"{key}_vs_reference"] = _spread(
                [d[key]["mean"] / ref for d, ref in zip(done, refs, strict=True)])
    first["ttft"] = {n: {"mean": float(np.median([d["ttft"][n]["mean"] for d in done])),
                         "sd": float(np.std([d["ttft"][n]["mean"] for d in done]))}
                     for n in done[0]["ttft"]}
    first["load_avg_1m"] = max(d.get("load_avg_1m") or 0.0 for d in done)
    first["noisy"] = first["load_avg_1m"] > (os.cpu_count() or 1) / 2
    first["rounds"] = len(done)
    return first


def run_matrix(
    spec: Spec, names: list[str] | None = None, *, thread_counts: list[int | None] | None = None,
    record: bool = True, progress: bool = True,
) -> dict[tuple[str, int | None], dict[str, Any]]:
    """Measure every runtime of ``names`` (default: all registered) at each thread count,
    ``spec.rounds`` times, each time in its own process, interleaved.

    Returns {(runtime, threads): aggregated result}; skipped/failed runtimes carry
    "skipped"/"failed" reasons (and ``labkit.core.skips.skip`` is told once). The reference
    (torch eager on the CPU) runs first in every round, because every ratio and parity needs it.
    """
    from labkit import runtimes

    names = list(names or runtimes.RUNTIMES)
    order = [REFERENCE] + [n for n in names if n != REFERENCE]
    wanted = runtimes_rounds(order, spec.rounds)
    counts = list(thread_counts) if thread_counts else [spec.threads]
    rounds: dict[int | None, list[dict]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory(prefix="labkit-parity-") as tmp:
        for r in range(spec.rounds):
            order_r = [n for n in order if n == REFERENCE or r < wanted[n]]
            for threads in counts:
                spec_t = Spec(**{**asdict(spec), "threads": threads})
                ref_file = Path(tmp) / f"ref-{threads}.npz"
                rounds[threads].append(one_round(spec_t, order_r, Path(tmp), ref_file))
                if progress:
                    for name, res in rounds[threads][-1].items():
                        print(f"[matrix] round {r + 1}/{spec.rounds}, {threads} thread(s), "
                              f"{name}: {status_line(res)} ({res['wall_s']:.0f} s)", flush=True)
                if r == 0:
                    for name, res in rounds[threads][0].items():
                        if "pp" in res:
                            res["parity"] = round_parity(res, name, spec_t, Path(tmp), ref_file)
        return _finish(spec, names, counts, rounds, record)


def runtimes_rounds(names: list[str], rounds: int) -> dict[str, int]:
    """runtime -> the processes it runs of ``rounds`` on this machine (``Runtime.rounds_here``)."""
    from labkit import runtimes

    return {n: runtimes.runtime_class(n).rounds_here(rounds) for n in names}


def _finish(spec: Spec, names: list[str], counts: list[int | None],
            rounds: dict[int | None, list[dict]], record: bool) -> dict:
    """Aggregate each (runtime, threads), tell the skips, write the records."""
    from labkit.core import skips

    out = {}
    for threads in counts:
        spec_t = Spec(**{**asdict(spec), "threads": threads})
        for name in names:
            res = aggregate(rounds[threads], name)
            res["parity"] = rounds[threads][0][name].get("parity")
            if "skipped" in res or "failed" in res:
                if threads == counts[0]:
                    why = res.get("skipped") or "failed: " + res["failed"].strip().splitlines()[-1]
                    skips.skip(f"runtime {name}", why)
            elif record:
                res["records"] = record_result(res, spec_t, res.get("parity"))
            out[(name, threads)] = res
    return out


def status_line(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return "skipped: " + res["skipped"]
    if "failed" in res:
        return "FAILED: " + res["failed"].strip().splitlines()[-1]
    return f"pp {res['pp']['mean']:.1f} tok/s, tg {res['tg']['mean']:.1f} tok/s"


def bench_frame(results: dict[tuple[str, int | None], dict[str, Any]], spec: Spec) -> Any:
    """llama-bench's table, one row per (runtime, threads, test): dtype, size, t/s (median over
    processes, min-max) and parity; a runtime that did not run gets one row that says why."""
    import pandas as pd

    rows = []
    for (name, threads), r in results.items():
        if "pp" not in r:
            why = r.get("skipped") or ("failed: " + r.get("failed", "").strip().splitlines()[-1:][0]
                                       if r.get("failed") else "?")
            rows.append({"runtime": name, "threads": threads, "test": "-", "t/s": why})
            continue
        par = r.get("parity") or {}
        err = par.get("max_abs_logit_err")
        for test, key in ((f"pp{spec.prompt_len}", "pp"), (f"tg{spec.gen_len}", "tg")):
            st = r[key]
            rows.append({
                "runtime": name, "threads": threads, "dtype": r["dtype"], "device": r["device"],
                "size": f"{r['model_bytes'] / 2**20:.1f} MiB" if r.get("model_bytes") else "-",
                "test": test, "t/s": f"{st['mean']:.2f} ({st.get('min', st['mean']):.2f}-"
                                     f"{st.get('max', st['mean']):.2f})",
                "agree %": f"{par['greedy_agreement_pct']:.0f}" if par else "-",
                "max |dlogit|": f"{err:.2e}" if err is not None else "-",
            })
    columns = ["runtime", "threads", "dtype", "device", "size", "test", "t/s", "agree %",
               "max |dlogit|"]
    return pd.DataFrame(rows, columns=columns).fillna("-")


def table(results: dict[tuple[str, int | None], dict[str, Any]], spec: Spec) -> str:
    """:func:`bench_frame` as a Markdown table, for a terminal (a cell's "|" escaped); t/s is
    the median over processes with their min-max."""
    frame = bench_frame(results, spec)

    def line(cells: Any) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    right = ("threads", "size", "t/s", "agree %", "max |dlogit|")
    rule = "| " + " | ".join("---:" if c in right else "---" for c in frame.columns) + " |"
    return "\n".join([line(frame.columns), rule, *(line(row) for row in frame.itertuples(index=False))])


def measured(results: dict[tuple[str, int | None], dict[str, Any]]) -> dict:
    """The (runtime, threads) entries that ran (skipped and failed ones left out)."""
    return {k: r for k, r in results.items() if "pp" in r}


def bench(quick: bool = False, model: str = "tiny-llama", runtimes: list[str] | None = None,
          prompt: int | None = None, gen: int | None = None) -> list[dict]:
    """`labkit bench runtimes`: the matrix on this machine; prints the table, returns the records."""
    spec = Spec.quick(model=model, threads=1) if quick else Spec(model=model)
    if prompt:
        spec.prompt_len = prompt
    if gen:
        spec.gen_len = gen
    res = run_matrix(spec, runtimes, thread_counts=[1] if quick else [1, 2])
    print(table(res, spec))
    return [r for v in res.values() for r in v.get("records", [])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.studies.runtime_benchmark", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu", help="device of the torch runtimes (cpu, cuda)")
    ap.add_argument("--runtimes", default="all", help="comma-separated names, or 'all'")
    ap.add_argument("--prompt", type=int, default=None, help="pp prompt length (default 512)")
    ap.add_argument("--gen", type=int, default=None, help="tg tokens (default 128)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats within a process")
    ap.add_argument("--rounds", type=int, default=None, help="processes per runtime (interleaved)")
    ap.add_argument("--threads", default=None, help="thread counts, comma-separated (e.g. 1,2)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="write records under OUT/data/results/ instead of the repo")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--parity-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # child process
        spec = Spec(**json.loads(args.spec))
        res = measure_one(args.one, spec, Path(args.parity_file) if args.parity_file else None)
        Path(args.result).write_text(json.dumps(res))
        return 0
    if args.out:
        os.environ["LABKIT_OUTPUT_ROOT"] = str(Path(args.out).resolve())
    kw: dict[str, Any] = {"model": args.model, "device": args.device}
    spec = Spec.quick(**kw) if args.quick else Spec(**kw)
    for attr, value in (("prompt_len", args.prompt), ("gen_len", args.gen),
                        ("repeats", args.repeats), ("rounds", args.rounds)):
        if value:
            setattr(spec, attr, value)
    counts = [int(x) for x in args.threads.split(",")] if args.threads else [None]
    names = None if args.runtimes == "all" else [n.strip() for n in args.runtimes.split(",")]
    if spec.device.startswith("cuda") and names is None:
        names = ["torch-eager", "torch-compile", "torch-cuda"]
    res = run_matrix(spec, names, thread_counts=counts)
    print(table(res, spec))
    return 0



# --------------------------------------------------------------------------- tables and figures


#: colour per precision of the weights (figures colour by what each runtime computes with)
PRECISION_COLOURS = {"float32": "tab:blue", "float16": "tab:orange", "bfloat16": "tab:brown",
                     "q8_0": "tab:green", "int8": "tab:olive", "q4_0": "tab:red",
                     "int4": "tab:purple"}


def _precision(dtype: str) -> str:
    d = str(dtype).lower()
    return next((k for k in PRECISION_COLOURS if k in d), "float32" if "32" in d else d)


def matrix_frame(results: dict[tuple[str, int | None], dict[str, Any]], spec: Spec) -> Any:
    """One row per measured (runtime, threads): pp, tg (median over processes, min-max), TTFT at
    the longest prompt, memory, parity, the load it ran under."""
    import pandas as pd

    longest = max(spec.ttft_lens)
    rows = []
    for (n, threads), r in measured(results).items():
        par = r.get("parity") or {}
        ttft = r["ttft"].get(str(longest), r["ttft"].get(longest))
        rows.append({
            "runtime": n, "threads": threads, "dtype": r["dtype"], "device": r["device"],
            f"pp{spec.prompt_len} tok/s": f"{r['pp']['mean']:.1f} ({r['pp']['min']:.1f}-{r['pp']['max']:.1f})",
            f"tg{spec.gen_len} tok/s": f"{r['tg']['mean']:.2f} ({r['tg']['min']:.2f}-{r['tg']['max']:.2f})",
            "TTFT ms (longest)": ttft["mean"] * 1e3,
            "peak RSS MiB": r["peak_rss_bytes"] / 2**20,
            "model MiB": (r.get("model_bytes") or 0) / 2**20,
            "agree %": par.get("greedy_agreement_pct"),
            "max |dlogit|": par.get("max_abs_logit_err"),
            "load avg (max)": r.get("load_avg_1m"), "noisy": r.get("noisy"),
            "note": r.get("note", ""),
        })
    return pd.DataFrame(rows).set_index(["runtime", "threads"])


def plot_matrix(results: dict[tuple[str, int | None], dict[str, Any]], spec: Spec, title: str):
    """pp and tg per runtime, one bar per thread count: the median over processes, the whiskers
    their min-max, coloured by the precision the runtime computes in, greedy agreement printed
    on each bar (a fast runtime that computes another function shows it)."""
    from labkit.core import plotting

    done = measured(results)
    labels = list(dict.fromkeys(n for n, _ in done))
    counts = list(dict.fromkeys(t for _, t in done))
    width = 0.8 / max(len(counts), 1)
    fig, axes = plotting.new_figure(1, 2, figsize=(13, 4.8))
    for ax, key, test in ((axes[0], "pp", f"pp{spec.prompt_len}"), (axes[1], "tg", f"tg{spec.gen_len}")):
        for j, threads in enumerate(counts):
            for i, name in enumerate(labels):
                r = done.get((name, threads))
                if r is None:
                    continue
                st, x = r[key], i + (j - (len(counts) - 1) / 2) * width
                ax.bar(x, st["mean"], width * 0.95, color=PRECISION_COLOURS.get(_precision(r["dtype"]), "grey"),
                       yerr=[[st["mean"] - st["min"]], [st["max"] - st["mean"]]], capsize=2,
                       hatch="//" if j else None, edgecolor="black", linewidth=0.4)
                agree = (r.get("parity") or {}).get("greedy_agreement_pct")
                if agree is not None:  # inside the bar, below its top: never outside the axes
                    ax.text(x, st["mean"] * 0.92, f"{agree:.0f}%", ha="center", va="top",
                            fontsize=6, rotation=90, color="white")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
        ax.set_yscale("log")
        top = max(r[key]["max"] for r in done.values())
        ax.set_ylim(top=top * 1.8)  # headroom for the whiskers and the legend
        ax.set(ylabel="tokens per second (log)", xlabel="runtime",
               title=f"{test}: median of {spec.rounds} processes (min-max)")
    _precision_legend(axes[0], done, counts)
    fig.suptitle(title)
    return fig


def _precision_legend(ax: Any, done: dict, counts: list) -> None:
    from matplotlib.patches import Patch

    seen = list(dict.fromkeys(_precision(r["dtype"]) for r in done.values()))
    handles = [Patch(color=PRECISION_COLOURS.get(p, "grey"), label=p) for p in seen]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="//" if j else None,
                      label=f"{t} thread(s)") for j, t in enumerate(counts)]
    ax.legend(handles=handles, fontsize=7, title="precision, threads; % = greedy agreement",
              title_fontsize=7)


def plot_ttft(results: dict[tuple[str, int | None], dict[str, Any]]):
    """Time to first token against prompt length, one line per runtime (at the first thread
    count measured), a colour and marker each."""
    from matplotlib import colormaps

    from labkit.core import plotting

    done = measured(results)
    first = next(iter(done))[1] if done else None
    lines = [(n, r) for (n, t), r in done.items() if t == first]
    colours = colormaps["tab20"].colors
    fig, ax = plotting.new_figure(figsize=(7.5, 4.8))
    for i, (n, r) in enumerate(lines):
        lens = sorted(int(k) for k in r["ttft"])
        ax.plot(lens, [r["ttft"][str(k) if str(k) in r["ttft"] else k]["mean"] * 1e3 for k in lens],
                marker="os^vD<>pPX*h"[i % 12], color=colours[i % len(colours)], label=n)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="prompt length (tokens)", ylabel="time to first token (ms)",
           title=f"TTFT against prompt length ({first} thread(s), median over processes)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_machines(latest: Any):
    """pp and tg of every runtime on every machine with records (latest each), grouped bars."""
    from labkit.core import plotting

    machines = sorted(latest["where"].unique())
    fig, axes = plotting.new_figure(1, 2, figsize=(13, 4.5))
    for ax, metric in zip(axes, ["pp_tok_s", "tg_tok_s"], strict=True):
        sub = latest[latest["metric"] == metric]
        rts = sorted(sub["runtime"].unique())
        width = 0.8 / max(len(machines), 1)
        for i, m in enumerate(machines):
            vals = [sub[(sub["runtime"] == r) & (sub["where"] == m)]["value"].max() for r in rts]
            ax.bar(np.arange(len(rts)) + i * width, vals, width, label=m)
        ax.set_xticks(np.arange(len(rts)) + 0.4 - width / 2, rts, rotation=35, ha="right")
        ax.set_yscale("log")
        ax.set(ylabel="tokens per second (log)", xlabel="runtime",
               title=metric.replace("_tok_s", "") + " across machines (latest record each)")
    axes[1].legend(fontsize=7)
    return fig


def parity_claims(results: dict[tuple[str, int | None], dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(claim, verdict, value) for "What the numbers say": the reference agrees with itself, each
    float32 runtime computes its logits (``tolerances.RUNTIME_MATRIX`` on its device), llama.cpp's F32 GGUF closer still;
    at every thread count measured."""
    from labkit.core import tolerances

    rows = []
    for (n, threads), r in measured(results).items():
        par = r["parity"]
        err, agree = par["max_abs_logit_err"], par["greedy_agreement_pct"]
        value = f"max |dlogit| {err:.1e}, greedy tokens {agree:.0f} % equal" if err is not None \
            else f"greedy tokens {agree:.0f} % equal"
        bound = (tolerances.GGUF_F32.at("cpu") if n.startswith("llama.cpp")
                 else tolerances.RUNTIME_MATRIX.at(r["device"]))  # MLX's "gpu": Metal
        at = f" ({threads} thread{'s' if threads != 1 else ''})"
        if n == REFERENCE:
            rows.append((f"{n}, the reference, agrees with itself on every greedy token{at}",
                         agree == 100.0, value))
        elif n in FLOAT32 and r["dtype"] == "float32" and err is not None:
            rows.append((f"{n} computes torch float32's logits within {bound:g}{at}", err <= bound,
                         value))
    return rows


def ratios(results: dict[tuple[str, int | None], dict[str, Any]]) -> Any:
    """Each (runtime, threads): pp and tg over torch eager's at the same thread count, taken
    within each round (median, min-max over rounds), with parity and the load it ran under."""
    import pandas as pd

    rows = {}
    for (n, threads), r in measured(results).items():
        pp, tg = r.get("pp_vs_reference") or {}, r.get("tg_vs_reference") or {}
        rows[(n, threads)] = {
            "pp / torch eager": pp.get("median"), "pp min-max": _range(pp),
            "tg / torch eager": tg.get("median"), "tg min-max": _range(tg),
            "agree %": (r.get("parity") or {}).get("greedy_agreement_pct"),
            "max |dlogit|": (r.get("parity") or {}).get("max_abs_logit_err"),
            "load avg (max)": r.get("load_avg_1m"), "noisy": r.get("noisy")}
    return pd.DataFrame(rows).T


def _range(spread: dict) -> str:
    return f"{spread['min']:.2f}-{spread['max']:.2f}" if spread else ""


if __name__ == "__main__":
    raise SystemExit(main())
