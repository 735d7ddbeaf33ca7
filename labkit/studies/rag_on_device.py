"""Retrieval-augmented generation on one machine: embed, search, then prefill and decode.

The pieces, each small enough to time on its own:

* A document set from the Python standard library's docstrings (``stdlib_docset``), which the
  embedded decoder also saw in training (it was trained on stdlib source). Each function or
  class gives one document and one labelled query: the query is the docstring's first sentence,
  the document is the signature and the *rest* of the docstring. The summary is held out of the
  document, so retrieving it is a real paraphrase-matching task, and the label is free.
* Embeddings: MiniLM (``labkit.models.encoder.embed``): unit vectors, cosine = inner product.
* An index: faiss ``IndexFlatIP`` (exact inner-product search). faiss-cpu installs from PyPI as a
  wheel, takes and returns numpy arrays, and offers approximate indexes (IVF, HNSW) behind the
  same ``search`` call for a corpus too large to scan; sqlite-vec would add persistence in one
  SQLite file, which a notebook that rebuilds its index each run does not need.
  ``exact_search`` (numpy) is the reference the index is checked against.
* Prompting the decoder with retrieved documents, and reusing the KV cache of a shared prefix
  (a system prompt): prefill the prefix once, copy its cache per query (``fork_cache``), and
  prefill only the query's part.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labkit.core.files import atomic_write_text

if TYPE_CHECKING:
    import torch

    from labkit.inference.kv_cache import KVCache

#: Modules the document set is drawn from: widely used, with real docstrings.
STDLIB_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "email.utils", "enum",
    "fnmatch", "fractions", "functools", "getpass", "gettext", "glob", "gzip", "hashlib", "heapq",
    "html", "http.client", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging",
    "math", "mimetypes", "operator", "os", "os.path", "pathlib", "pickle", "platform", "pprint",
    "queue", "random", "re", "sched", "secrets", "shelve", "shlex", "shutil", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "tokenize", "traceback", "types", "typing", "unicodedata",
    "urllib.parse", "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
)

MIN_QUERY_WORDS, MAX_QUERY_WORDS = 4, 30
MIN_BODY_CHARS, MAX_BODY_CHARS = 80, 700
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


@dataclass(frozen=True)
class Document:
    """One retrievable text: ``text`` is what is embedded and what the decoder reads."""

    id: int
    name: str  # qualified, e.g. "os.path.join"
    text: str


@dataclass(frozen=True)
class Query:
    """A question whose answer is in document ``doc_id`` (the label of recall@k)."""

    text: str
    doc_id: int


# --- the document set ----------------------------------------------------------------------------


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _signature(obj: Any) -> str:
    """The signature as text, without what changes from machine to machine or run to run: the
    memory addresses of default objects, and the running interpreter's path (a default of
    ``platform.architecture``), which would make the document set depend on the checkout."""
    try:
        text = _ADDRESS.sub("", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return "(...)"
    return text.replace(repr(sys.executable), "sys.executable")


def split_docstring(doc: str) -> tuple[str, str]:
    """(first sentence of the first paragraph, the rest of the docstring), whitespace collapsed."""
    first, _, rest = doc.strip().partition("\n\n")
    first = " ".join(first.split())
    parts = _SENTENCE_END.split(first, maxsplit=1)
    summary = parts[0]
    remainder = (parts[1] + "\n\n" if len(parts) > 1 else "") + rest
    return summary, remainder.strip()


def _members(module_name: str) -> list[tuple[str, Any]]:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None) or dir(module)
    out = []
    for name in sorted(set(names)):
        obj = getattr(module, name, None)
        if name.startswith("_") or obj is None:
            continue
        if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        home = getattr(obj, "__module__", None) or ""
        # keep what the module defines (or its C accelerator, e.g. _json, posixpath for os.path)
        if home.lstrip("_").split(".")[0] not in (module_name.split(".")[0], "posixpath", "posix"):
            continue
        out.append((name, obj))
    return out


def stdlib_docset(
    modules: Sequence[str] = STDLIB_MODULES,
) -> tuple[list[Document], list[Query]]:
    """Documents and labelled queries from the docstrings of ``modules`` (deterministic for a
    given Python version: sorted names, no randomness).

    Kept: summaries of 4-30 words that no other kept object shares (an ambiguous label would
    punish a correct retrieval) and remaining docstrings of at least 80 characters (cut at 700).
    """
    candidates: list[tuple[str, str, str]] = []
    for module_name in modules:
        for name, obj in _members(module_name):
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            summary, body = split_docstring(doc)
            words = len(summary.split())
            if not MIN_QUERY_WORDS <= words <= MAX_QUERY_WORDS or len(body) < MIN_BODY_CHARS:
                continue
            qualified = f"{module_name}.{name}"
            body = body if len(body) <= MAX_BODY_CHARS else body[:MAX_BODY_CHARS].rsplit(" ", 1)[0]
            candidates.append((qualified, summary, f"{qualified}{_signature(obj)}\n{body}"))
    summary_count: dict[str, int] = {}
    for _, summary, _ in candidates:
        summary_count[summary] = summary_count.get(summary, 0) + 1
    seen_text: set[str] = set()
    docs: list[Document] = []
    queries: list[Query] = []
    for qualified, summary, text in candidates:
        if summary_count[summary] > 1 or text in seen_text:
            continue
        seen_text.add(text)
        docs.append(Document(id=len(docs), name=qualified, text=text))
        queries.append(Query(text=summary, doc_id=docs[-1].id))
    return docs, queries


def save_docset(docs: Sequence[Document], queries: Sequence[Query], folder: Path) -> None:
    """Write docs.jsonl, queries.jsonl and manifest.json (how and from what they were made)."""
    folder = Path(folder)
    atomic_write_text(folder / "docs.jsonl", "".join(json.dumps(asdict(d)) + "\n" for d in docs))
    atomic_write_text(folder / "queries.jsonl", "".join(json.dumps(asdict(q)) + "\n" for q in queries))
    manifest = {
        "built_by": "labkit.studies.rag_on_device.stdlib_docset",
        "python": sys.version.split()[0],
        "modules": list(STDLIB_MODULES),
        "documents": len(docs),
        "queries": len(queries),
        "rule": (
            "one document per public function/class with a docstring: text = qualified name + "
            "signature + docstring minus its first sentence; query = that first sentence "
            f"({MIN_QUERY_WORDS}-{MAX_QUERY_WORDS} words, unique); body >= {MIN_BODY_CHARS} "
            f"chars, cut at {MAX_BODY_CHARS}"
        ),
    }
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def docset_dir() -> Path:
    """data/rag/ in the checkout: the shipped document and query set."""
    from labkit.core import paths

    return paths.data_dir() / "rag"


def load_docset(folder: Path | None = None) -> tuple[list[Document], list[Query]]:
    """The shipped (or given) document and query set; errors name the missing file."""
    folder = Path(folder) if folder is not None else docset_dir()
    out: list[list[Any]] = []
    for fname, cls in (("docs.jsonl", Document), ("queries.jsonl", Query)):
        path = folder / fname
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; rebuild with `python -m labkit.studies.rag_on_device {folder}`"
            )
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        out.append([cls(**row) for row in rows])
    docs, queries = out
    if any(d.id != i for i, d in enumerate(docs)):
        raise ValueError(f"{folder / 'docs.jsonl'}: document ids must be 0, 1, 2, ... in order")
    if any(not 0 <= q.doc_id < len(docs) for q in queries):
        raise ValueError(f"{folder / 'queries.jsonl'}: a doc_id points past the documents")
    return docs, queries


# --- search --------------------------------------------------------------------------------------


class FaissIndex:
    """Exact inner-product search over unit vectors (cosine similarity) with faiss."""

    def __init__(self, embeddings: np.ndarray) -> None:
        import faiss

        vectors = _as_matrix(embeddings, "embeddings")
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], ids [Q, k]) of the k most similar documents, best first."""
        return self.index.search(_as_matrix(queries, "queries"), _check_k(k, len(self)))


def _as_matrix(x: Any, what: str) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"{what} must be a [N, dim] array with N >= 1, got shape {arr.shape}")
    return arr


def _check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] (the index size), got {k!r}")
    return k


def exact_search(
    doc_embeddings: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference: all inner products, then the top k (ties broken by the lower id)."""
    docs, q = _as_matrix(doc_embeddings, "doc_embeddings"), _as_matrix(queries, "queries")
    scores = q @ docs.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, : _check_k(k, len(docs))]
    return np.take_along_axis(scores, ids, axis=1), ids


def recall_at_k(retrieved: np.ndarray, relevant: Sequence[int], k: int) -> float:
    """Share of queries whose relevant document is among the first ``k`` retrieved."""
    retrieved = np.asarray(retrieved)
    if retrieved.ndim != 2 or len(retrieved) != len(relevant):
        raise ValueError(
            f"retrieved must be [Q, K] with Q = len(relevant) = {len(relevant)}, "
            f"got {retrieved.shape}"
        )
    if not 1 <= k <= retrieved.shape[1]:
        raise ValueError(f"k must be in [1, {retrieved.shape[1]}], got {k!r}")
    hits = (retrieved[:, :k] == np.asarray(relevant)[:, None]).any(axis=1)
    return float(hits.mean())


# --- prompting the decoder -----------------------------------------------------------------------

#: The shared prefix of every prompt. The decoder was trained on Python source, so the prompt is
#: laid out as a Python file: the retrieved documentation as comments, then the question.
SYSTEM_PROMPT = (
    "# You answer questions about the Python standard library.\n"
    "# Below are excerpts of its documentation, retrieved for the question at the end.\n"
    "# Read them, then write a short Python example that answers the question.\n"
)


def context_block(docs: Sequence[Document]) -> str:
    """The retrieved documents as Python comments, one block each."""
    lines = []
    for doc in docs:
        lines.append(f"# --- {doc.name}")
        lines.extend(f"# {line}".rstrip() for line in doc.text.splitlines())
    return "\n".join(lines) + "\n"


def question_block(query: str) -> str:
    return f"# Question: {query}\n# Answer:\n"


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the caller decides where BOS goes)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(
    tokenizer: Any,
    query: str,
    docs: Sequence[Document],
    max_tokens: int,
    *,
    bos_id: int | None = None,
    system: str = SYSTEM_PROMPT,
) -> tuple[list[int], int]:
    """(token ids of system prompt + as many retrieved documents as fit + the question, how many
    documents went in). Documents are kept whole, in rank order; one that would overflow
    ``max_tokens`` is left out, so the prompt never exceeds the budget."""
    head = ([bos_id] if bos_id is not None else []) + encode(tokenizer, system)
    tail = encode(tokenizer, question_block(query))
    if len(head) + len(tail) > max_tokens:
        raise ValueError(
            f"max_tokens={max_tokens} cannot hold the system prompt and question "
            f"({len(head) + len(tail)} tokens)"
        )
    body: list[int] = []
    used = 0
    for doc in docs:
        ids = encode(tokenizer, context_block([doc]))
        if len(head) + len(body) + len(ids) + len(tail) <= max_tokens:
            body += ids
            used += 1
    return head + body + tail, used


# --- generation, timed, and prefix KV-cache reuse ------------------------------------------------


def prefill(model: Any, ids: Sequence[int] | torch.Tensor, cache: Any) -> torch.Tensor:
    """Run ``ids`` through ``model`` writing into ``cache``; the logits of the last position."""
    import torch

    tokens = ids if isinstance(ids, torch.Tensor) else torch.tensor([list(ids)])
    with torch.inference_mode():
        return model(tokens.to(next(model.parameters()).device), cache=cache)[:, -1]


def fork_cache(prefix: KVCache, max_len: int) -> KVCache:
    """A new cache of ``max_len`` positions holding a copy of ``prefix``'s filled positions.

    Copying (instead of sharing) keeps the prefix intact for the next query; the copy is
    ``prefix.length`` positions per layer, far cheaper than recomputing them.
    """
    from labkit.inference.kv_cache import KVCache

    n = prefix.length
    b, h, _, d = prefix.k[0].shape
    if max_len < n:
        raise ValueError(f"max_len={max_len} is shorter than the prefix ({n} positions)")
    fork = KVCache(
        num_layers=prefix.num_layers, num_kv_heads=h, head_dim=d, max_len=max_len, batch=b,
        dtype=prefix.k[0].dtype, device=prefix.k[0].device,
    )
    for layer in range(prefix.num_layers):
        fork.update(layer, prefix.k[layer][:, :, :n], prefix.v[layer][:, :, :n])
    fork.advance(n)
    return fork


def timed_greedy(
    model: Any,
    ids: Sequence[int],
    new_tokens: int,
    *,
    cache: Any = None,
    sync: Any = None,
) -> tuple[Any, list[int]]:
    """Greedy generation of ``new_tokens`` tokens after ``ids``, timed by
    ``labkit.core.timing.time_generation``: (GenerationTiming with TTFT and per-token times, tokens).

    ``cache=None`` allocates a KVCache for prompt + new tokens. A cache that already holds a prefix
    (``fork_cache``) continues from it: ``ids`` is then only the part after the prefix. The count
    is fixed (no stop at an end-of-text token) so every timed run does the same work.
    """
    import torch

    from labkit.core.timing import time_generation
    from labkit.inference.kv_cache import KVCache

    if cache is None:
        cache = KVCache.for_model(model, max_len=len(ids) + new_tokens)
    device = next(model.parameters()).device

    def first() -> torch.Tensor:
        return prefill(model, ids, cache).argmax(-1)

    def step(token: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(token.view(1, 1).to(device), cache=cache)[:, -1].argmax(-1)

    result, tokens = time_generation(first, step, new_tokens, sync=sync)
    return result, [int(t) for t in tokens]


def bench_retrieval(quick: bool = False) -> list[dict]:
    """`labkit bench rag`: recall@k and per-query embed/search time of MiniLM + faiss over the
    shipped document set (study "10_rag_on_device"); quick: a seeded subset of 64 documents."""
    from labkit.core import results
    from labkit.core.timing import measure
    from labkit.models.encoder import embed
    from labkit.models.loader import load

    docs, queries = load_docset()
    if quick:
        keep = sorted(np.random.default_rng(0).choice(len(docs), 64, replace=False).tolist())
        position = {doc_id: i for i, doc_id in enumerate(keep)}
        docs = [docs[i] for i in keep]
        queries = [Query(q.text, position[q.doc_id]) for q in queries if q.doc_id in position]
    minilm = load("minilm", device="cpu")
    index = FaissIndex(embed([d.text for d in docs], minilm).numpy())
    query_emb = embed([q.text for q in queries], minilm).numpy()
    _, ids = index.search(query_emb, 10)
    common = {"n_docs": len(docs), "n_queries": len(queries), "index": "faiss.IndexFlatIP",
              "embedder": "all-MiniLM-L6-v2", "source": "labkit bench rag"}
    out = [
        results.record("10_rag_on_device", "recall_at_k", recall_at_k(ids, [q.doc_id for q in queries], k),
                       "1", runtime="faiss", device="cpu", model="minilm", params={**common, "k": k})
        for k in (1, 5, 10)
    ]
    text = queries[0].text
    for stage, fn in (("embed", lambda: embed(text, minilm)),
                      ("search", lambda: index.search(query_emb[:1], 10))):
        stats = measure(fn, warmup=1, repeats=5 if quick else 20)
        out.append(results.record(
            "10_rag_on_device", "stage_ms", stats.median_ms, "ms",
            runtime="faiss" if stage == "search" else "torch", device="cpu",
            model="minilm" if stage == "embed" else "none",
            params={**common, "stage": stage, "stat": "median", "repeats": stats.n},
        ))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m labkit.studies.rag_on_device [FOLDER]``: rebuild the document set (default data/rag/)."""
    args = list(sys.argv[1:] if argv is None else argv)
    folder = Path(args[0]) if args else docset_dir()
    docs, queries = stdlib_docset()
    save_docset(docs, queries, folder)
    print(f"wrote {len(docs)} documents and {len(queries)} queries to {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
