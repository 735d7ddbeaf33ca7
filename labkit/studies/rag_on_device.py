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
* Prompting the decoder with retrieved documents (a :class:`Layout`: a Python file of comments
  for tiny-llama, the model's own chat template for an instruction-tuned one), and reusing the KV
  cache of a shared prefix (a system prompt): prefill the prefix once, copy its cache per query
  (``fork_cache``), and prefill only the query's part.
* Answer correctness (chat models): each query's gold answer is its document's qualified name;
  ``answer_queries`` asks with and without the retrieved documents, ``answer_checks`` scores.

Notebook 10 asks where the time of one query goes; what it measures, records and draws is the
last part of this module: a seeded document subset (``subset_docset``), every query searched and
checked against numpy (``retrieve_all``), one query timed stage by stage (``Pipeline``,
``stage_breakdown``), TTFT against the retrieved context (``ttft_by_context``), prefix reuse in
two scenarios (``prefix_reuse``) and answer correctness (``answer_queries``), each with its
records and its figure.
"""

from __future__ import annotations

import importlib
import inspect
import json
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from labkit.core import env
from labkit.core import tolerances as tol
from labkit.core.checks import nonnegative_int
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
    """A question whose answer is in document ``doc_id`` (the label of recall@k); ``answer`` is
    that document's qualified name (what a right answer names: :func:`answer_checks`)."""

    text: str
    doc_id: int
    answer: str = ""


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
        queries.append(Query(text=summary, doc_id=docs[-1].id, answer=qualified))
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
            f"chars, cut at {MAX_BODY_CHARS}; answer = the qualified name of the query's document"
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
    if any(q.answer and q.answer != docs[q.doc_id].name for q in queries):
        raise ValueError(f"{folder / 'queries.jsonl'}: an answer is not its document's name")
    return docs, queries


# --- search --------------------------------------------------------------------------------------


def import_faiss() -> Any:
    """faiss, imported the one way that is safe beside torch.

    On macOS faiss-cpu bundles its own libomp next to torch's: the second to initialise aborts
    the process unless ``KMP_DUPLICATE_LIB_OK`` is set before the import (``env.openmp_guard``),
    and faiss then searches on one thread so that only one OpenMP runtime's threads run (the
    upstream workaround, pytorch#149201). The search of notebook 10's index is a small exact scan:
    one thread costs it little. On Linux the guard does nothing and faiss keeps its threads.
    """
    env.openmp_guard()
    import faiss

    if platform.system() == "Darwin":
        faiss.omp_set_num_threads(1)
    return faiss


class FaissIndex:
    """Exact inner-product search over unit vectors (cosine similarity) with faiss."""

    def __init__(self, embeddings: np.ndarray) -> None:
        faiss = import_faiss()
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


#: The instruction-tuned decoder's system turn, and how its user turn holds each document and
#: the question (which asks for the name that :func:`answer_checks` looks for).
CHAT_SYSTEM = "You answer questions about the Python standard library."


def chat_document(doc: Document) -> str:
    # One newline at the end: tokenized alone it gives the same tokens as inside the whole prompt
    # (a run of two would merge into one token here and not there).
    return f"Documentation of {doc.name}:\n{doc.text.rstrip()}\n"


def chat_question(query: str) -> str:
    return (f'Which function or class of the Python standard library does this describe? "{query}"\n'
            "Answer with its full name (module.name) only.")


@dataclass(frozen=True)
class Layout:
    """How one kind of decoder gets its prompt: ``head`` (the start every prompt shares), one
    block per retrieved document, then the question. The pieces are tokenized one by one, so the
    head's ids are a prefix of every prompt's: the prefix-reuse scenarios rely on it."""

    name: str
    head: str
    document: Callable[[Document], str]
    question: Callable[[str], str]
    bos: bool = True  # the tokenizer's BOS id goes first (a chat template writes its own start)


#: For a decoder trained on Python source (tiny-llama): a Python file, documents as comments.
CODE_LAYOUT = Layout("python comments", SYSTEM_PROMPT, lambda doc: context_block([doc]), question_block)


def chat_layout(tokenizer: Any, system: str = CHAT_SYSTEM) -> Layout:
    """The layout of ``tokenizer``'s own chat template: the system turn, a user turn holding the
    documents and the question, the assistant's turn opened. Head and end are found by rendering
    the template around a marker, so they are the template's own control tokens."""
    marker = "\ue000"  # a private-use character: in no document, no template
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": marker}],
        tokenize=False, add_generation_prompt=True)
    head, found, end = text.partition(marker)
    if not found:
        raise ValueError("chat_layout: the chat template dropped the user's message")
    return Layout("chat template", head, chat_document, lambda query: chat_question(query) + end,
                  bos=False)


def layout_for(tokenizer: Any) -> Layout:
    """:func:`chat_layout` for a tokenizer with a chat template, else :data:`CODE_LAYOUT`."""
    return chat_layout(tokenizer) if getattr(tokenizer, "chat_template", None) else CODE_LAYOUT


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (the caller decides where BOS goes)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def head_ids(tokenizer: Any, layout: Layout, bos_id: int | None) -> list[int]:
    """The start of every prompt: BOS (if the layout takes one and there is one), then the head."""
    return ([bos_id] if layout.bos and bos_id is not None else []) + encode(tokenizer, layout.head)


def prompt_ids(
    tokenizer: Any,
    query: str,
    docs: Sequence[Document],
    max_tokens: int,
    *,
    bos_id: int | None = None,
    layout: Layout = CODE_LAYOUT,
) -> tuple[list[int], int]:
    """(token ids of system prompt + as many retrieved documents as fit + the question, how many
    documents went in). Documents are kept whole, in rank order; one that would overflow
    ``max_tokens`` is left out, so the prompt never exceeds the budget."""
    head = head_ids(tokenizer, layout, bos_id)
    tail = encode(tokenizer, layout.question(query))
    if len(head) + len(tail) > max_tokens:
        raise ValueError(
            f"max_tokens={max_tokens} cannot hold the system prompt and question "
            f"({len(head) + len(tail)} tokens)"
        )
    body: list[int] = []
    used = 0
    for doc in docs:
        ids = encode(tokenizer, layout.document(doc))
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


# --- the notebook's study: a document subset, retrieval, stage times, TTFT, prefix reuse -----------

STUDY = "10_rag_on_device"
#: The stages of one query, in order (what ``Pipeline.answer`` times).
STAGES = ("embed", "search", "prompt", "prefill", "decode")
INDEX_NAME, EMBEDDER_NAME = "faiss.IndexFlatIP", "all-MiniLM-L6-v2"


def subset_docset(
    docs: Sequence[Document], queries: Sequence[Query], n_docs: int, seed: int = 0
) -> tuple[list[Document], list[Query]]:
    """A seeded random subset of ``n_docs`` documents (all when 0 or at least all) and the queries
    labelled with one of them, their labels renumbered to the subset's rows (the index's ids)."""
    nonnegative_int(n_docs, "n_docs", "subset_docset")
    if not n_docs or n_docs >= len(docs):
        keep = list(range(len(docs)))
    else:
        keep = sorted(np.random.default_rng(seed).choice(len(docs), n_docs, replace=False).tolist())
    position = {doc_id: i for i, doc_id in enumerate(keep)}  # shipped id -> row in the subset
    return ([docs[i] for i in keep],
            [replace(q, doc_id=position[q.doc_id]) for q in queries if q.doc_id in position])


def describe_docset(docs: Sequence[Document], queries: Sequence[Query], shipped: int, tokenizer: Any,
                    layout: Layout = CODE_LAYOUT) -> str:
    """How many documents and queries, and how long a document is in decoder tokens."""
    lengths = [len(encode(tokenizer, layout.document(d))) for d in docs]
    return (f"{len(docs)} documents (of {shipped}), {len(queries)} labelled queries; document length "
            f"in decoder tokens: median {int(np.median(lengths))}, max {max(lengths)}")


def query_examples(queries: Sequence[Query], docs: Sequence[Document], n: int = 5) -> pd.DataFrame:
    """The first ``n`` queries beside the document that answers each."""
    return pd.DataFrame([dict(query=q.text, answer_document=docs[q.doc_id].name) for q in queries[:n]])


@dataclass
class Retrieval:
    """Every query searched in the index over every document, checked against numpy."""

    index: FaissIndex
    ids: np.ndarray  # [queries, k_max] document rows, best first
    faiss_equals_numpy: bool
    recall: pd.Series  # recall@k by k
    chance: pd.Series  # k / documents by k
    build_ms: float  # embedding every document and adding it to the index, once

    def table(self) -> pd.DataFrame:
        """recall@k beside chance, by k."""
        return pd.concat([self.recall, self.chance], axis=1).rename_axis("k")

    def misses(self, queries: Sequence[Query], docs: Sequence[Document], n: int = 5) -> pd.DataFrame:
        """The first ``n`` queries whose labelled document was not retrieved first."""
        rows = [(q.text, docs[q.doc_id].name, docs[self.ids[i, 0]].name)
                for i, q in enumerate(queries) if self.ids[i, 0] != q.doc_id]
        return pd.DataFrame(rows[:n], columns=["query", "labelled document", "retrieved first"])


def retrieve_all(
    docs: Sequence[Document], queries: Sequence[Query], encoder: Any, k_values: Sequence[int],
    *, sync: Any = None,
) -> Retrieval:
    """Embed the documents (timed: the index build), search every query, compare faiss with
    :func:`exact_search` (same ids, scores within float32 rounding) and compute recall@k."""
    from labkit.core.timing import Timer
    from labkit.models.encoder import embed

    with Timer(sync=sync) as t_build:
        doc_emb = embed([d.text for d in docs], encoder).numpy()
        index = FaissIndex(doc_emb)
    query_emb = embed([q.text for q in queries], encoder).numpy()
    k_max = min(max(k_values), len(docs))
    scores, ids = index.search(query_emb, k_max)
    ref_scores, ref_ids = exact_search(doc_emb, query_emb, k_max)
    same = bool((ids == ref_ids).all()) and float(np.abs(scores - ref_scores).max()) < tol.OTHER_RUNTIME.cpu
    relevant = [q.doc_id for q in queries]
    recall = pd.Series({k: recall_at_k(ids, relevant, k) for k in k_values if k <= k_max}, name="recall@k")
    chance = pd.Series({k: k / len(docs) for k in recall.index}, name="chance (k / documents)")
    return Retrieval(index, ids, same, recall, chance, t_build.ms)


def retrieval_records(ret: Retrieval, *, n_docs: int, n_queries: int, device: str, threads: int) -> list[dict]:
    """recall@k (one record per k) and the index build time."""
    common = dict(n_docs=n_docs, n_queries=n_queries, index=INDEX_NAME, embedder=EMBEDDER_NAME)
    return (
        [dict(study=STUDY, metric="recall_at_k", value=float(v), unit="1", runtime="faiss",
              device="cpu", model="minilm", params=dict(common, k=int(k))) for k, v in ret.recall.items()]
        + [dict(study=STUDY, metric="index_build_ms", value=ret.build_ms, unit="ms", runtime="torch+faiss",
                device=device, model="minilm", params=dict(common, stat="one run", threads=threads))])


def plot_recall(ret: Retrieval, *, n_queries: int, n_docs: int) -> Any:
    """Figure: recall@k against k, beside chance (k / documents)."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    ax.plot(ret.recall.index, ret.recall.values, marker="o", label="MiniLM + faiss (exact)")
    ax.plot(ret.chance.index, ret.chance.values, linestyle=":", color="grey", label="chance: k / documents")
    ax.set_xlabel("k (documents retrieved)")
    ax.set_ylabel("recall@k (share of queries)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Retrieval: {n_queries} held-out docstring summaries over {n_docs} documents")
    ax.legend()
    return fig


@dataclass
class Pipeline:
    """One query's path: MiniLM embeds it, the index finds ``top_k`` documents, the prompt is
    assembled within ``budget`` tokens, the decoder generates ``new_tokens`` tokens."""

    decoder: Any
    tokenizer: Any
    encoder: Any
    index: FaissIndex
    docs: Sequence[Document]
    top_k: int
    budget: int
    new_tokens: int
    bos_id: int | None = None
    sync: Any = None
    layout: Layout = CODE_LAYOUT

    def head(self) -> list[int]:
        """BOS (if the layout takes one) and the system prompt: the start of every prompt."""
        return head_ids(self.tokenizer, self.layout, self.bos_id)

    def prompt(self, query: str, doc_rows: Sequence[int]) -> tuple[list[int], int]:
        """:func:`prompt_ids` of ``query`` with the documents at ``doc_rows`` (index rows)."""
        return prompt_ids(self.tokenizer, query, [self.docs[i] for i in doc_rows], self.budget,
                          bos_id=self.bos_id, layout=self.layout)

    def answer(self, query: str) -> tuple[dict[str, float], dict[str, Any]]:
        """Run the whole pipeline once: (ms per stage of :data:`STAGES`, what was generated)."""
        from labkit.core.timing import Timer
        from labkit.models.encoder import embed

        times = {}
        with Timer(sync=self.sync) as t:
            q_emb = embed(query, self.encoder).numpy()
        times["embed"] = t.ms
        with Timer() as t:
            _, hit = self.index.search(q_emb, self.top_k)
        times["search"] = t.ms
        with Timer() as t:
            ids, used = self.prompt(query, hit[0])
        times["prompt"] = t.ms
        gen, tokens = timed_greedy(self.decoder, ids, self.new_tokens, sync=self.sync)
        times["prefill"] = gen.ttft_s * 1e3
        times["decode"] = sum(gen.tpot_s) * 1e3
        return times, dict(prompt_tokens=len(ids), docs_in_prompt=used, tokens=tokens,
                           tokens_per_s=gen.tokens_per_s, hit=hit[0].tolist())


def stage_breakdown(
    pipe: Pipeline, queries: Sequence[Query], n: int, seed: int = 0
) -> tuple[pd.DataFrame, list[Query]]:
    """Time ``n`` seeded random queries stage by stage, after one untimed warm-up query.

    Returns one row per timed query (ms per stage, prompt tokens, documents in the prompt, decode
    tokens/s, whether the labelled document was retrieved) and the queries drawn (warm-up first).
    """
    drawn = [queries[i] for i in np.random.default_rng(seed).permutation(len(queries))[: n + 1]]
    pipe.answer(drawn[0].text)  # warm-up
    rows = []
    for q in drawn[1:]:
        times, info = pipe.answer(q.text)
        rows.append(dict(times, prompt_tokens=info["prompt_tokens"], docs_in_prompt=info["docs_in_prompt"],
                         decode_tok_s=info["tokens_per_s"], retrieved=q.doc_id in info["hit"]))
    return pd.DataFrame(rows), drawn


def stage_records(
    stages: pd.DataFrame, *, device: str, model: str, threads: int, top_k: int, new_tokens: int, n_docs: int
) -> list[dict]:
    """``stage_ms`` records: the median of each stage (p10, p90 in params)."""
    median = stages[list(STAGES)].median()
    return [
        dict(study=STUDY, metric="stage_ms", value=float(median[s]), unit="ms",
             runtime="faiss" if s == "search" else "torch", device="cpu" if s == "search" else device,
             model="minilm" if s == "embed" else ("none" if s in ("search", "prompt") else model),
             params=dict(stage=s, stat="median", threads=threads, queries=len(stages), top_k=top_k,
                         new_tokens=new_tokens, prompt_tokens_median=float(stages.prompt_tokens.median()),
                         n_docs=n_docs, p10_ms=float(stages[s].quantile(0.1)),
                         p90_ms=float(stages[s].quantile(0.9))))
        for s in STAGES
    ]


def stage_summary(stages: pd.DataFrame) -> pd.DataFrame:
    """Per stage: the median ms over the timed queries and its share of the whole query."""
    median = stages[list(STAGES)].median()
    return pd.DataFrame({"median_ms": median, "share": median / median.sum()})


def describe_answer(pipe: Pipeline, query: str) -> str:
    """One query through the pipeline: the question, what was retrieved, what the decoder wrote."""
    _, info = pipe.answer(query)
    return (f"example question: {query}\nretrieved: " + ", ".join(pipe.docs[i].name for i in info["hit"])
            + f"\ndecoder's answer: {pipe.tokenizer.decode(info['tokens'])!r}")


def plot_stages(stages: pd.DataFrame, *, top_k: int, new_tokens: int, device: str) -> Any:
    """Figure: one query's time, the median of each stage stacked left to right."""
    from labkit.core import plotting

    median = stages[list(STAGES)].median()
    fig, ax = plotting.new_figure(figsize=(8, 3.2), layout="constrained")
    left = 0.0
    for s in STAGES:
        ax.barh([0], [median[s]], left=left, label=f"{s} {median[s]:.1f} ms")
        left += median[s]
    ax.set_yticks([])
    ax.set_xlabel("time per query (ms, median of each stage)")
    ax.set_ylabel("one query")
    ax.set_title(f"Where the time goes: top-{top_k} RAG, {new_tokens} new tokens, "
                 f"~{int(stages.prompt_tokens.median())}-token prompt ({device})")
    fig.legend(fontsize=8, ncol=len(STAGES), loc="outside lower center")  # below, laid out
    return fig


def _first_token(decoder: Any, ids: list[int]) -> Any:
    """TTFT's work: a fresh cache, the prefill of ``ids``, the argmax."""
    from labkit.inference.kv_cache import KVCache

    return prefill(decoder, ids, KVCache.for_model(decoder, max_len=len(ids))).argmax(-1)


def ttft_by_context(
    pipe: Pipeline, query: str, doc_counts: Sequence[int], *, warmup: int, repeats: int
) -> pd.DataFrame:
    """TTFT of ``query`` with 0, 1, 2, ... of its retrieved documents in the prompt.

    A count whose documents do not all fit the budget is left out (the window is full).
    """
    from labkit.core.timing import measure
    from labkit.models.encoder import embed

    _, hits = pipe.index.search(embed(query, pipe.encoder).numpy(),
                                min(max(doc_counts), len(pipe.docs)) or 1)
    rows = []
    for n in doc_counts:
        ids, used = pipe.prompt(query, hits[0][:n])
        if used < n:
            continue
        stats = measure(lambda ids=ids: _first_token(pipe.decoder, ids), warmup=warmup,
                        repeats=repeats, sync=pipe.sync)
        rows.append(dict(docs=n, prompt_tokens=len(ids), ttft_ms=stats.median_ms, p10_ms=stats.p10_ms,
                         p90_ms=stats.p90_ms, repeats=stats.n))
    return pd.DataFrame(rows)


def ttft_fit(ttft: pd.DataFrame) -> tuple[float, float]:
    """(ms per prompt token, ms at zero tokens): the least-squares line through TTFT."""
    slope, intercept = np.polyfit(ttft.prompt_tokens, ttft.ttft_ms, 1)
    return float(slope), float(intercept)


def ttft_records(ttft: pd.DataFrame, *, device: str, model: str, threads: int) -> list[dict]:
    """``ttft_ms`` records, one per number of documents in the prompt."""
    return [
        dict(study=STUDY, metric="ttft_ms", value=r.ttft_ms, unit="ms", runtime="torch", device=device,
             model=model,
             params=dict(docs_in_prompt=int(r.docs), prompt_tokens=int(r.prompt_tokens), stat="median",
                         threads=threads, p10_ms=r.p10_ms, p90_ms=r.p90_ms, repeats=int(r.repeats)))
        for r in ttft.itertuples()
    ]


def plot_ttft(ttft: pd.DataFrame, *, model_name: str, device: str) -> Any:
    """Figure: TTFT against prompt length (median, p10-p90), the fitted line, documents marked."""
    from labkit.core import plotting

    slope, intercept = ttft_fit(ttft)
    fig, ax = plotting.new_figure()
    ax.errorbar(ttft.prompt_tokens, ttft.ttft_ms, yerr=[ttft.ttft_ms - ttft.p10_ms, ttft.p90_ms - ttft.ttft_ms],
                marker="o", capsize=3, label="measured (median, p10–p90)")
    xs = np.linspace(0, ttft.prompt_tokens.max(), 50)
    ax.plot(xs, intercept + slope * xs, linestyle=":", color="grey", label=f"fit: {slope:.2f} ms/token")
    for r in ttft.itertuples():
        ax.annotate(f"{r.docs} doc{'s' if r.docs != 1 else ''}", (r.prompt_tokens, r.ttft_ms), fontsize=7,
                    xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("prompt length (tokens): system prompt + retrieved documents + question")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(f"TTFT against retrieved-context length ({model_name}, {device})")
    ax.legend()
    return fig


@dataclass(frozen=True)
class Scenario:
    """A shared prefix (token ids) and the per-query parts that follow it."""

    name: str
    prefix: list[int]
    suffixes: list[list[int]]


def system_prompt_scenario(pipe: Pipeline, queries: Sequence[Query], hits: np.ndarray) -> Scenario:
    """Shared: BOS + the system prompt; per query: its top-k documents (``hits`` rows) and question."""
    head = pipe.head()
    fulls = [pipe.prompt(q.text, row[: pipe.top_k])[0] for q, row in zip(queries, hits, strict=True)]
    return Scenario("system prompt", head, [full[len(head):] for full in fulls])


def pinned_scenario(
    pipe: Pipeline, docs: Sequence[Document], queries: Sequence[Query], module: str, max_tokens: int,
    n_queries: int,
) -> Scenario:
    """Shared: the system prompt plus ``module``'s documents in order, cut to ``max_tokens`` (mid-
    document if need be); per query: a question about that module (from ``queries``, labelled in
    ``docs``), nothing retrieved."""
    pinned: list[int] = []
    for d in docs:
        if d.name.rsplit(".", 1)[0] == module and len(pinned) < max_tokens:
            pinned += encode(pipe.tokenizer, pipe.layout.document(d))
    if not pinned:
        raise ValueError(f"pinned_scenario: no documents of module {module!r} in the document set")
    asked = [q for q in queries if docs[q.doc_id].name.rsplit(".", 1)[0] == module][:n_queries]
    return Scenario("pinned document", pipe.head() + pinned[:max_tokens],
                    [encode(pipe.tokenizer, pipe.layout.question(q.text)) for q in asked])


def _reuse_rows(
    decoder: Any, scenario: Scenario, *, warmup: int, repeats: int, sync: Any = None
) -> list[dict]:
    """One scenario's rows of :func:`prefix_reuse`: the prefix prefilled once (timed), then per
    query the full prefill and the reuse, each timed, and their first-token logit difference."""
    from labkit.core.timing import Timer, measure
    from labkit.inference.kv_cache import KVCache

    prefix = scenario.prefix
    shared = KVCache.for_model(decoder, max_len=len(prefix))
    with Timer(sync=sync) as t_prefix:
        prefill(decoder, prefix, shared)
    rows = []
    for suffix in scenario.suffixes:
        full_ids = prefix + suffix

        def full(full_ids: list[int] = full_ids) -> Any:
            return prefill(decoder, full_ids, KVCache.for_model(decoder, max_len=len(full_ids)))

        def reuse(suffix: list[int] = suffix) -> Any:
            return prefill(decoder, suffix, fork_cache(shared, len(prefix) + len(suffix)))

        err = (full() - reuse()).abs().max().item()  # also a first, untimed run
        t_full = measure(full, warmup=warmup, repeats=repeats, sync=sync)
        t_reuse = measure(reuse, warmup=warmup, repeats=repeats, sync=sync)
        rows.append(dict(scenario=scenario.name, prefix_tokens=len(prefix), suffix_tokens=len(suffix),
                         full_ms=t_full.median_ms, reuse_ms=t_reuse.median_ms, max_abs_logit_diff=err,
                         prefix_once_ms=t_prefix.ms))
    return rows


def prefix_reuse(
    decoder: Any, scenarios: Sequence[Scenario], *, warmup: int, repeats: int, sync: Any = None
) -> pd.DataFrame:
    """TTFT with the prefix prefilled every time vs its cache copied (:func:`fork_cache`) and only
    the rest prefilled, one row per (scenario, query); the first-token logits of the two must agree
    (``max_abs_logit_diff``). TTFT with reuse includes the copy."""
    return pd.DataFrame([row for sc in scenarios
                         for row in _reuse_rows(decoder, sc, warmup=warmup, repeats=repeats, sync=sync)])


def reuse_by_scenario(prefix_df: pd.DataFrame, config: Any, dtype_bytes: int) -> pd.DataFrame:
    """Per scenario: medians over its queries, the TTFT saving in %, the prefix cache's bytes."""
    from labkit.inference.kv_cache import kv_cache_bytes_for_config

    per = prefix_df.groupby("scenario", sort=False).agg(
        prefix_tokens=("prefix_tokens", "first"), suffix_tokens=("suffix_tokens", "median"),
        full_ms=("full_ms", "median"), reuse_ms=("reuse_ms", "median"),
        prefix_once_ms=("prefix_once_ms", "first"), max_abs_logit_diff=("max_abs_logit_diff", "max"),
        queries=("full_ms", "size"))
    per["saving_pct"] = 100 * (1 - per.reuse_ms / per.full_ms)
    per["prefix_cache_bytes"] = [kv_cache_bytes_for_config(config, int(n), dtype_bytes)
                                 for n in per.prefix_tokens]
    return per


def reuse_records(per: pd.DataFrame, *, device: str, model: str, threads: int, repeats: int) -> list[dict]:
    """``prefix_cache_saving_pct`` records, one per scenario (the TTFTs in params)."""
    return [
        dict(study=STUDY, metric="prefix_cache_saving_pct", value=float(r.saving_pct), unit="%",
             runtime="torch", device=device, model=model,
             params=dict(scenario=name, prefix_tokens=int(r.prefix_tokens),
                         suffix_tokens_median=float(r.suffix_tokens), full_ttft_ms=float(r.full_ms),
                         reuse_ttft_ms=float(r.reuse_ms), queries=int(r.queries),
                         prefix_cache_bytes=int(r.prefix_cache_bytes), stat="median", threads=threads,
                         repeats=repeats))
        for name, r in per.iterrows()
    ]


def plot_prefix_reuse(per: pd.DataFrame, *, model_name: str, device: str) -> Any:
    """Figure: TTFT prefilling everything vs copying the cached prefix, per scenario."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    x = np.arange(len(per))
    ax.bar(x - 0.2, per.full_ms, width=0.4, label="prefill everything")
    ax.bar(x + 0.2, per.reuse_ms, width=0.4, label="copy cached prefix + prefill the rest")
    ax.set_xticks(x, [f"{n}\n({int(r.prefix_tokens)} shared + {int(r.suffix_tokens)} per query)"
                      for n, r in per.iterrows()])
    ax.set_xlabel("scenario (tokens)")
    ax.set_ylabel("time to first token (ms, median over queries)")
    ax.set_title(f"Prefix KV-cache reuse ({model_name}, {device})")
    ax.set_ylim(0, 1.35 * per.full_ms.max())
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    return fig


# --- are the answers right? (an instruction-tuned decoder, with and without retrieval) ------------


def correctness_skip_reason(tokenizer: Any, model_name: str) -> str | None:
    """Why answer correctness is not measured on this decoder, or None: it needs one that can be
    asked for a name (a chat template), not one that continues Python source."""
    if getattr(tokenizer, "chat_template", None):
        return None
    return (f"needs an instruction-tuned decoder with a chat template, asked for the name of the "
            f"documented function; {model_name} continues Python source: run with MODEL=smollm2-135m")


_WRAPPING = "`'\"* \t\n"


def bare_answer(output: str) -> str:
    """``output`` without what wraps a name: whitespace, quotes, backticks, asterisks, one
    trailing period and one trailing ``()``."""
    text = output.strip(_WRAPPING).removesuffix(".").strip(_WRAPPING)
    return text.removesuffix("()").strip(_WRAPPING)


def answer_checks(output: str, gold: str) -> tuple[bool, bool]:
    """(``gold`` appears in ``output`` as a whole name: not inside a longer one, so ``json.dump``
    is not found in ``json.dumps`` nor ``os.path`` in ``os.path.join``; :func:`bare_answer` of
    ``output`` is exactly ``gold``)."""
    if not gold:
        raise ValueError("answer_checks needs a gold answer (queries.jsonl's answer field)")
    named = re.search(rf"(?<![\w.]){re.escape(gold)}(?!\w|\.\w)", output) is not None
    return named, bare_answer(output) == gold


def greedy_answer(decoder: Any, tokenizer: Any, ids: Sequence[int], max_new_tokens: int) -> str:
    """The decoder's greedy answer to ``ids``, ended at its end-of-turn token (or after
    ``max_new_tokens``), as text."""
    import torch

    from labkit.inference.chat import end_token_ids
    from labkit.inference.generate import greedy

    prompt = torch.tensor([list(ids)], device=next(decoder.parameters()).device)
    out = greedy(decoder, prompt, max_new_tokens, eos_token_id=end_token_ids(decoder, tokenizer))
    return tokenizer.decode(out.new_tokens[0].tolist(), skip_special_tokens=True).strip()


def answer_queries(
    pipe: Pipeline, queries: Sequence[Query], hits: np.ndarray, n: int, *, max_new_tokens: int,
    seed: int = 0,
) -> pd.DataFrame:
    """``n`` seeded random queries, each answered twice: with its top-k documents (``hits`` rows,
    from :func:`retrieve_all`) in the prompt and with none. One row per (query, retrieval): the
    output and its :func:`answer_checks` against the query's gold answer."""
    from labkit.core.checks import positive_int

    positive_int(max_new_tokens, "max_new_tokens", "answer_queries")
    rows = []
    for i in np.random.default_rng(seed).permutation(len(queries))[:n]:
        q, top = queries[i], [int(d) for d in hits[i][: pipe.top_k]]
        for retrieval, doc_rows in ((f"top-{pipe.top_k}", top), ("none", [])):
            ids, used = pipe.prompt(q.text, doc_rows)
            output = greedy_answer(pipe.decoder, pipe.tokenizer, ids, max_new_tokens)
            named, exact = answer_checks(output, q.answer)
            rows.append(dict(query=q.text, answer=q.answer, retrieval=retrieval, docs_in_prompt=used,
                             target_retrieved=q.doc_id in doc_rows, output=output,
                             named=named, exact=exact))
    return pd.DataFrame(rows)


def correctness_summary(answers: pd.DataFrame) -> pd.DataFrame:
    """By retrieval: queries, how many answers name the gold answer and how many are exactly it
    (counts, shares and each share's Wilson 95 % interval, ``<check>_low``/``<check>_high``), and
    how often the labelled document was among those retrieved."""
    from scipy.stats import binomtest

    per = answers.groupby("retrieval", sort=False).agg(
        n=("named", "size"), named_n=("named", "sum"), exact_n=("exact", "sum"),
        target_retrieved=("target_retrieved", "mean"))
    for check in ("named", "exact"):
        per[check] = per[f"{check}_n"] / per.n
        cis = [binomtest(int(k), int(n)).proportion_ci(method="wilson")
               for k, n in zip(per[f"{check}_n"], per.n, strict=True)]
        per[f"{check}_low"], per[f"{check}_high"] = [c.low for c in cis], [c.high for c in cis]
    return per


def paired_gain(answers: pd.DataFrame) -> dict[str, int]:
    """The same queries asked both ways (:func:`answer_queries`): how many answers name the gold
    answer only with the retrieved documents, only without them, both ways, neither way."""
    named = answers.pivot(index="query", columns="retrieval", values="named")
    with_docs = named[[c for c in named.columns if c != "none"][0]]
    without = named["none"]
    return dict(with_only=int((with_docs & ~without).sum()), without_only=int((~with_docs & without).sum()),
                both=int((with_docs & without).sum()), neither=int((~with_docs & ~without).sum()))


def correctness_sentence(summary: pd.DataFrame, gain: dict[str, int], *, quick: bool = False) -> str:
    """One line per retrieval condition: how often the answer names the documented function (with
    its interval), how often it is exactly the name, how often the document was retrieved; then
    the paired counts of :func:`paired_gain`."""
    lines = [f"5. {name}: names the documented function in {r.named:.0%} of {int(r.n)} queries (95 % "
             f"interval {r.named_low:.2f}-{r.named_high:.2f}), is exactly its name in {r.exact:.0%}; "
             f"the labelled document was retrieved for {r.target_retrieved:.0%}"
             for name, r in summary.iterrows()]
    lines.append(f"5. the same queries both ways: named only with the documents {gain['with_only']}, only "
                 f"without {gain['without_only']}, both ways {gain['both']}, neither way {gain['neither']}")
    if quick:
        lines.append(f"5. not asserted in quick mode: {int(summary.n.max())} queries are too few; the "
                     f"full run asserts it")
    return "\n".join(lines)


def correctness_records(
    summary: pd.DataFrame, *, device: str, model: str, threads: int, max_new_tokens: int, n_docs: int
) -> list[dict]:
    """``answer_named_rate`` and ``answer_exact_rate`` records, one per retrieval condition."""
    return [
        dict(study=STUDY, metric=f"answer_{check}_rate", value=float(r[check]), unit="1",
             runtime="torch", device=device, model=model,
             params=dict(retrieval=name, queries=int(r.n), correct=int(r[f"{check}_n"]),
                         ci95_low=float(r[f"{check}_low"]), ci95_high=float(r[f"{check}_high"]),
                         interval="wilson", target_retrieved=float(r.target_retrieved), n_docs=n_docs,
                         gold="qualified name of the query's document", decoding="greedy",
                         max_new_tokens=max_new_tokens, threads=threads))
        for name, r in summary.iterrows() for check in ("named", "exact")
    ]


def plot_correctness(summary: pd.DataFrame, *, model_name: str) -> Any:
    """Figure: share of answers naming the gold answer, and exactly it, with and without retrieval."""
    from labkit.core import plotting

    fig, ax = plotting.new_figure()
    x = np.arange(len(summary))
    for offset, check, label in ((-0.2, "named", "names the documented function"),
                                 (0.2, "exact", "is exactly its name")):
        err = [summary[check] - summary[f"{check}_low"], summary[f"{check}_high"] - summary[check]]
        ax.bar(x + offset, summary[check], width=0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(x, [f"{name}\n({int(r.n)} queries)" for name, r in summary.iterrows()])
    ax.set_xlabel("documents in the prompt (bars: Wilson 95 % interval)")
    ax.set_ylabel("share of answers (1)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Answer correctness with and without retrieval ({model_name}, greedy)")
    ax.legend()
    return fig


def bench_retrieval(quick: bool = False, model: str = "minilm") -> list[dict]:
    """`labkit bench rag`: recall@k and per-query embed/search time of MiniLM (or another
    encoder, ``--model``) + faiss over the shipped document set (study "10_rag_on_device");
    quick: a seeded subset of 64 documents."""
    from labkit.core import results
    from labkit.core.timing import measure
    from labkit.models.config import BERT_ARCHS
    from labkit.models.encoder import embed
    from labkit.models.loader import load

    docs, queries = subset_docset(*load_docset(), 64 if quick else 0, seed=0)
    minilm = load(model, device="cpu")
    if minilm.card["architecture"] not in BERT_ARCHS:
        raise ValueError(f"model {model!r} is a {minilm.card['architecture']}: the retrieval "
                         f"benchmark embeds with an encoder ({', '.join(BERT_ARCHS)})")
    index = FaissIndex(embed([d.text for d in docs], minilm).numpy())
    query_emb = embed([q.text for q in queries], minilm).numpy()
    _, ids = index.search(query_emb, 10)
    common = {"n_docs": len(docs), "n_queries": len(queries), "index": INDEX_NAME,
              "embedder": EMBEDDER_NAME if model == "minilm" else model,
              "source": "labkit bench rag"}
    out = [
        results.record(STUDY, "recall_at_k", recall_at_k(ids, [q.doc_id for q in queries], k),
                       "1", runtime="faiss", device="cpu", model=model, params={**common, "k": k})
        for k in (1, 5, 10)
    ]
    text = queries[0].text
    for stage, fn in (("embed", lambda: embed(text, minilm)),
                      ("search", lambda: index.search(query_emb[:1], 10))):
        stats = measure(fn, warmup=1, repeats=5 if quick else 20)
        out.append(results.record(
            STUDY, "stage_ms", stats.median_ms, "ms",
            runtime="faiss" if stage == "search" else "torch", device="cpu",
            model=model if stage == "embed" else "none",
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
