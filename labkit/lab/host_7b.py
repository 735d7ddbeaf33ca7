"""Llama-2-7B's shapes through every CPU runtime on a big host: study 08's runtime matrix on the
fp16 folder of seeded random weights that study 12's :func:`~labkit.studies.decode_speed.write_random_folder`
writes, recorded as 08's rows for that machine (study 12 shows them). A lab-layer runner because it
joins two studies.

Run from the repository root on the host (what travels there: :mod:`labkit.studies.decode_speed`;
``labkit/lab/host_7b.sh`` unpacks it and runs both steps)::

    python -m labkit.lab.host_7b --write /dev/shm/l7b
    python -m labkit.lab.host_7b --matrix /dev/shm/l7b --threads 16 --out $OUT
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from labkit.studies import decode_speed as ds
from labkit.studies import runtime_benchmark as rb

#: the runtimes of the host-7B matrix: labkit's two torch loops, the Swift port, llama.cpp
HOST_7B_RUNTIMES = ("torch-eager", "torch-fast", "swift", "llama.cpp-f16", "llama.cpp-f32")


def host_7b_matrix(folder: str | os.PathLike[str], threads: int,
                   runtimes: tuple[str, ...] = HOST_7B_RUNTIMES) -> list[dict]:
    """Study 08's runtime matrix, one round at small sizes (tg16, pp32, TTFT at 16), on a
    :func:`write_random_folder` of Llama-2-7B's shapes at ``threads``: torch float32 first (the
    parity reference), then each runtime in its own process, greedy parity against it, each
    decode rate as a fraction of this host's read bandwidth. Each row is recorded as soon as its
    runtime finishes: a host lent for minutes keeps what it measured."""
    import tempfile

    from labkit.core.bandwidth import read_bandwidth_gbs
    from labkit.models.config import load_config
    from labkit.models.sizes import decode_bytes_per_token

    spec = rb.Spec.quick(model=str(folder), threads=threads, rounds=1, prompt_len=32, ttft_lens=[16])
    cfg = load_config(Path(folder))
    gbs = read_bandwidth_gbs(threads)
    order = [rb.REFERENCE] + [n for n in runtimes if n != rb.REFERENCE]
    recs = []
    with tempfile.TemporaryDirectory(prefix="labkit-7b-") as tmp:
        for name in order:
            r = rb.one_round(spec, [name], Path(tmp), Path(tmp) / "ref.npz")[name]
            print(f"[7b] {name}: {rb.status_line(r)} ({r['wall_s']:.0f} s)", flush=True)
            if "tg" not in r:
                print(f"[7b] {name}: {r.get('skipped') or str(r.get('failed'))[-800:]}", flush=True)
                continue
            element = 2 if r["dtype"] in ("float16", "bfloat16") else 4
            nbytes = decode_bytes_per_token(cfg, 1 + spec.gen_len // 2, element)["total"]
            parity = rb.round_parity(r, name, spec, Path(tmp), Path(tmp) / "ref.npz") or {}
            recs.append(ds.host_7b_record(
                name, r["dtype"], r["tg"]["mean"], [r["tg"]["mean"]], threads, nbytes, gbs,
                prompt_len=1, gen_len=spec.gen_len, pp_tok_s=round(r["pp"]["mean"], 2),
                pp_prompt_len=spec.prompt_len, note=r.get("note", ""),
                greedy_agreement_pct=parity.get("greedy_agreement_pct"),
                max_abs_logit_err=parity.get("max_abs_logit_err")))
    return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.lab.host_7b", description=__doc__.split("\n")[0])
    ap.add_argument("--write", default=None, metavar="DIR",
                    help="write Llama-2-7B's shapes with seeded random fp16 weights as an HF folder")
    ap.add_argument("--matrix", default=None, metavar="DIR", help="the runtime matrix on DIR")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runtimes", default=",".join(HOST_7B_RUNTIMES))
    ap.add_argument("--out", default=None, help="write records under OUT/data/results/")
    args = ap.parse_args(argv)
    if args.out:
        os.environ["LABKIT_OUTPUT_ROOT"] = str(Path(args.out).resolve())
    if args.write:
        import torch

        ds.write_random_folder(ds.llama2_7b_shape(), args.write, label="Llama-2-7B",
                               device="cuda" if torch.cuda.is_available() else "cpu")
    if args.matrix:
        host_7b_matrix(args.matrix, args.threads, tuple(args.runtimes.split(",")))
    if not (args.write or args.matrix):
        ap.print_help()
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
