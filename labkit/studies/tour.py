"""Study 00, the tour: this machine's fingerprint, its runtimes, how fast it moves memory.

Two measurements of memory: the single-thread copy bandwidth over buffer sizes (the cache
staircase, ``labkit.core.env.copy_bandwidth``), and the read bandwidth at each thread count
(``labkit.core.bandwidth``), the ceiling later studies compare decode speed against (every decoded
token reads every weight once). The read probe is measured afresh here and stored beside the
machine's fingerprint, so every roofline in the lab reads the number this notebook shows.
``labkit bench bandwidth`` records the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

STUDY = "00_tour"


def machine_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the fingerprint's fields, the versions of the libraries that change performance)."""
    import pandas as pd

    from labkit.core import env

    fp = env.fingerprint()
    fields = pd.Series({k: v for k, v in fp.items() if not isinstance(v, dict)}, name="value")
    return fields.to_frame(), pd.Series(fp.get("versions", {}), name="version").to_frame()


def runtimes_table() -> pd.DataFrame:
    """Each optional runtime: available here, or why not (what ``labkit info`` prints)."""
    import pandas as pd

    from labkit.core import env

    return pd.DataFrame([{"runtime": name, "available here": reason is None, "why not": reason or ""}
                         for name, reason in env.optional_runtimes().items()])


def sweep_sizes(max_buffer_mb: int, quick: bool) -> list[int]:
    """Buffer sizes 16 KiB .. ``max_buffer_mb`` in powers of two (every other one when quick)."""
    sizes = [2**k for k in range(14, 30) if 2**k <= max_buffer_mb * 2**20]
    return sizes[::2] if quick else sizes


def bandwidth_sweep(sizes: list[int], repeats: int,
                    max_buffer_mb: int) -> tuple[pd.DataFrame, float, list[dict]]:
    """Copy bandwidth at each size and its DRAM plateau, recorded: (table, plateau GB/s, records).

    The plateau is the median, over the sizes beyond the caches (``env.dram_rows``), of each
    size's fastest round: the interleaved rounds share the machine's load alike, and the fastest
    is what the memory can do (STREAM's convention)."""
    from labkit.core import env, results

    bw = env.copy_bandwidth(sizes, repeats=repeats)
    recs = []
    for row in bw.itertuples():
        size = {"size_bytes": int(row.size_bytes)}
        recs.append(results.record(STUDY, "copy_bandwidth", float(row.gb_per_s), "GB/s",
                                   runtime="numpy", device="cpu", params=size, threads=1))
        recs.append(results.record(STUDY, "copy_bandwidth_best", float(row.gb_per_s_best), "GB/s",
                                   runtime="numpy", device="cpu",
                                   params={**size, "rounds": repeats}, threads=1))
    dram = env.peak_copy_bandwidth_gbs(bw, column="gb_per_s_best")
    recs.append(results.record(STUDY, "dram_copy_bandwidth", dram, "GB/s", runtime="numpy",
                               device="cpu", threads=1,
                               params={"max_buffer_mb": max_buffer_mb, "statistic": "best"}))
    return bw, dram, recs


def probe_threads(cores: int | None) -> list[int]:
    """The thread counts the read probe runs at: 1, 2, 4, ... and every core."""
    cores = max(1, int(cores or 1))
    counts = [1 << k for k in range(cores.bit_length()) if 1 << k < cores]
    return [*counts, cores]


def read_probes(threads: list[int], array_mb: int | None,
                repeats: int) -> tuple[pd.DataFrame, list[dict]]:
    """The read, copy and triad probe at each thread count, measured afresh, stored beside the
    fingerprint (``bandwidth.probe(refresh=True)``) and recorded: (table, records)."""
    import pandas as pd

    from labkit.core import bandwidth, results

    size = None if array_mb is None else int(array_mb) * 2**20
    rows, recs = [], []
    for t in threads:
        entry = bandwidth.probe(t, refresh=True, array_bytes=size, repeats=repeats)
        rows.append(entry)
        params = {"array_bytes": entry["array_bytes"], "rounds": repeats, "statistic": "best"}
        for kernel, metric in (("read", "read_bandwidth"), ("copy", "stream_copy_bandwidth"),
                               ("triad", "stream_triad_bandwidth")):
            recs.append(results.record(STUDY, metric, entry[f"{kernel}_gbs"], "GB/s",
                                       runtime="torch", device="cpu", params=params, threads=t))
    cols = ["threads", "read_gbs", "copy_gbs", "triad_gbs", "read_median_gbs", "array_bytes",
            "loadavg_start", "loadavg_end"]
    return pd.DataFrame(rows)[cols], recs


def plot_bandwidth(bw: pd.DataFrame, dram_gbs: float, caches: dict[str, int], cpu: str | None,
                   probes: pd.DataFrame, rounds: int):
    """The copy staircase against bytes touched (source + destination), the cache sizes, the
    DRAM plateau, and the read bandwidth at each thread count (the roofline) for comparison."""
    from labkit.core import env, plotting

    fig, ax = plotting.new_figure()
    touched = 2 * bw.size_bytes  # a copy touches source + destination: compare with cache sizes
    ax.plot(touched, bw.gb_per_s_best, marker="o", label=f"copy (read + write), 1 thread: fastest of {rounds}")
    ax.fill_between(touched, bw.gb_per_s_p10, bw.gb_per_s_p90, alpha=0.25,
                    label="copy: p10–p90 of the rounds")
    plateau = env.dram_rows(bw).gb_per_s_best
    ax.axhspan(plateau.min(), plateau.max(), color="grey", alpha=0.25,
               label=f"DRAM plateau of the copy ≈ {dram_gbs:.1f} GB/s")
    for i, row in enumerate(probes.itertuples()):
        ax.axhline(row.read_gbs, color=plotting.COLORS[(2 + i) % len(plotting.COLORS)], ls="--",
                   label=f"read, {row.threads} thread{'s' * (row.threads > 1)}: {row.read_gbs:.1f} GB/s")
    top = ax.get_ylim()[1]
    for level, size in caches.items():
        ax.axvline(size, color="grey", linestyle="--", linewidth=1)
        ax.text(size, top * 0.97, f" {level}", color="grey", va="top")
    ax.set_xscale("log", base=2)
    plotting.set_bytes_axis(ax.xaxis)
    ax.set_xlabel("bytes touched per copy (source + destination)")
    ax.set_ylabel("bandwidth (GB/s)")
    ax.set_title(f"Memory bandwidth on {cpu or 'this CPU'}\n{load_note()}", fontsize=11)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    return fig


def load_note() -> str:
    """How busy the machine was when this run started, in words, for a figure's title."""
    from labkit.core import env, results

    start = results.current_run()[1]
    cores = env.fingerprint().get("cores_logical")
    if start is None or not cores:
        return "load average unknown"
    busy = results.is_noisy(start, None, None, cores)
    return f"load average {start:.1f} on {cores} cores at the start{': noisy' if busy else ''}"


def studies_table() -> pd.DataFrame:
    """Every notebook in notebooks/ and its title (read from the notebooks themselves)."""
    import nbformat
    import pandas as pd

    from labkit.core import paths

    rows = []
    for path in sorted(paths.notebooks_dir().glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        title = nb.cells[0].source.splitlines()[0].lstrip("# ").strip() if nb.cells else ""
        rows.append({"notebook": path.name, "title": title})
    return pd.DataFrame(rows)


def machines_figure() -> tuple[pd.DataFrame, Any]:
    """The read bandwidth of every machine with records at each thread count, one run per
    machine (``results.load_run``: the latest complete clean run; this one): (table, figure)."""
    from labkit.core import plotting, results

    read = results.across_machines(results.load_run(STUDY), ["read_bandwidth"], by=("threads",))
    read = read.sort_values(["where", "threads"]).reset_index(drop=True)
    labels = [f"{r.where}, {int(r.threads)} thr." for r in read.itertuples()]
    fig, ax = plotting.new_figure()
    ax.barh(labels, read["value"])
    ax.set_xlabel("read bandwidth (GB/s)")
    ax.set_ylabel("machine, threads")
    ax.set_title("Read bandwidth by machine (the roofline's denominator)")
    cols = ["machine", "where", "threads", "value", "run_id", "git_rev"]
    return read[cols].rename(columns={"value": "read GB/s"}), fig


def bench(quick: bool = False) -> list[dict]:
    """`labkit bench bandwidth`: the sweep and the read probes of the notebook, recorded under
    study 00_tour (the probes also stored beside the fingerprint)."""
    from labkit.core import env

    max_mb, repeats = (64, 3) if quick else (256, 7)
    recs = bandwidth_sweep(sweep_sizes(max_mb, quick), repeats, max_mb)[2]
    threads = probe_threads(env.fingerprint().get("cores_logical"))
    return recs + read_probes(threads, 256 if quick else None, repeats)[1]
