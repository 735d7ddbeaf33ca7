"""Study 00, the tour: this machine's fingerprint, its runtimes, how fast it moves memory.

The copy bandwidth measured here is the ceiling later studies compare decode speed against
(every decoded token reads every weight once). ``labkit bench bandwidth`` records the same sweep.
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
    """Copy bandwidth at each size and the DRAM floor, recorded: (table, floor GB/s, records)."""
    from labkit.core import env, results

    bw = env.copy_bandwidth(sizes, repeats=repeats)
    recs = [results.record(STUDY, "copy_bandwidth", float(row.gb_per_s), "GB/s", runtime="numpy",
                           device="cpu", params={"size_bytes": int(row.size_bytes)})
            for row in bw.itertuples()]
    dram = env.peak_copy_bandwidth_gbs(bw)
    recs.append(results.record(STUDY, "dram_copy_bandwidth", dram, "GB/s", runtime="numpy",
                               device="cpu", params={"max_buffer_mb": max_buffer_mb}))
    return bw, dram, recs


def plot_bandwidth(bw: pd.DataFrame, dram_gbs: float, caches: dict[str, int], cpu: str | None):
    """Bandwidth against bytes touched (source + destination), cache sizes and the DRAM floor."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    touched = 2 * bw.size_bytes  # a copy touches source + destination: compare with cache sizes
    ax.plot(touched, bw.gb_per_s, marker="o", label="median")
    ax.fill_between(touched, bw.gb_per_s_p10, bw.gb_per_s_p90, alpha=0.25, label="p10–p90")
    for level, size in caches.items():
        ax.axvline(size, color="grey", linestyle="--", linewidth=1)
        ax.text(size, ax.get_ylim()[1] * 0.95, f" {level}", color="grey", va="top")
    ax.axhline(dram_gbs, color="black", linewidth=1, linestyle=":",
               label=f"DRAM floor ≈ {dram_gbs:.1f} GB/s")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plotting.bytes_formatter())
    ax.set_xlabel("bytes touched per copy (source + destination)")
    ax.set_ylabel("copy bandwidth (GB/s, read + write)")
    ax.set_title(f"Memory copy bandwidth on {cpu or 'this CPU'}")
    ax.legend(loc="lower left")
    return fig


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
    """The DRAM copy bandwidth of every machine with records, newest each: (table, figure)."""
    from labkit.core import plotting, results

    dram = results.across_machines(results.load_results(STUDY), ["dram_copy_bandwidth"])
    cols = [c for c in ("machine", "where", "machine_os", "value", "created") if c in dram.columns]
    fig, ax = plotting.new_figure()
    ax.barh(dram["where"], dram["value"])
    ax.set_xlabel("DRAM copy bandwidth (GB/s, read + write)")
    ax.set_ylabel("machine")
    ax.set_title("Copy bandwidth by machine (all recorded results)")
    return dram[cols].rename(columns={"value": "DRAM copy GB/s"}), fig


def bench(quick: bool = False) -> list[dict]:
    """`labkit bench bandwidth`: the sweep of the notebook, recorded under study 00_tour."""
    max_mb = 64 if quick else 256
    return bandwidth_sweep(sweep_sizes(max_mb, quick), 3 if quick else 7, max_mb)[2]
