"""Memory bandwidth: the one read-bandwidth number every roofline in the lab divides by.

Why a read probe: a decode step reads every weight once and writes almost nothing, with as many
threads as the benchmark runs. Its ceiling is therefore how fast those threads can *stream reads*
from DRAM, not how fast one thread copies (notebook 00's cache staircase): a copy also pays for
its writes and leaves the other cores idle, so a multi-threaded decoder can beat it, which makes
a "fraction of the roofline" above 1 and the roofline worthless.

The probe follows STREAM (McCalpin, "Memory Bandwidth and Machine Balance in Current High
Performance Computers", IEEE TCCA Newsletter 1995; https://www.cs.virginia.edu/stream/ref.html):
arrays far larger than the last-level cache; every kernel timed ``repeats`` times, the kernels
interleaved round by round so a burst of load elsewhere hits them alike; the best time of each
kept (STREAM reports the best rate: the attainable bandwidth, which is what a ceiling is); and
bytes counted STREAM's way, ``arrays x array bytes`` per pass:

    sum     s = sum(a)           1 array   torch's vectorised, threaded reduction
    gemv    y = A x              1 array   torch.mv over ``a`` viewed as a matrix (BLAS sgemv:
                                           the access pattern of a decode step)
    copy    b = a                2 arrays  Tensor.copy_
    triad   a = b + q * c        3 arrays  torch.add(b, c, alpha=q, out=a)

Write-allocate traffic (a store that first reads its cache line) is not counted, as in STREAM,
so copy and triad read low beside the readers; they are shown for reference. The read bandwidth
is the better of the two readers: on the build box torch's reduction is the faster, but on a
16-core server a BLAS sgemv streamed 1.2x faster than torch.sum, and a decoder made of GEMVs
then beat the "roofline" (numpy's float64 sum is single-threaded and compute-bound at about
half the rate, so it is not a reader here).

Each probe is stored once per machine, device and thread count in
data/results/machines/<machine-id>.bandwidth.json (beside the fingerprint; the machine id is
unchanged), with the load average it ran under: :func:`read_bandwidth_gbs` returns the stored
number, measuring and storing it when missing. torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from labkit.core import checks, env, results

#: Arrays each kernel streams per pass: the bytes STREAM counts are this times the array bytes.
KERNEL_ARRAYS = {"sum": 1, "gemv": 1, "copy": 2, "triad": 3}
#: The kernels that only read: the read bandwidth is the best of them.
READERS = ("sum", "gemv")
#: Columns of the matrix the gemv kernel views its array as (rows: array floats / this).
GEMV_COLUMNS = 1024
#: What each kernel runs, stored beside its numbers.
KERNEL_CODE = {"sum": "torch.sum(a) over float32",
               "gemv": f"torch.mv(a.view(-1, {GEMV_COLUMNS}), x) over float32",
               "copy": "b.copy_(a)", "triad": "torch.add(b, c, alpha=3.0, out=a)"}
#: How far above the roofline (1.0) a measured fraction may sit before the instrument, not the
#: decoder, is to blame: the probe's best-of-N rate and a decode's timing are each one sample of
#: a noisy quantity, taken at different moments. A starting value, not yet measured on a quiet
#: machine (the build box's probe moved by tens of percent with its load); a study that checks
#: its fractions states this margin or its own.
NOISE_MARGIN = 0.10
BANDWIDTH_FILE = "bandwidth"
_MIN_ARRAY_BYTES = 2**30
_PROBE_VERSION = 2  # 2: read = best of sum and gemv (1: sum only)


class InstrumentFailed(ValueError):
    """A measurement beat a physical limit: the limit (the instrument) is wrong, not the code."""


# --------------------------------------------------------------------------- the roofline


def roofline_seconds(bytes_per_token: float, bandwidth_gbs: float) -> float:
    """The fastest a memory-bound step can be: bytes / bandwidth."""
    if not bandwidth_gbs > 0:
        raise ValueError(f"bandwidth_gbs must be > 0, got {bandwidth_gbs!r}")
    if not bytes_per_token >= 0:
        raise ValueError(f"bytes_per_token must be >= 0, got {bytes_per_token!r}")
    return bytes_per_token / (bandwidth_gbs * 1e9)


def roofline_fraction(bytes_per_token: float, seconds_per_token: float, bandwidth_gbs: float,
                      margin: float | None = None) -> float:
    """Achieved bandwidth / available bandwidth = roofline time / measured time (1.0 = at the
    limit).

    With a ``margin`` (e.g. :data:`NOISE_MARGIN`), a fraction above ``1 + margin`` raises
    :class:`InstrumentFailed` instead of being reported: nothing reads memory faster than the
    memory, so such a number means the bandwidth is underestimated (a copy bandwidth, too few
    threads, a probe run under load) or the bytes overestimated. ``margin=None`` keeps the old
    behaviour (no check) for callers that have not adopted it.
    """
    if not seconds_per_token > 0:
        raise ValueError(f"seconds_per_token must be > 0, got {seconds_per_token!r}")
    fraction = roofline_seconds(bytes_per_token, bandwidth_gbs) / seconds_per_token
    if margin is not None:
        margin = checks.finite_float(margin, "margin", "roofline_fraction", minimum=0.0)
        if fraction > 1 + margin:
            raise InstrumentFailed(
                f"instrument failed: {bytes_per_token / 1e6:.1f} MB in {seconds_per_token * 1e3:.3f}"
                f" ms is {fraction:.2f}x the {bandwidth_gbs:.1f} GB/s roofline (more than 1 + "
                f"{margin:g}): the bandwidth is underestimated or the bytes overestimated"
            )
    return fraction


# --------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class KernelTiming:
    """One kernel's timed passes: ``bytes_per_pass`` counted STREAM's way, seconds per pass."""

    kernel: str
    bytes_per_pass: int
    seconds: tuple[float, ...]

    @property
    def best_gbs(self) -> float:
        """The best rate (STREAM's figure): bytes over the fastest pass, in GB/s (1e9 B/s)."""
        return self.bytes_per_pass / min(self.seconds) / 1e9

    @property
    def median_gbs(self) -> float:
        return self.bytes_per_pass / statistics.median(self.seconds) / 1e9


def default_array_bytes(llc_bytes: int | None = None, ram_bytes: int | None = None) -> int:
    """Bytes of each probe array: at least 1 GiB and 8x the last-level cache (STREAM asks for
    4x), a power of two, at most 1/16 of RAM (three arrays are live at once)."""
    if llc_bytes is None:
        llc_bytes = max(env.cpu_cache_sizes().values(), default=0)
    size = _MIN_ARRAY_BYTES
    while size < 8 * llc_bytes:
        size *= 2
    if ram_bytes is None:
        ram_bytes = int((env.fingerprint().get("ram_gb") or 0) * 2**30)
    while ram_bytes and size > ram_bytes // 16 and size > 2**26:
        size //= 2
    return size


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(checks.positive_int(threads, "threads"))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stream_kernels(array_bytes: int, device: str = "cpu") -> dict[str, Callable[[], Any]]:
    """The sum, gemv, copy and triad kernels over three float32 arrays of ``array_bytes`` each
    on ``device`` (allocated and touched here, so no kernel pays for first-touch page faults;
    the gemv's vector is one row, cache-resident, so its bytes are the matrix's)."""
    import torch

    n = checks.positive_int(array_bytes, "array_bytes") // 4
    if n % GEMV_COLUMNS:
        raise ValueError(f"array_bytes must be a multiple of {4 * GEMV_COLUMNS}, got {array_bytes}")
    a, b, c = (torch.full((n,), value, dtype=torch.float32, device=device)
               for value in (1.0, 2.0, 0.5))
    matrix, x = a.view(-1, GEMV_COLUMNS), torch.ones(GEMV_COLUMNS, device=device)
    return {"sum": lambda: torch.sum(a), "gemv": lambda: torch.mv(matrix, x),
            "copy": lambda: b.copy_(a), "triad": lambda: torch.add(b, c, alpha=3.0, out=a)}


def time_kernels(kernels: dict[str, Callable[[], Any]], array_bytes: int, *, repeats: int = 5,
                 warmup: int = 1, sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, KernelTiming]:
    """Time every kernel ``repeats`` times in interleaved rounds after ``warmup`` untimed ones.

    ``kernels`` maps a name of :data:`KERNEL_ARRAYS` to a zero-argument function; ``sync``
    waits for a device's queued work before each clock read. The clock is injectable (the tests
    count bytes with a fake one).
    """
    checks.positive_int(repeats, "repeats", "time_kernels")
    checks.nonnegative_int(warmup, "warmup", "time_kernels")
    wait = sync or (lambda: None)
    samples: dict[str, list[float]] = {name: [] for name in kernels}
    for round_ in range(warmup + repeats):
        for name, kernel in kernels.items():
            wait()
            start = clock()
            kernel()
            wait()
            if round_ >= warmup:
                samples[name].append(clock() - start)
    return {name: KernelTiming(name, KERNEL_ARRAYS[name] * array_bytes, tuple(secs))
            for name, secs in samples.items()}


def measure(threads: int, device: str = "cpu", *, array_bytes: int | None = None,
            repeats: int = 5) -> dict[str, Any]:
    """Run the probe at ``threads`` threads on ``device``; the entry :func:`store` keeps.

    Keys: device, threads, read_gbs (the better reader's best rate; ``reader`` names it),
    sum_gbs, gemv_gbs, copy_gbs, triad_gbs (best rates), *_median_gbs,
    array_bytes, repeats, kernels (the code of each), counting, loadavg_start, loadavg_end,
    measured (UTC), run_id, git_rev, torch (version), probe (format version).
    """
    import torch

    from labkit.core.timing import device_sync

    size = default_array_bytes() if array_bytes is None else array_bytes
    load_start = results.loadavg()
    with torch_threads(threads), torch.inference_mode():
        kernels = stream_kernels(size, device)
        timed = time_kernels(kernels, size, repeats=repeats, sync=device_sync(device))
        del kernels
    entry: dict[str, Any] = {"device": device, "threads": threads}
    for name, timing in timed.items():
        entry[f"{name}_gbs"] = round(timing.best_gbs, 3)
        entry[f"{name}_median_gbs"] = round(timing.median_gbs, 3)
    reader = max(READERS, key=lambda name: timed[name].best_gbs)
    entry.update(read_gbs=entry[f"{reader}_gbs"], read_median_gbs=entry[f"{reader}_median_gbs"],
                 reader=reader)
    entry.update(
        array_bytes=size, repeats=repeats, kernels=KERNEL_CODE,
        counting="STREAM: sum 1, gemv 1, copy 2, triad 3 arrays per pass; write-allocate "
                 "not counted; read = the better reader (sum, gemv)",
        loadavg_start=load_start, loadavg_end=results.loadavg(),
        measured=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        run_id=results.current_run()[0], git_rev=env.git_revision(), torch=torch.__version__,
        probe=_PROBE_VERSION,
    )
    return entry


# --------------------------------------------------------------------------- storage


def _key(device: str, threads: int) -> str:
    return f"{device}/{checks.positive_int(threads, 'threads')}"


def stored(machine: str | None = None) -> dict[str, dict[str, Any]]:
    """Every stored probe of ``machine`` (default: this one), keyed "device/threads"."""
    return dict(results.load_machine_file(machine or env.machine_id(), BANDWIDTH_FILE)
                .get("probes", {}))


def store(entry: dict[str, Any]) -> dict[str, Any]:
    """Keep ``entry`` (from :func:`measure`) as this machine's probe for its device and threads."""
    key = _key(entry["device"], entry["threads"])

    def update(obj: dict[str, Any]) -> None:
        obj["machine_id"] = env.machine_id()
        obj.setdefault("probes", {})[key] = entry

    results.update_machine_file(BANDWIDTH_FILE, update)
    return entry


def probe(threads: int | None = None, device: str = "cpu", *, refresh: bool = False,
          **measure_kw: Any) -> dict[str, Any]:
    """This machine's stored probe at ``threads`` (default: torch's count now) on ``device``;
    measured and stored when missing, or always with ``refresh`` (notebook 00 does)."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    key = _key(device, threads)
    have = stored()
    if not refresh and key in have and have[key].get("probe", _PROBE_VERSION) == _PROBE_VERSION:
        return have[key]
    return store(measure(threads, device, **measure_kw))


def read_bandwidth_gbs(threads: int | None = None, device: str = "cpu") -> float:
    """The read bandwidth (GB/s, 1e9 B/s) of this machine at ``threads`` threads: the roofline's
    denominator. Stored once per machine and thread count; measured (and stored) when missing."""
    return float(probe(threads, device)["read_gbs"])


def lookup(df: Any, kernel: str = "read") -> Any:
    """For each row of a :func:`labkit.core.results.load_results` frame: the stored ``kernel``
    bandwidth of its machine, device and thread count (NaN where none is stored). Lets a figure
    divide another machine's decode speed by that machine's own roofline."""
    import math

    import pandas as pd

    checks.one_of(kernel, "kernel", ("read", *KERNEL_ARRAYS), "lookup")
    if df.empty:
        return pd.Series(index=df.index, dtype=float)
    probes = {m: stored(m) for m in df["machine"].unique()}

    def one(row: Any) -> float:
        if row.threads is None or row.threads != row.threads:  # None or NaN: unknown threads
            return math.nan
        entry = probes[row.machine].get(f"{row.device}/{int(row.threads)}")
        return float(entry[f"{kernel}_gbs"]) if entry else math.nan

    return df.apply(one, axis=1)
