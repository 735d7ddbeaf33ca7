"""``python -m labkit.train`` (and ``labkit train``): build the corpus, train, ship a folder.

Subcommands:

- ``prepare --data DIR``: manifest, tokenizer and token ids (``data/corpus`` by default)
- ``fit --config NAME --data DIR --out DIR``: train and write the HF folder; ``--parts-to DIR``
  also splits it into pieces small enough to come back from the GPU machine
- ``assemble --parts DIR --data DIR --out DIR``: join those pieces into the HF folder here
- ``breakdown --model DIR --data DIR``: eval_breakdown.json (held-out overlap, stdlib-only loss)
- ``card --model DIR``: write MODEL_CARD.md from the folder's logs plus greedy samples

Without a subcommand (``labkit train --config quick --out DIR``, what ``make model-quick``
runs): prepare the corpus if it is missing, fit, then write the card.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from labkit.core import files, paths

DEFAULT_DATA = paths.data_dir() / "corpus"
PART_BYTES = 15 * 1024 * 1024  # the device tool brings back files of at most 16 MiB
SLICE_WINDOWS = 8


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labkit train", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")

    def common_fit(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", default="quick", help="quick | shipped | tiny")
        q.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus folder")
        q.add_argument("--out", type=Path, required=True, help="model folder to write")
        q.add_argument("--device", default="auto", help="auto | cpu | cuda")
        q.add_argument("--max-steps", type=int, default=None)
        q.add_argument("--time-budget", type=float, default=None, help="seconds of training")
        q.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
        q.add_argument("--no-progress", action="store_true")
        q.add_argument("--batch-size", type=int, default=None, help="override (smoke runs)")
        q.add_argument("--eval-max-windows", type=int, default=None, help="override")

    q = sub.add_parser("prepare", help="build the corpus folder")
    q.add_argument("--data", type=Path, default=DEFAULT_DATA)
    q = sub.add_parser("fit", help="train and write the HF folder")
    common_fit(q)
    q.add_argument("--parts-to", type=Path, default=None, help="also split into this folder")
    q = sub.add_parser("assemble", help="join GPU pieces into the HF folder")
    q.add_argument("--parts", type=Path, required=True)
    q.add_argument("--data", type=Path, default=DEFAULT_DATA)
    q.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("breakdown", help="held-out line overlap and stdlib-only loss (CPU)")
    q.add_argument("--model", type=Path, required=True)
    q.add_argument("--data", type=Path, default=DEFAULT_DATA)
    q = sub.add_parser("card", help="write MODEL_CARD.md")
    q.add_argument("--model", type=Path, required=True)
    # the default command's options live on the top-level parser
    p.add_argument("--config", default="quick")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-max-windows", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``labkit train`` / ``python -m labkit.train``; returns the exit code."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "prepare":
        return _prepare(args.data)
    if args.command == "fit":
        fit(args)
        return 0
    if args.command == "assemble":
        assemble(args.parts, args.data, args.out)
        return 0
    if args.command == "breakdown":
        from labkit.train.card import heldout_breakdown

        print(json.dumps(heldout_breakdown(args.model, args.data), indent=1))
        return 0
    if args.command == "card":
        from labkit.train.card import write_card

        print(write_card(args.model))
        return 0
    if args.out is None:
        print("labkit train: --out DIR is required (the model folder to write)", file=sys.stderr)
        return 2
    if not (args.data / "tokens.npz").is_file():
        _prepare(args.data)
    fit(args)
    from labkit.train.card import write_card

    print(write_card(args.out))
    return 0


def _prepare(data: Path) -> int:
    from labkit.train import prepare

    print(f"building the corpus into {data} (a few minutes on 2 cores) ...", flush=True)
    stats = prepare.build(data)
    print(json.dumps({k: stats[k] for k in ("manifest_hash", "tokens", "files")}, indent=1))
    return 0


def fit(args: argparse.Namespace) -> Path:
    """Train the named config on the corpus folder and write the model folder."""
    import torch

    from labkit.train import configs, loop, prepare

    t0 = time.perf_counter()
    cfg = configs.get(
        args.config,
        max_steps=args.max_steps,
        time_budget_s=args.time_budget,
        compile=False if args.no_compile else None,
        batch_size=args.batch_size,
        eval_max_windows=args.eval_max_windows,
    )
    stats_path = Path(args.data) / "corpus_stats.json"
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path}: missing; run `python -m labkit.train prepare`")
    stats = json.loads(stats_path.read_text())
    tokens = prepare.load_tokens(args.data)
    vocab = int(stats["vocab_size"])
    print(
        f"config {cfg.name}: corpus {stats['manifest_hash'][:12]} train {tokens['train'].size:,} "
        f"held-out {tokens['heldout'].size:,} tokens; torch {torch.__version__}",
        flush=True,
    )
    result = loop.train(
        cfg, tokens["train"], tokens["heldout"], vocab, args.device, not args.no_progress
    )
    stored = loop.storage_roundtrip(result.model)
    metrics, slice_tokens = loop.final_metrics(
        result.model, cfg, tokens["train"], tokens["heldout"], vocab, SLICE_WINDOWS, args.device
    )
    log = dict(
        result.log,
        corpus=stats,
        final=metrics,
        command_seconds=time.perf_counter() - t0,
        llama_config=loop.llama_config(cfg, vocab).to_hf_dict(),
    )
    out = loop.write_model_folder(
        args.out, loop.llama_config(cfg, vocab), stored, args.data, log, slice_tokens
    )
    h = metrics["heldout"]
    print(
        f"wrote {out}: held-out loss {h['loss']:.4f} ppl {h['ppl']:.2f}; unigram ppl "
        f"{metrics['unigram']['ppl']:.1f} (ratio {metrics['ppl_ratio_unigram_over_model']:.1f})",
        flush=True,
    )
    if getattr(args, "parts_to", None) is not None:
        split_parts(out, args.parts_to)
    return out


def split_parts(folder: Path, dest: Path) -> None:
    """Copy a model folder into ``dest`` with model.safetensors cut into PART_BYTES pieces."""
    for p in sorted(folder.iterdir()):
        if p.name == "model.safetensors":
            data = p.read_bytes()
            for i in range(0, len(data), PART_BYTES):
                files.atomic_write_bytes(
                    dest / f"model.safetensors.part{i // PART_BYTES}", data[i : i + PART_BYTES]
                )
        elif p.name not in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            files.atomic_write_bytes(dest / p.name, p.read_bytes())


def assemble(parts: Path, data: Path, out: Path) -> Path:
    """Rebuild the HF folder from split pieces, checking the sha256 the trainer recorded; the
    folder is written as one atomic swap (labkit.core.files.atomic_dir)."""
    import hashlib
    import shutil

    from labkit.train.loop import generation_config

    pieces = sorted(parts.glob("model.safetensors.part*"), key=lambda p: int(p.suffix[5:]))
    if not pieces:
        raise FileNotFoundError(f"{parts}: no model.safetensors.part* pieces")
    log = json.loads((parts / "training_log.json").read_text())
    blob = b"".join(p.read_bytes() for p in pieces)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != log["model_safetensors_sha256"]:
        raise ValueError(
            f"{parts}: joined model.safetensors has sha256 {digest}, the training log says "
            f"{log['model_safetensors_sha256']}"
        )
    with files.atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(blob)
        for p in parts.iterdir():
            if not p.name.startswith("model.safetensors.part") and p.is_file():
                shutil.copyfile(p, tmp / p.name)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(data / name, tmp / name)
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
        for p in tmp.iterdir():
            p.chmod(files.FILE_MODE)
    return out
