"""The runtime benchmark matrix: every runtime x (pp, tg, TTFT, peak RSS, bytes, parity).

``python -m labkit.studies.runtime_benchmark --device cpu --out DIR`` (no Jupyter needed: this is how the
CUDA column is measured on a GPU machine) or ``labkit bench runtimes`` or notebook 08.

How it runs, and why:

* each runtime in its own Python process (``--one``), so its peak RSS is its own (a shared
  process would report the largest runtime's peak for every later one) and a crash, a compile
  cache or a thread pool of one runtime cannot touch the next;
* torch eager float32 runs first: its greedy tokens and logits are the parity reference;
* pp = prompt tokens / prefill seconds on ``prompt_len`` tokens, tg = ``gen_len`` decode steps
  after one token, both repeated (mean +- sd, as llama-bench), after one untimed warm-up;
* TTFT = prefill seconds of a prompt, for each length of ``ttft_lens``;
* parity: greedy ``parity_gen`` tokens after a held-out prompt vs the reference
  (``base.parity``).

Records (study "08_runtime_benchmark"): pp_tok_s, tg_tok_s, ttft_ms, peak_rss_bytes,
model_bytes, load_s, greedy_agreement_pct, max_abs_logit_err; params carry runtime, dtype,
prompt_len, gen_len, repeats, sd, threads, load_avg_1m and the runtime's note.
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
#: Runtimes that run the float32 weights in float32 and expose logits: held to FLOAT32_PARITY.
FLOAT32 = ("torch-eager", "torch-compile", "torch-cuda", "onnxruntime", "mlx", "swift", "llama.cpp-f32")
#: Max |dlogit| against torch float32 over the positions where both saw the same tokens: the
#: reordered sums of another runtime, accumulated over the parity run's greedy steps.
FLOAT32_PARITY = 2e-3


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

    @classmethod
    def quick(cls, **kw: Any) -> Spec:
        """Small sizes, few repeats: every code path, a fraction of the time."""
        base = dict(prompt_len=64, gen_len=16, repeats=2, ttft_lens=[16, 64], parity_prompt=16,
                    parity_gen=16)
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
    if name in ("torch-eager", "torch-compile") and spec.device != "cpu":
        kw["device"] = spec.device
    return kw


def measure_one(name: str, spec: Spec, parity_file: Path | None) -> dict[str, Any]:
    """Load runtime ``name`` and measure it (runs in the child process). Never raises for an
    unavailable runtime: returns {"skipped": reason}."""
    from labkit import runtimes
    from labkit.runtimes.base import children_peak_rss_bytes, peak_rss_bytes, time_pp, time_tg

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
        np.savez(parity_file, tokens=np.asarray(run.tokens), logits=logits)
    pp, pp_s = time_pp(rt, prompt_ids(folder, spec.prompt_len), spec.repeats)
    tg = time_tg(rt, spec.gen_len, spec.repeats, start=prompt_ids(folder, 1))
    ttft = {}
    for n in spec.ttft_lens:
        ttft[n] = asdict(time_pp(rt, prompt_ids(folder, n, window=2), spec.repeats)[1])
    peak, note = peak_rss_bytes(), rt.note
    children = children_peak_rss_bytes()
    if children > peak:  # the runtime ran in a child process of its own (the Swift CLI)
        peak = children
        note = (note + "; " if note else "") + "peak RSS: the CLI's ru_maxrss (an upper bound)"
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
            "threads": spec.threads, "load_avg_1m": res.get("load_avg_1m"), "note": res.get("note", "")}
    kw = {"runtime": name, "device": res["device"], "model": spec.model}
    recs = []

    def rec(metric: str, value: float, unit: str, **params: Any) -> None:
        recs.append(results.record(STUDY, metric, value, unit, **kw, params={**base, **params}))

    rec("pp_tok_s", res["pp"]["mean"], "tok/s", prompt_len=spec.prompt_len, gen_len=0,
        sd=res["pp"]["sd"], samples=res["pp"]["samples"])
    rec("tg_tok_s", res["tg"]["mean"], "tok/s", prompt_len=1, gen_len=spec.gen_len,
        sd=res["tg"]["sd"], samples=res["tg"]["samples"])
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

    return parity(read(path), read(ref_path), exposes_logits=True)


def run_matrix(
    spec: Spec, names: list[str] | None = None, *, record: bool = True, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Measure every runtime of ``names`` (default: all registered), each in its own process.

    Returns {runtime: result dict}; skipped/failed runtimes carry "skipped"/"failed" reasons
    (and ``labkit.core.skips.skip`` is told). The reference (torch-eager on the CPU) is run first
    even when not asked for, because every parity number needs it.
    """
    from labkit import runtimes
    from labkit.core import skips

    names = list(names or runtimes.RUNTIMES)
    ref_spec = Spec(**{**asdict(spec), "device": "cpu"})
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="labkit-parity-") as tmp:
        ref_file = Path(tmp) / "ref.npz"
        order = [REFERENCE] + [n for n in names if n != REFERENCE]
        for name in order:
            t0 = time.time()
            spec_n = ref_spec if name == REFERENCE else spec
            res = run_isolated(name, spec_n, Path(tmp) / f"{name}.npz" if name != REFERENCE else ref_file)
            res["load_avg_1m"] = load_average()
            res["wall_s"] = time.time() - t0
            if name != REFERENCE and "skipped" not in res and "failed" not in res:
                res["parity"] = _parity_of(Path(tmp) / f"{name}.npz", ref_file)
            elif name == REFERENCE and "pp" in res:
                res["parity"] = {"greedy_agreement_pct": 100.0, "first_divergence": spec.parity_gen,
                                 "max_abs_logit_err": 0.0}
            if "skipped" in res:
                skips.skip(f"runtime {name}", res["skipped"])
            elif "failed" in res:
                skips.skip(f"runtime {name}", "failed: " + res["failed"].strip().splitlines()[-1])
            elif record and (name in names):
                res["records"] = record_result(res, spec_n, res.get("parity"))
            if name in names:
                out[name] = res
            if progress:
                print(f"[matrix] {name}: {_status(res)} ({res['wall_s']:.0f} s)", flush=True)
    return out


def _status(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return "skipped: " + res["skipped"]
    if "failed" in res:
        return "FAILED: " + res["failed"].strip().splitlines()[-1]
    return f"pp {res['pp']['mean']:.1f} tok/s, tg {res['tg']['mean']:.1f} tok/s"


def bench_frame(results_by_runtime: dict[str, dict[str, Any]], spec: Spec) -> Any:
    """llama-bench's table, one row per (runtime, test): dtype, size, t/s (mean ± sd) and parity;
    a runtime that did not run gets one row that says why."""
    import pandas as pd

    rows = []
    for name, r in results_by_runtime.items():
        if "pp" not in r:
            why = r.get("skipped") or ("failed: " + r.get("failed", "").strip().splitlines()[-1:][0]
                                       if r.get("failed") else "?")
            rows.append({"runtime": name, "test": "-", "t/s": why})
            continue
        par = r.get("parity") or {}
        err = par.get("max_abs_logit_err")
        for test, key in ((f"pp{spec.prompt_len}", "pp"), (f"tg{spec.gen_len}", "tg")):
            rows.append({
                "runtime": name, "dtype": r["dtype"], "device": r["device"],
                "size": f"{r['model_bytes'] / 2**20:.1f} MiB" if r.get("model_bytes") else "-",
                "test": test, "t/s": f"{r[key]['mean']:.2f} ± {r[key]['sd']:.2f}",
                "agree %": f"{par['greedy_agreement_pct']:.0f}" if par else "-",
                "max |dlogit|": f"{err:.2e}" if err is not None else "-",
            })
    columns = ["runtime", "dtype", "device", "size", "test", "t/s", "agree %", "max |dlogit|"]
    return pd.DataFrame(rows, columns=columns).fillna("-")


def table(results_by_runtime: dict[str, dict[str, Any]], spec: Spec) -> str:
    """:func:`bench_frame` as a Markdown table, for a terminal (a cell's "|" escaped)."""
    frame = bench_frame(results_by_runtime, spec)

    def line(cells: Any) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = "| " + " | ".join("---:" if c in ("size", "t/s", "agree %", "max |dlogit|") else "---"
                             for c in frame.columns) + " |"
    return "\n".join([line(frame.columns), rule, *(line(row) for row in frame.itertuples(index=False))])


def bench(quick: bool = False, model: str = "tiny-llama", runtimes: list[str] | None = None,
          prompt: int | None = None, gen: int | None = None) -> list[dict]:
    """`labkit bench runtimes`: the matrix on this machine; prints the table, returns the records."""
    spec = Spec.quick(model=model, threads=1) if quick else Spec(model=model)
    if prompt:
        spec.prompt_len = prompt
    if gen:
        spec.gen_len = gen
    res = run_matrix(spec, runtimes)
    print(table(res, spec))
    return [r for v in res.values() for r in v.get("records", [])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.studies.runtime_benchmark", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--device", default="cpu", help="device of the torch runtimes (cpu, cuda)")
    ap.add_argument("--runtimes", default="all", help="comma-separated names, or 'all'")
    ap.add_argument("--prompt", type=int, default=None, help="pp prompt length (default 512)")
    ap.add_argument("--gen", type=int, default=None, help="tg tokens (default 128)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
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
    kw: dict[str, Any] = {"model": args.model, "device": args.device, "threads": args.threads}
    spec = Spec.quick(**kw) if args.quick else Spec(**kw)
    for attr, value in (("prompt_len", args.prompt), ("gen_len", args.gen), ("repeats", args.repeats)):
        if value:
            setattr(spec, attr, value)
    names = None if args.runtimes == "all" else [n.strip() for n in args.runtimes.split(",")]
    if spec.device.startswith("cuda") and names is None:
        names = ["torch-eager", "torch-compile", "torch-cuda"]
    res = run_matrix(spec, names)
    print(table(res, spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------- tables and figures


def matrix_frame(measured: dict[str, dict[str, Any]], spec: Spec) -> Any:
    """One row per measured runtime: pp, tg (mean ± sd), TTFT at the longest prompt, memory, parity."""
    import pandas as pd

    longest = max(spec.ttft_lens)
    rows = []
    for n, r in measured.items():
        par = r.get("parity") or {}
        ttft = r["ttft"].get(str(longest), r["ttft"].get(longest))
        rows.append({
            "runtime": n, "dtype": r["dtype"], "device": r["device"],
            f"pp{spec.prompt_len} tok/s": f"{r['pp']['mean']:.1f} ± {r['pp']['sd']:.1f}",
            f"tg{spec.gen_len} tok/s": f"{r['tg']['mean']:.2f} ± {r['tg']['sd']:.2f}",
            "TTFT ms (longest)": ttft["mean"] * 1e3,
            "peak RSS MiB": r["peak_rss_bytes"] / 2**20,
            "model MiB": (r.get("model_bytes") or 0) / 2**20,
            "agree %": par.get("greedy_agreement_pct"),
            "max |dlogit|": par.get("max_abs_logit_err"),
            "load avg": r.get("load_avg_1m"),
            "note": r.get("note", ""),
        })
    return pd.DataFrame(rows).set_index("runtime")


def plot_matrix(measured: dict[str, dict[str, Any]], spec: Spec, title: str):
    """pp and tg per runtime (mean ± sd over the repeats), side by side."""
    from labkit.core import plotting

    fig, axes = plotting.new_figure(1, 2, figsize=(12, 4.5))
    labels = list(measured)
    x = np.arange(len(labels))
    for ax, key, test in ((axes[0], "pp", f"pp{spec.prompt_len}"), (axes[1], "tg", f"tg{spec.gen_len}")):
        ax.bar(x, [measured[n][key]["mean"] for n in labels],
               yerr=[measured[n][key]["sd"] for n in labels], capsize=3, color="tab:blue")
        ax.set_xticks(x, labels, rotation=35, ha="right")
        ax.set(ylabel="tokens per second", xlabel="runtime",
               title=f"{test} (mean ± sd, {spec.repeats} repeats)")
    fig.suptitle(title)
    return fig


def plot_ttft(measured: dict[str, dict[str, Any]]):
    """Time to first token against prompt length, one line per runtime (log-log)."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure(figsize=(7, 4.5))
    for n, r in measured.items():
        lens = sorted(int(k) for k in r["ttft"])
        ax.plot(lens, [r["ttft"][str(k) if str(k) in r["ttft"] else k]["mean"] * 1e3 for k in lens],
                marker="o", label=n)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="prompt length (tokens)", ylabel="time to first token (ms)",
           title="TTFT against prompt length")
    ax.legend(fontsize=8)
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


def parity_claims(measured: dict[str, dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(claim, verdict, value) for "What the numbers say": the reference agrees with itself, each
    float32 runtime computes its logits (``FLOAT32_PARITY``), llama.cpp's F32 GGUF closer still."""
    from labkit.core import tolerances

    rows = []
    for n, r in measured.items():
        par = r["parity"]
        err, agree = par["max_abs_logit_err"], par["greedy_agreement_pct"]
        value = f"max |dlogit| {err:.1e}, greedy tokens {agree:.0f} % equal" if err is not None \
            else f"greedy tokens {agree:.0f} % equal"
        bound = tolerances.GGUF_F32.at("cpu") if n == "llama.cpp-f32" else FLOAT32_PARITY
        if n == REFERENCE:
            rows.append((f"{n}, the reference, agrees with itself on every greedy token", agree == 100.0, value))
        elif n in FLOAT32 and r["dtype"] == "float32" and err is not None:
            rows.append((f"{n} computes torch float32's logits within {bound:g}", err <= bound, value))
    return rows


def ratios(measured: dict[str, dict[str, Any]]) -> Any:
    """Each runtime's pp and tg over torch eager's, with its parity and the load it ran under."""
    import pandas as pd

    ref = measured[REFERENCE]
    return pd.DataFrame({
        n: {"pp / torch eager": r["pp"]["mean"] / ref["pp"]["mean"],
            "tg / torch eager": r["tg"]["mean"] / ref["tg"]["mean"],
            "agree %": r["parity"]["greedy_agreement_pct"],
            "max |dlogit|": r["parity"]["max_abs_logit_err"],
            "load avg": r.get("load_avg_1m")}
        for n, r in measured.items()
    }).T
