"""Flash attention, measured (notebook 06): exactness, peak memory, time and block size.

The kernels live in ``labkit.models.attention`` (naive, SDPA, tiled) and
``labkit.models.attention_mlx`` (MLX tiled and fused); the allocator counters in
``labkit.core.memory``. This module runs them over the notebook's sweeps, turns each sweep into
a DataFrame and records, draws its figure, and reads the records other machines committed, so
the notebook only asks the questions and shows the answers.

Every sweep takes a :class:`Setup` (the ``[B, H, N, d]`` shape, the mask, and where torch and
MLX run) and returns one row per (implementation, N, block). ``block`` is the tile size
``B_r = B_c`` of the tiled forwards and None for the others.

torch, pandas and matplotlib are imported inside the functions, so importing this module is
light; mlx only where MLX runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from labkit.core import checks, tolerances

if TYPE_CHECKING:
    import pandas as pd
    import torch

STUDY = "06_flash_attention"
TORCH_IMPLS = ("naive", "sdpa", "tiled")
#: The exactness claim on a CPU: float32 rounding of a different summation order, the CPU bound
#: of ``tolerances.ATTENTION`` (:func:`tolerance` gives the bound of a run's devices).
TOLERANCE = tolerances.ATTENTION.at("cpu")
FLOAT32_BYTES = 4
MIB = 2**20

Progress = Callable[..., Iterable[Any]]
"""A tqdm-like wrapper ``progress(iterable, desc=...)``; the default shows nothing."""


def _quiet(iterable: Iterable[Any], **_: Any) -> Iterable[Any]:
    return iterable


@dataclass(frozen=True)
class Setup:
    """What every section shares: the shape of q, k, v, the mask, and where each library runs.

    ``device`` is torch's device; ``mlx_device`` is ``"gpu"`` or ``"cpu"`` where MLX runs and
    None where it cannot (then the MLX rows are left out). ``seed`` fixes the inputs.
    """

    batch: int
    heads: int
    head_dim: int
    causal: bool
    device: str = "cpu"
    mlx_device: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "head_dim"):
            checks.positive_int(getattr(self, name), name, "Setup")
        checks.nonnegative_int(self.seed, "seed", "Setup")
        if self.mlx_device is not None:
            checks.one_of(self.mlx_device, "mlx_device", ("gpu", "cpu"), "Setup")

    def qkv(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standard-normal q, k, v of length ``n`` on ``device``, the same for every
        implementation (the generator is seeded with ``seed + n``)."""
        import torch

        generator = torch.Generator().manual_seed(self.seed + n)
        shape = (self.batch, self.heads, n, self.head_dim)
        return tuple(torch.randn(shape, generator=generator).to(self.device) for _ in range(3))

    def runtime_device(self, impl: str) -> tuple[str, str]:
        """(runtime, device) of a record of ``impl``: MLX's own device for the MLX rows."""
        return ("mlx", self.mlx_device) if impl.startswith("mlx") else ("torch", self.device)

    def score_matrix_bytes(self, n: int) -> int:
        """Bytes of one ``N x N`` float32 score matrix over all heads: a formula, not a
        measurement, to hold the measured peaks against."""
        return self.batch * self.heads * n * n * FLOAT32_BYTES


def tolerance(setup: Setup) -> float:
    """The exactness bound of this run: ``tolerances.ATTENTION`` on torch's device, or on the
    Apple GPU where MLX runs on Metal, whichever is looser (every row is held to it)."""
    devices = [setup.device] + (["mps"] if setup.mlx_device == "gpu" else [])
    return max(tolerances.ATTENTION.at(d) for d in devices)


def describe(setup: Setup) -> str:
    """Where torch and MLX run here, and the shape: the lines the notebook opens with."""
    import torch

    lines = []
    if setup.mlx_device is not None:
        import mlx.core as mx

        note = ("on the GPU through Metal" if setup.mlx_device == "gpu"
                else "on the CPU (no Metal GPU here; on a Mac this would run on the GPU)")
        lines.append(f"MLX {mx.__version__} runs {note}")
    lines.append(f"torch {torch.__version__} on {setup.device}, {torch.get_num_threads()} threads; "
                 f"shapes [B={setup.batch}, H={setup.heads}, N, d={setup.head_dim}] float32, "
                 f"causal={setup.causal}")
    return "\n".join(lines)


# --- the implementations, by the names the records use ----------------------------------------


def torch_impls(block: int) -> dict[str, Callable[..., Any]]:
    """name -> f(q, k, v, causal) for the torch implementations; "tiled" with B_r = B_c = block."""
    from labkit.models.attention import IMPLEMENTATIONS, tiled_attention

    return {
        "naive": IMPLEMENTATIONS["naive"],
        "sdpa": IMPLEMENTATIONS["sdpa"],
        "tiled": lambda q, k, v, c: tiled_attention(q, k, v, c, block_q=block, block_k=block),
    }


def mlx_impls(block: int) -> dict[str, Callable[..., Any]]:
    """name -> f(q, k, v, causal) for MLX arrays: our tiled forward and mx.fast's fused kernel."""
    from labkit.models import attention_mlx

    return {
        "mlx_tiled": lambda q, k, v, c: attention_mlx.tiled_attention_mlx(q, k, v, c, block, block),
        "mlx_sdpa": attention_mlx.sdpa_attention_mlx,
    }


def to_mlx(*tensors: torch.Tensor) -> tuple[Any, ...]:
    """The same values as MLX arrays (through the CPU), evaluated so no later timer sees the copy."""
    import mlx.core as mx

    arrays = tuple(mx.array(t.cpu().numpy()) for t in tensors)
    mx.eval(*arrays)
    return arrays


def block_of(impl: str, block: int) -> int | None:
    """The tile size of a row: ``block`` for the tiled forwards, None for the others."""
    return block if impl.endswith("tiled") else None


def block_param(value: Any) -> int | None:
    """The block of a record's params: an int for the tiled forwards, None (JSON null) otherwise.
    (A DataFrame column of ints and Nones holds floats and NaN.)"""
    import pandas as pd

    return None if value is None or pd.isna(value) else int(value)


# --- 1. exactness ------------------------------------------------------------------------------


def exactness(
    setup: Setup, seq_lens: Sequence[int], block: int, progress: Progress = _quiet
) -> pd.DataFrame:
    """Max |out - SDPA out| of every implementation but SDPA, causal and not, at each N."""
    import numpy as np
    import pandas as pd

    from labkit.models.attention import sdpa_attention

    rows = []
    for n in progress(seq_lens, desc="exactness"):
        q, k, v = setup.qkv(n)
        for causal in (False, True):
            reference = sdpa_attention(q, k, v, causal)
            for impl, fn in torch_impls(block).items():
                if impl != "sdpa":
                    err = (fn(q, k, v, causal) - reference).abs().max().item()
                    rows.append(dict(impl=impl, seq_len=n, causal=causal,
                                     block=block_of(impl, block), max_abs_err=err))
            if setup.mlx_device is not None:
                mq, mk, mv = to_mlx(q, k, v)
                ref_np = reference.cpu().numpy()
                for impl, fn in mlx_impls(block).items():
                    err = float(np.abs(np.array(fn(mq, mk, mv, causal)) - ref_np).max())
                    rows.append(dict(impl=impl, seq_len=n, causal=causal,
                                     block=block_of(impl, block), max_abs_err=err))
    return pd.DataFrame(rows)


def exactness_records(exact: pd.DataFrame, setup: Setup) -> list[dict[str, Any]]:
    """One ``max_abs_err`` record per row of :func:`exactness`."""
    return [
        dict(study=STUDY, metric="max_abs_err", value=r.max_abs_err, unit="1",
             runtime=setup.runtime_device(r.impl)[0], device=setup.runtime_device(r.impl)[1],
             params=dict(impl=r.impl, seq_len=int(r.seq_len), block=block_param(r.block),
                         causal=bool(r.causal), reference="torch_sdpa", dtype="float32",
                         heads=setup.heads, head_dim=setup.head_dim))
        for r in exact.itertuples()
    ]


def plot_exactness(exact: pd.DataFrame, tolerance: float = TOLERANCE) -> Any:
    """Error against SDPA by N, one line per implementation and mask, and the tolerance."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    for impl, group in exact.groupby("impl", sort=False):
        for causal, marker, style in ((False, "o", "-"), (True, "s", "--")):
            g = group[group.causal == causal]
            # an error of exactly 0 (N=1: softmax of one score is 1) cannot sit on a log axis
            ax.plot(g.seq_len, g.max_abs_err.clip(lower=1e-9), marker=marker, linestyle=style,
                    label=f"{impl}{' causal' if causal else ''}")
    ax.axhline(tolerance, color="black", linestyle=":", label=f"tolerance {tolerance:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("max |out − SDPA out| (float32, 0 drawn at 1e-9)")
    ax.set_title("Exactness against torch SDPA")
    ax.legend(ncol=2, fontsize=8)
    return fig


# --- 2. peak memory ----------------------------------------------------------------------------


def torch_peak_missing(device: str) -> str | None:
    """None where torch's peak memory can be measured on ``device``, else the reason (MPS)."""
    import torch

    from labkit.core.memory import peak_bytes

    try:
        peak_bytes(lambda: torch.zeros(1, device=device), device)
    except NotImplementedError as exc:
        return str(exc)
    return None


def peak_memory(
    setup: Setup, seq_lens: Sequence[int], block: int, *, torch_peaks: bool = True,
    progress: Progress = _quiet,
) -> pd.DataFrame:
    """Measured peak bytes of one call of each implementation at each N (``setup.causal``).

    ``torch_peaks=False`` leaves the torch rows out (no counter on this device); the MLX rows
    come from MLX's allocator where MLX runs.
    """
    import pandas as pd

    from labkit.core.memory import peak_bytes, peak_mlx_bytes

    causal, rows = setup.causal, []
    for n in progress(seq_lens, desc="peak memory"):
        q, k, v = setup.qkv(n)
        if torch_peaks:
            for impl, fn in torch_impls(block).items():
                peak, _ = peak_bytes(partial(fn, q, k, v, causal), setup.device)
                rows.append(dict(impl=impl, seq_len=n, block=block_of(impl, block), peak_bytes=peak))
        if setup.mlx_device is not None:
            mq, mk, mv = to_mlx(q, k, v)
            for impl, fn in mlx_impls(block).items():
                peak, _ = peak_mlx_bytes(partial(fn, mq, mk, mv, causal))
                rows.append(dict(impl=impl, seq_len=n, block=block_of(impl, block), peak_bytes=peak))
        del q, k, v
    return pd.DataFrame(rows, columns=["impl", "seq_len", "block", "peak_bytes"])


def peak_memory_records(mem: pd.DataFrame, setup: Setup) -> list[dict[str, Any]]:
    """One ``peak_bytes`` record per row of :func:`peak_memory`."""
    return [
        dict(study=STUDY, metric="peak_bytes", value=int(r.peak_bytes), unit="bytes",
             runtime=setup.runtime_device(r.impl)[0], device=setup.runtime_device(r.impl)[1],
             params=dict(impl=r.impl, seq_len=int(r.seq_len), block=block_param(r.block),
                         causal=setup.causal, **_shape_params(setup)))
        for r in mem.itertuples()
    ]


def _shape_params(setup: Setup) -> dict[str, Any]:
    return dict(batch=setup.batch, heads=setup.heads, head_dim=setup.head_dim, dtype="float32")


def _against_n(ax: Any, ylabel: str) -> None:
    """Log-log axes over the sequence length N (powers of 2): a power law is a straight line."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel(ylabel)


def peak_memory_table(mem: pd.DataFrame, setup: Setup) -> pd.DataFrame:
    """Peak MiB by N (rows) and implementation (columns), beside one N x N score matrix."""
    table = mem.pivot_table(index="seq_len", columns="impl", values="peak_bytes") / MIB
    table["S bytes (formula)"] = [setup.score_matrix_bytes(n) / MIB for n in table.index]
    return table.round(2).rename_axis(columns="peak MiB")


def fitted_exponent(df: pd.DataFrame, y: str, last: int = 3) -> float:
    """Slope of log(y) against log(N) over the ``last`` largest N: the growth exponent there
    (2 for a quantity that grows like N², 1 for one that grows like N)."""
    import numpy as np

    tail = df.sort_values("seq_len").tail(last)
    return float(np.polyfit(np.log(tail.seq_len), np.log(tail[y]), 1)[0])


def growth_exponents(mem: pd.DataFrame) -> dict[str, float]:
    """impl -> fitted exponent of its peak bytes against N (largest 3 N)."""
    return {impl: fitted_exponent(g, "peak_bytes") for impl, g in mem.groupby("impl")}


def plot_peak_memory(mem: pd.DataFrame, exponents: dict[str, float], setup: Setup) -> Any:
    """Peak MiB against N on log-log axes, with guides that grow like N and like N²."""
    import numpy as np

    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    for impl, g in mem.groupby("impl", sort=False):
        ax.plot(g.seq_len, g.peak_bytes / MIB, marker="o",
                label=f"{impl} ({setup.runtime_device(impl)[1]}), slope {exponents[impl]:.2f}")
    if not mem.empty:
        ns = np.array(sorted(mem.seq_len.unique()), dtype=float)
        y0 = mem[mem.seq_len == ns[0]].peak_bytes.median() / MIB
        ax.plot(ns, y0 * (ns / ns[0]), color="grey", linestyle=":", label="guide: ∝ N")
        ax.plot(ns, y0 * (ns / ns[0]) ** 2, color="grey", linestyle="--", label="guide: ∝ N²")
    _against_n(ax, "peak allocated during the call (MiB)")
    ax.set_title(f"Peak memory of one attention call (H={setup.heads}, d={setup.head_dim}, "
                 f"causal={setup.causal})")
    ax.legend(fontsize=8)
    return fig


def peaks_at_largest(mem: pd.DataFrame, setup: Setup) -> tuple[int, pd.Series, int]:
    """(largest N, peak bytes by impl there, bytes of one N x N score matrix there)."""
    n_max = int(mem.seq_len.max())
    at_max = mem[mem.seq_len == n_max].set_index("impl").peak_bytes
    return n_max, at_max, setup.score_matrix_bytes(n_max)


# --- 3. time -----------------------------------------------------------------------------------


#: Fitted peak-memory exponents that tell N² from N, with room for the terms that grow like N
#: (the output, one block's rows), which still weigh at these sizes.
QUADRATIC_ABOVE, LINEAR_BELOW = 1.7, 1.3


def memory_claims(exponents: dict[str, float], at_max: pd.Series, score_bytes: int,
                  n_max: int) -> list[tuple[str, bool, str]]:
    """(claim, verdict, value): naive attention's peak grows like N² and holds a whole score
    matrix; the tiled forward's grows at most like N and never holds one."""
    naive, tiled = at_max["naive"], at_max["tiled"]
    return [
        (f"naive attention's peak memory grows like N² (fitted exponent above {QUADRATIC_ABOVE})",
         exponents["naive"] > QUADRATIC_ABOVE, f"exponent {exponents['naive']:.2f}"),
        (f"the tiled forward's peak memory grows at most like N (exponent below {LINEAR_BELOW})",
         exponents["tiled"] < LINEAR_BELOW, f"exponent {exponents['tiled']:.2f}"),
        (f"at N={n_max} naive attention holds at least one full N x N score matrix",
         bool(naive >= score_bytes), f"{naive / 2**20:.1f} MiB, {naive / score_bytes:.2f} score matrices"),
        (f"at N={n_max} the tiled forward never holds one", bool(tiled < score_bytes),
         f"{tiled / 2**20:.2f} MiB, {naive / tiled:.0f}x less than naive for the same output"),
    ]


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): printed and recorded beside the
    timings, because other programs on the same cores inflate and scatter them."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_note(before: float | None, after: float | None) -> str:
    """How busy the machine was around the timings, in one line."""
    if before is None or after is None:
        return "no load average on this system: the timings' competition is unknown"
    return (f"1-minute load average: {before:.1f} before, {after:.1f} after the timings "
            f"({os.cpu_count()} logical cores)")


def _evaluated(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` computed: MLX is lazy, so a timer must include ``mx.eval``."""
    from labkit.core import timing

    return timing.mlx_sync(fn(*args))


def _time_row(stats: Any, **row: Any) -> dict[str, Any]:
    return dict(row, ms=stats.median_ms, p10_ms=stats.p10_ms, p90_ms=stats.p90_ms, n=stats.n)


def time_sweep(
    setup: Setup, seq_lens: Sequence[int], block: int, *, warmup: int, repeats: int,
    sync: Callable[[], None] | None = None, progress: Progress = _quiet,
) -> pd.DataFrame:
    """Median, p10 and p90 ms of one call of each implementation at each N (``setup.causal``).

    MLX is lazy: its calls are timed with their evaluation (``timing.mlx_sync``)."""
    import pandas as pd

    from labkit.core import timing

    causal, rows = setup.causal, []
    for n in progress(seq_lens, desc="time"):
        q, k, v = setup.qkv(n)
        for impl, fn in torch_impls(block).items():
            stats = timing.measure(partial(fn, q, k, v, causal), warmup=warmup, repeats=repeats,
                                   sync=sync)
            rows.append(_time_row(stats, impl=impl, seq_len=n, block=block_of(impl, block)))
        if setup.mlx_device is not None:
            mq, mk, mv = to_mlx(q, k, v)
            for impl, fn in mlx_impls(block).items():
                stats = timing.measure(partial(_evaluated, fn, mq, mk, mv, causal),
                                       warmup=warmup, repeats=repeats)
                rows.append(_time_row(stats, impl=impl, seq_len=n, block=block_of(impl, block)))
    return pd.DataFrame(rows)


def _ms_records(row: Any, runtime: str, device: str, params: dict[str, Any]) -> list[dict]:
    """The ``ms``, ``ms_p10`` and ``ms_p90`` records of one timed row."""
    return [dict(study=STUDY, metric=metric, value=value, unit="ms", runtime=runtime,
                 device=device, params=params)
            for metric, value in (("ms", row.ms), ("ms_p10", row.p10_ms), ("ms_p90", row.p90_ms))]


def time_records(
    times: pd.DataFrame, setup: Setup, load_after: float | None = None
) -> list[dict[str, Any]]:
    """The timing records of :func:`time_sweep` (with torch's thread count), and the load
    average after them where there is one."""
    import torch

    records = []
    for r in times.itertuples():
        params = dict(impl=r.impl, seq_len=int(r.seq_len), block=block_param(r.block),
                      causal=setup.causal, **_shape_params(setup), repeats=int(r.n),
                      torch_threads=torch.get_num_threads())
        records += _ms_records(r, *setup.runtime_device(r.impl), params)
    if load_after is not None:
        records.append(dict(study=STUDY, metric="load_avg_1min", value=load_after, unit="1",
                            device=setup.device, params=dict(section="time", cores=os.cpu_count())))
    return records


def plot_time(times: pd.DataFrame, setup: Setup, block: int) -> Any:
    """Time per call against N, p10-p90 whiskers, one line per implementation."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    for impl, g in times.groupby("impl", sort=False):
        ax.errorbar(g.seq_len, g.ms, yerr=[g.ms - g.p10_ms, g.p90_ms - g.ms], marker="o",
                    capsize=3, label=f"{impl} ({setup.runtime_device(impl)[1]})")
    _against_n(ax, "time per call (ms, median, p10–p90)")
    ax.set_title(f"Attention forward time (H={setup.heads}, d={setup.head_dim}, "
                 f"causal={setup.causal}, block={block})")
    ax.legend(fontsize=8)
    return fig


# --- 4. block-size sweep -----------------------------------------------------------------------


def block_sweep(
    setup: Setup, seq_len: int, blocks: Sequence[int], *, warmup: int, repeats: int,
    sync: Callable[[], None] | None = None, torch_peaks: bool = True,
    progress: Progress = _quiet,
) -> pd.DataFrame:
    """The torch tiled forward at one N for each block size: time, error against SDPA and
    (with ``torch_peaks``) measured peak bytes (None without)."""
    import pandas as pd

    from labkit.core import timing
    from labkit.core.memory import peak_bytes
    from labkit.models.attention import sdpa_attention

    q, k, v = setup.qkv(seq_len)
    causal, rows = setup.causal, []
    reference = sdpa_attention(q, k, v, causal)
    for block in progress(blocks, desc="block sweep"):
        fn = torch_impls(block)["tiled"]
        call = partial(fn, q, k, v, causal)
        stats = timing.measure(call, warmup=warmup, repeats=repeats, sync=sync)
        err = (call() - reference).abs().max().item()
        peak = peak_bytes(call, setup.device)[0] if torch_peaks else None
        rows.append(_time_row(stats, block=block) | dict(peak_bytes=peak, max_abs_err=err))
    return pd.DataFrame(rows)


def block_sweep_records(sweep: pd.DataFrame, setup: Setup, seq_len: int) -> list[dict[str, Any]]:
    """Timing, ``max_abs_err`` and (where measured) ``peak_bytes`` records of :func:`block_sweep`."""
    import pandas as pd
    import torch

    common = dict(impl="tiled", seq_len=seq_len, causal=setup.causal, **_shape_params(setup),
                  sweep="block", torch_threads=torch.get_num_threads())
    records = []
    for r in sweep.itertuples():
        params = dict(common, block=int(r.block))
        records += _ms_records(r, "torch", setup.device, dict(params, repeats=int(r.n)))
        records.append(dict(study=STUDY, metric="max_abs_err", value=r.max_abs_err, unit="1",
                            runtime="torch", device=setup.device,
                            params=dict(params, reference="torch_sdpa")))
        if r.peak_bytes is not None and not pd.isna(r.peak_bytes):
            records.append(dict(study=STUDY, metric="peak_bytes", value=int(r.peak_bytes),
                                unit="bytes", runtime="torch", device=setup.device, params=params))
    return records


def plot_block_sweep(sweep: pd.DataFrame, setup: Setup, seq_len: int) -> Any:
    """Time (left) and peak memory (right) of the tiled forward against its block size."""
    from labkit.core import plotting

    fig, (ax_t, ax_m) = plotting.new_figure(1, 2, figsize=(10, 4))
    ax_t.errorbar(sweep.block, sweep.ms, yerr=[sweep.ms - sweep.p10_ms, sweep.p90_ms - sweep.ms],
                  marker="o", capsize=3)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time per call (ms, median)")
    ax_t.set_title(f"Tiled forward time, N={seq_len}")
    if sweep.peak_bytes.notna().any():
        ax_m.plot(sweep.block, sweep.peak_bytes.astype(float) / MIB, marker="o",
                  color=plotting.COLORS[1])
    ax_m.set_ylabel("peak allocated (MiB)")
    ax_m.set_title(f"Tiled forward peak memory, N={seq_len}")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size B_r = B_c (rows)")
    fig.suptitle(f"Block-size sweep on {setup.device} (H={setup.heads}, d={setup.head_dim}, "
                 f"causal={setup.causal})")
    return fig


# --- 5. this machine beside others -------------------------------------------------------------


def other_machines(df: pd.DataFrame, setup: Setup) -> pd.DataFrame:
    """From every machine's records (``results.load_results(STUDY)``): the newest ``peak_bytes``
    and ``ms`` of each torch configuration of this shape and mask (the N sweeps, not the block
    sweep), with ``where``: the GPU's name for GPU records, else the CPU's, and the device."""
    import pandas as pd

    if df.empty:
        return pd.DataFrame()
    df = pd.concat([df.drop(columns="params"), df.params.apply(pd.Series)], axis=1)
    same_shape = ((df.heads == setup.heads) & (df.head_dim == setup.head_dim)
                  & (df.causal == setup.causal) & df.sweep.isna()
                  if "sweep" in df else (df.heads == setup.heads))
    others = (df[same_shape & df.metric.isin(["peak_bytes", "ms"]) & df.impl.isin(TORCH_IMPLS)]
              .sort_values("created")
              .drop_duplicates(["machine", "device", "runtime", "metric", "impl", "seq_len"],
                               keep="last"))
    gpu = others.get("machine_gpu", pd.Series(index=others.index, dtype=object))
    cpu = others.get("machine_cpu", pd.Series(index=others.index, dtype=object))
    on_gpu = others.device.str.startswith("cuda") | others.device.eq("mps")
    name = gpu.where(on_gpu, cpu).fillna(others.machine)
    return others.assign(where=name.astype(str).str.slice(0, 32) + " (" + others.device + ")")


def machines_table(others: pd.DataFrame) -> pd.DataFrame:
    """Value by (machine, impl) and (metric, N)."""
    import pandas as pd

    if others.empty:
        return pd.DataFrame()
    return others.pivot_table(index=["where", "impl"], columns=["metric", "seq_len"],
                              values="value").round(1)


def peak_agreement(others: pd.DataFrame) -> str | None:
    """Where two machines measured the same configuration with two independent counters (e.g.
    the CPU profiler's log here, the CUDA allocator's there), their largest relative difference
    in peak bytes by implementation, in one sentence; None where no configuration is shared."""
    if others.empty:
        return None
    peaks = others[others.metric == "peak_bytes"].pivot_table(
        index=["impl", "seq_len"], columns="where", values="value")
    shared = peaks.dropna()
    if peaks.shape[1] < 2 or shared.empty:
        return None
    spread = (shared.max(axis=1) / shared.min(axis=1) - 1).groupby("impl").max()
    ns = sorted(int(n) for n in shared.index.get_level_values("seq_len").unique())
    return ("same configuration on different machines, largest difference in peak bytes: "
            + ", ".join(f"{impl} {d:.1%}" for impl, d in spread.items())
            + f" (over N = {ns}; SDPA runs a different kernel on each device, naive and tiled "
            "the same operations)")


def plot_machines(others: pd.DataFrame, setup: Setup) -> Any:
    """Peak memory (left) and time (right) against N: colour = implementation, line style =
    machine."""
    from labkit.core import plotting

    fig, (ax_m, ax_t) = plotting.new_figure(1, 2, figsize=(11, 4.2))
    styles = ["-", "--", ":", "-."]
    wheres = sorted(others["where"].unique()) if not others.empty else []
    for (where, impl), g in (others.groupby(["where", "impl"]) if not others.empty else []):
        color = plotting.COLORS[TORCH_IMPLS.index(impl)]
        style = styles[wheres.index(where) % len(styles)]
        for metric, ax, scale in (("peak_bytes", ax_m, 1 / MIB), ("ms", ax_t, 1.0)):
            m = g[g.metric == metric].sort_values("seq_len")
            ax.plot(m.seq_len, m.value * scale, marker="o", color=color, linestyle=style,
                    label=f"{impl}, {where}")
    _against_n(ax_m, "peak allocated during the call (MiB)")
    _against_n(ax_t, "time per call (ms, median)")
    ax_m.set_title("Peak memory by machine")
    ax_t.set_title("Time by machine")
    if not others.empty:
        ax_t.legend(fontsize=7)
    fig.suptitle(f"Attention on every recorded machine (H={setup.heads}, d={setup.head_dim}, "
                 f"causal={setup.causal})")
    return fig
