"""Build the training data folder: manifest, tokenizer and token ids of both splits.

The folder (``data/corpus/`` by default, ignored by git) is all that training needs, on this
machine or on the GPU machine, where neither the venv nor these sources exist:

- ``manifest.json``: every file with its sha256 and split, package versions, manifest hash
- ``tokenizer.json`` / ``tokenizer_config.json``: the BPE trained on the train split
- ``tokens.npz``: ``train`` and ``heldout`` as uint16 streams of ``<|bos|> doc <|eos|>`` in
  manifest order (np.savez_compressed: small enough to carry to the GPU machine)
- ``corpus_stats.json``: token counts per split, the manifest hash, how it was built
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from labkit.core import files
from labkit.train import corpus, tokenizer


def build(
    out_dir: Path,
    vocab_size: int = tokenizer.DEFAULT_VOCAB_SIZE,
    packages: tuple[str, ...] = corpus.DEFAULT_PACKAGES,
    max_position_embeddings: int = 1024,
) -> dict:
    """Collect, dedupe, split, train the tokenizer, tokenize; return the stats written."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    manifest, texts = corpus.build_manifest(corpus.collect(packages))
    _write_json(out_dir / "manifest.json", manifest)
    train_docs = corpus.documents(manifest, texts, "train")
    heldout_docs = corpus.documents(manifest, texts, "heldout")
    tok = tokenizer.train_tokenizer(train_docs, vocab_size=vocab_size)
    tokenizer.save(tok, out_dir, model_max_length=max_position_embeddings)
    streams = {}
    for name, docs in (("train", train_docs), ("heldout", heldout_docs)):
        ids = tokenizer.encode_documents(tok, docs)
        streams[name] = np.fromiter(
            (i for doc in ids for i in doc), dtype=np.uint16, count=sum(len(d) for d in ids)
        )
    with files.atomic_path(out_dir / "tokens.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **streams)  # a file object: np.savez would append ".npz" to a name
    stats = {
        "manifest_hash": manifest["manifest_hash"],
        "python": manifest["python"],
        "package_versions": manifest["package_versions"],
        "vocab_size": tok.get_vocab_size(),
        "files": {s: manifest["totals"][s]["files"] for s in ("train", "heldout")},
        "bytes": {s: manifest["totals"][s]["bytes"] for s in ("train", "heldout")},
        "tokens": {s: int(streams[s].size) for s in ("train", "heldout")},
        "bytes_per_token": {
            s: manifest["totals"][s]["bytes"] / int(streams[s].size) for s in ("train", "heldout")
        },
        "build_seconds": time.perf_counter() - t0,
    }
    _write_json(out_dir / "corpus_stats.json", stats)
    return stats


def load_tokens(data_dir: Path) -> dict[str, np.ndarray]:
    """The uint16 token streams of a folder written by :func:`build`."""
    path = Path(data_dir) / "tokens.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; build it with `python -m labkit.train prepare --out {data_dir}`"
        )
    with np.load(path) as z:
        return {"train": z["train"], "heldout": z["heldout"]}


def _write_json(path: Path, obj: object) -> None:
    files.atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
