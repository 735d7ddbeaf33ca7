"""Encoder vs decoder, measured (notebook 05): attention masks, perturbations, meaning, control
prefixes, and a toy sequence-to-sequence task.

Why a module: each measurement here is a small function with a test, so the notebook only
asks the questions and draws the answers. The ideas, one per section:

* **Attention weights** from real forward passes. BERT (MiniLM) returns them from transformers
  with eager attention; labkit's Llama computes attention inside SDPA and never materializes
  the weights, so :func:`llama_attentions` recomputes them from each layer's own q/k
  projections (inputs captured with forward hooks), exactly as the layer uses them.
* **Perturbation matrix**: change token i, measure how much the final hidden state at every
  position j moves. A causal decoder cannot move j < i; a bidirectional encoder moves all j.
* **Meaning**: leave-one-out top-1 retrieval on a labelled sentence set (data/encdec/).
* **Prompt as context**: how a prefix shifts the next-token distribution (KL, top-token change).
* **Seq2seq toy task**: reverse (or sort) a sequence of symbols, with a tiny BART
  encoder-decoder, a BART decoder-only stack of similar size that reads the whole input first
  (input, separator, output), and the same decoder forced to answer while it reads
  (input and output interleaved) — so the question "does the whole input first matter?" is
  answered by a control, not by the architecture name alone.

torch and transformers are imported inside the functions that need them, so importing this
module stays light.
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from labkit.core import paths

if TYPE_CHECKING:
    import torch

# The sentence set ships in the checkout (like data/models): paths.data_dir() finds it there even
# when LABKIT_ROOT points a run's outputs at a temporary folder.
DATA_DIR = paths.data_dir() / "encdec"
SENTENCES = DATA_DIR / "sentences.tsv"


# --- the labelled sentence set -----------------------------------------------------------------


def load_sentences(path: str | Path = SENTENCES) -> tuple[list[str], list[str]]:
    """(texts, topics) from a tab-separated file with a header ``topic<TAB>text``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing sentence file (expected topic<TAB>text rows)")
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if not rows or set(rows[0]) != {"topic", "text"}:
        raise ValueError(f"{path}: expected a header 'topic<TAB>text' and at least one row")
    texts = [r["text"].strip() for r in rows]
    topics = [r["topic"].strip() for r in rows]
    if any(not t for t in texts + topics):
        raise ValueError(f"{path}: a row has an empty topic or text")
    return texts, topics


# --- attention weights -------------------------------------------------------------------------


def bert_attentions(loaded: Any, text: str) -> tuple[list[str], torch.Tensor]:
    """(tokens, weights [layers, heads, T, T]) of a transformers BERT on one sentence.

    SDPA never returns weights, so the model runs with eager attention for this one call (the
    previous implementation is restored afterwards).
    """
    import torch

    model, tok = loaded.model, loaded.tokenizer
    batch = tok(text, return_tensors="pt").to(next(model.parameters()).device)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    weights = torch.stack([a[0] for a in out.attentions]).float().cpu()
    return tok.convert_ids_to_tokens(batch["input_ids"][0]), weights


def _capture_attention_inputs(model: Any, input_ids: torch.Tensor) -> list[tuple]:
    """Run labkit's Llama once; return (attention module, input x, cos, sin, output) per layer.

    Forward hooks on every ``self_attn`` see exactly what the layer gets and gives.
    """
    import torch

    captured: list[tuple] = []

    def grab(module, args, output):
        captured.append((module, args[0].detach(), args[1], args[2], output.detach()))

    handles = [blk.self_attn.register_forward_hook(grab) for blk in model.model.layers]
    try:
        with torch.inference_mode():
            model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def _layer_attention(attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(weights [B, H, T, T], v [B, H, T, d]) of one labkit Llama attention layer: q, k, v
    from the layer's projections, RoPE on q and k, K/V heads repeated for GQA, causal mask."""
    import torch

    from labkit.models.llama import apply_rope

    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    group = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(attn.head_dim)
    future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1), v


def llama_attentions(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Attention weights ``[layers, heads, T, T]`` of labkit's Llama for one sequence [1, T].

    labkit's Llama runs attention inside SDPA, which never materializes the weights, so they
    are recomputed from each layer's captured input: softmax(q k^T / sqrt(d) + causal mask),
    the same numbers SDPA uses (:func:`llama_attention_output_error` checks that).
    """
    import torch

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
    layers = []
    with torch.inference_mode():
        for attn, x, cos, sin, _ in _capture_attention_inputs(model, input_ids):
            layers.append(_layer_attention(attn, x, cos, sin)[0][0])
    return torch.stack(layers).cpu()


def llama_attention_output_error(model: Any, input_ids: torch.Tensor) -> float:
    """Max |o_proj(weights @ v) - the layer's real output| over all layers: ~1e-6 in float32
    means the recomputed weights are the ones the model used."""
    import torch

    worst = 0.0
    with torch.inference_mode():
        for attn, x, cos, sin, out in _capture_attention_inputs(model, input_ids):
            weights, v = _layer_attention(attn, x, cos, sin)
            b, t, _ = x.shape
            y = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(b, t, -1)
            worst = max(worst, float((attn.o_proj(y) - out).abs().max()))
    return worst


def mass_above_diagonal(weights: torch.Tensor) -> float:
    """Largest total attention a query gives to later positions (0 for a causal mask)."""
    import torch

    t = weights.shape[-1]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    return float((weights.float().cpu() * future).sum(-1).max())


# --- perturbation matrix -----------------------------------------------------------------------


def llama_hidden_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [B, T] -> last layer's output [B, T, D] (the residual stream before the final norm)."""
    import torch

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(ids, return_hidden=True)[1][-1].float()

    return hidden


def bert_hidden_fn(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [B, T] -> BERT's last_hidden_state [B, T, D] (no padding: one sentence, repeated)."""
    import torch

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            mask = torch.ones_like(ids)
            return model(input_ids=ids, attention_mask=mask).last_hidden_state.float()

    return hidden


def perturbation_matrix(
    hidden_fn: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    positions: Sequence[int],
    replacement: int,
) -> np.ndarray:
    """Matrix ``[len(positions), T]``: row r is ||h'_j - h_j|| / ||h_j|| after token
    ``positions[r]`` is replaced by ``replacement`` (or ``replacement + 1`` where the token
    already is ``replacement``), for every position j.

    Each variant runs as its own forward pass of the same shape as the original, so a nonzero
    entry at j < i cannot come from batching: it would be information flowing backwards.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
    t = input_ids.shape[1]
    bad = [p for p in positions if not 0 <= p < t]
    if bad or not positions:
        raise ValueError(
            f"positions must be a non-empty list within [0, {t}), got {list(positions)}"
        )
    base = hidden_fn(input_ids)[0]
    norm = base.norm(dim=-1).clamp(min=1e-12)
    rows = []
    for i in positions:
        ids = input_ids.clone()
        ids[0, i] = replacement if int(ids[0, i]) != replacement else replacement + 1
        changed = hidden_fn(ids)[0]
        rows.append(((changed - base).norm(dim=-1) / norm).cpu().numpy())
    return np.stack(rows).astype(np.float64)


def leak_before(matrix: np.ndarray, positions: Sequence[int]) -> float:
    """Largest change at a position j < i when token i was changed (the backward leak)."""
    leaks = [float(matrix[r, :i].max()) for r, i in enumerate(positions) if i > 0]
    return max(leaks) if leaks else 0.0


def change_elsewhere_min(matrix: np.ndarray, positions: Sequence[int]) -> float:
    """Smallest change at any position j != i: > 0 everywhere means the change spread to all."""
    values = [np.delete(matrix[r], i).min() for r, i in enumerate(positions)]
    return float(min(values))


# --- meaning: sentence vectors and retrieval ---------------------------------------------------


def decoder_embeddings(
    model: Any, tokenizer: Any, texts: Sequence[str], pooling: str = "mean"
) -> torch.Tensor:
    """Unit vectors [N, D] from labkit's Llama: the final-norm hidden states of each sentence,
    averaged over its tokens (``"mean"``, the BOS token left out: it is the same in every
    sentence) or taken at the last token (``"last"``, the only position that saw the whole
    sentence in a causal model). One sentence per forward pass, so no padding is involved.
    """
    import torch
    import torch.nn.functional as F

    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    device = model.model.embed_tokens.weight.device
    bos = getattr(tokenizer, "bos_token_id", None)
    vectors = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
            states = model.model.norm(model(ids, return_hidden=True)[1][-1])[0].float()
            if bos is not None and int(ids[0, 0]) == bos and ids.shape[1] > 1:
                states = states[1:]
            vectors.append(states.mean(0) if pooling == "mean" else states[-1])
    return F.normalize(torch.stack(vectors), dim=-1).cpu()


def bag_of_words_embeddings(texts: Sequence[str]) -> torch.Tensor:
    """Unit word-count vectors [N, vocab] (lower-cased words): the no-model baseline."""
    import torch
    import torch.nn.functional as F

    words = [re.findall(r"[a-z0-9']+", t.lower()) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted({w for ws in words for w in ws}))}
    counts = torch.zeros(len(texts), max(len(vocab), 1))
    for row, ws in enumerate(words):
        for w in ws:
            counts[row, vocab[w]] += 1
    return F.normalize(counts, dim=-1)


def similarity_matrix(vectors: torch.Tensor) -> np.ndarray:
    """Cosine similarities [N, N] of the rows (normalized here, whatever came in)."""
    import torch.nn.functional as F

    unit = F.normalize(vectors.float(), dim=-1)
    return (unit @ unit.T).cpu().numpy().astype(np.float64)


def retrieval_accuracy(similarity: np.ndarray, labels: Sequence[str]) -> float:
    """Leave-one-out top-1 retrieval: the share of items whose most similar *other* item has
    the same label. Ties go to the lower index (numpy's argmax), deterministically."""
    sim = np.asarray(similarity, dtype=np.float64).copy()
    n = len(labels)
    if sim.shape != (n, n) or n < 2:
        raise ValueError(f"similarity must be [N, N] with N = len(labels) >= 2, got {sim.shape}")
    np.fill_diagonal(sim, -np.inf)
    nearest = sim.argmax(axis=1)
    return float(np.mean([labels[i] == labels[j] for i, j in enumerate(nearest)]))


def chance_retrieval_accuracy(labels: Sequence[str]) -> float:
    """Expected top-1 accuracy of a random neighbour: mean of (same-label others) / (N - 1)."""
    n = len(labels)
    return float(np.mean([(labels.count(lab) - 1) / (n - 1) for lab in labels]))


# --- prompt as context: how a prefix moves the next-token distribution -------------------------


def next_token_logprobs(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """log softmax of the logits for the token after ``input_ids`` [1, T] -> [vocab] (fp32)."""
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(input_ids)[0, -1].float(), dim=-1).cpu()


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p || q) in nats for two log-probability vectors over the same vocabulary."""
    import torch

    p = logp.exp()
    return float(torch.sum(p * (logp - logq)).clamp(min=0.0))


def prefix_shift(
    model: Any, body_ids: torch.Tensor, prefixed_ids: torch.Tensor, k: int = 5
) -> dict:
    """How much a prefix moves the next-token distribution after the same body.

    Returns kl (KL(prefixed || plain), nats), top_changed (did the most likely token change?),
    top_overlap (shared tokens among the top k of both), and both top-k id lists.
    """
    plain = next_token_logprobs(model, body_ids)
    prefixed = next_token_logprobs(model, prefixed_ids)
    top_plain = plain.topk(k).indices.tolist()
    top_prefixed = prefixed.topk(k).indices.tolist()
    return {
        "kl": kl_divergence(prefixed, plain),
        "top_changed": top_plain[0] != top_prefixed[0],
        "top_overlap": len(set(top_plain) & set(top_prefixed)),
        "top_plain": top_plain,
        "top_prefixed": top_prefixed,
    }


def token_prob(logp: torch.Tensor, ids: Sequence[int]) -> float:
    """Total probability of a set of token ids under a log-probability vector."""
    return float(logp[list(ids)].exp().sum())


def token_class(tokenizer: Any, starts: Sequence[str] = (), exact: Sequence[str] = ()) -> list[int]:
    """Ids of the vocabulary tokens whose text (leading space removed) starts with one of
    ``starts`` or equals one of ``exact`` — e.g. every token that opens a string literal."""
    ids = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i]).lstrip(" ")
        if text and (text in exact or any(text.startswith(p) for p in starts)):
            ids.append(i)
    if not ids:
        raise ValueError(f"no token starts with {list(starts)} or equals {list(exact)}")
    return ids


# --- generation cost ---------------------------------------------------------------------------


def time_decode(
    model: Any, input_ids: torch.Tensor, n_tokens: int, sync: Callable[[], None] | None = None
) -> tuple[Any, torch.Tensor]:
    """Time one greedy generation of ``n_tokens`` with a preallocated KV cache: the prefill
    (time to first token) and every decode step (time per output token), through
    :func:`labkit.core.timing.time_generation`. Returns (GenerationTiming, generated ids [1, n])."""
    import torch

    from labkit.core.timing import time_generation
    from labkit.inference.kv_cache import KVCache

    cache = KVCache.for_model(model, max_len=input_ids.shape[1] + n_tokens)

    def prefill() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids, cache=cache)[:, -1].argmax(-1, keepdim=True)

    def step(token: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)

    timing, tokens = time_generation(prefill, step, n_tokens, sync=sync)
    return timing, torch.cat(tokens, dim=1)


# --- the seq2seq toy task ----------------------------------------------------------------------


@dataclass(frozen=True)
class Seq2SeqTask:
    """Map a sequence of ``n_symbols`` symbols to its reverse (or its sorted order).

    Token ids: 0 pad, 1 bos, 2 eos, 3 sep, then one length token per length 1..max_len (only
    the interleaved decoder uses them), then the symbols. Every training batch has one length,
    drawn uniformly from [min_len, max_len], so no batch needs padding.
    """

    kind: str = "reverse"
    n_symbols: int = 10
    min_len: int = 2
    max_len: int = 12

    PAD = 0
    BOS = 1
    EOS = 2
    SEP = 3

    def __post_init__(self) -> None:
        if self.kind not in ("reverse", "sort"):
            raise ValueError(f"kind must be 'reverse' or 'sort', got {self.kind!r}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(
                f"need 1 <= min_len <= max_len, got min_len={self.min_len}, max_len={self.max_len}"
            )
        if self.n_symbols < 2:
            raise ValueError(f"n_symbols must be >= 2, got {self.n_symbols}")

    def length_token(self, length: int) -> int:
        return 4 + length - 1

    @property
    def first_symbol(self) -> int:
        return 4 + self.max_len

    @property
    def vocab_size(self) -> int:
        return self.first_symbol + self.n_symbols

    def target(self, src: torch.Tensor) -> torch.Tensor:
        return src.flip(1) if self.kind == "reverse" else src.sort(dim=1).values

    def batch(
        self, size: int, length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) LongTensors [size, length] of symbol ids."""
        import torch

        src = torch.randint(self.n_symbols, (size, length), generator=generator) + self.first_symbol
        return src, self.target(src)


# Three ways to lay the task out for a model. Each returns (inputs, labels) for training, with
# -100 where no loss is taken (transformers' ignore index).


def prefix_layout(task: Seq2SeqTask, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Decoder-only, whole input first: [bos, x1..xL, sep, y1..yL, eos]."""
    import torch

    b = src.shape[0]
    col = lambda v: torch.full((b, 1), v, dtype=torch.long)  # noqa: E731
    return torch.cat([col(task.BOS), src, col(task.SEP), tgt, col(task.EOS)], dim=1)


def interleaved_layout(task: Seq2SeqTask, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Decoder-only, answer while reading: [bos, len, x1, y1, x2, y2, ..., xL, yL, eos].

    The length token tells the model L, so y_i = x_(L+1-i) is computable exactly when that
    input has been read (L+1-i <= i); the rest must be guessed.
    """
    import torch

    b, length = src.shape
    pairs = torch.stack([src, tgt], dim=2).reshape(b, 2 * length)
    head = torch.tensor([task.BOS, task.length_token(length)]).expand(b, 2)
    return torch.cat([head, pairs, torch.full((b, 1), task.EOS, dtype=torch.long)], dim=1)


def output_positions(layout: str, length: int) -> list[int]:
    """Indices (in the laid-out sequence) of the output tokens y1..yL and the final eos."""
    if layout == "prefix":  # bos, x*L, sep, y*L, eos
        return list(range(length + 2, 2 * length + 3))
    if layout == "interleaved":  # bos, len, (x, y)*L, eos
        return [3 + 2 * i for i in range(length)] + [2 * length + 2]
    raise ValueError(f"layout must be 'prefix' or 'interleaved', got {layout!r}")


def interleaved_ceiling(length: int, n_symbols: int) -> float:
    """Best expected token accuracy when answering while reading, for the *reverse* task:
    y_i = x_(L+1-i) can be right when that input was already read (L+1-i <= i); the others
    are right by chance, 1 / n_symbols. (Sorting has a different ceiling.)"""
    visible = sum(1 for i in range(1, length + 1) if length + 1 - i <= i)
    return (visible + (length - visible) / n_symbols) / length


@dataclass(frozen=True)
class ModelSize:
    """Width and depth of the toy models (same width, heads and FFN for all three)."""

    d_model: int = 64
    heads: int = 4
    ffn: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 2
    decoder_only_layers: int = 5


def _bart_config(task: Seq2SeqTask, size: ModelSize, **layout: Any) -> Any:
    """A BartConfig for the task's vocabulary with no dropout; ``layout`` sets the stacks."""
    import transformers

    return transformers.BartConfig(
        vocab_size=task.vocab_size,
        d_model=size.d_model,
        max_position_embeddings=2 * task.max_len + 8,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=task.PAD,
        bos_token_id=task.BOS,
        eos_token_id=task.EOS,
        scale_embedding=False,
        **layout,
    )


def build_encoder_decoder(task: Seq2SeqTask, size: ModelSize, seed: int) -> Any:
    """A randomly initialized BART encoder-decoder for the task's vocabulary."""
    import torch
    import transformers

    cfg = _bart_config(
        task,
        size,
        encoder_layers=size.encoder_layers,
        decoder_layers=size.decoder_layers,
        encoder_attention_heads=size.heads,
        decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.ffn,
        decoder_ffn_dim=size.ffn,
        decoder_start_token_id=task.BOS,
        forced_eos_token_id=None,
    )
    torch.manual_seed(seed)
    return transformers.BartForConditionalGeneration(cfg)


def build_decoder_only(task: Seq2SeqTask, size: ModelSize, seed: int) -> Any:
    """A randomly initialized BART decoder stack used alone (BartForCausalLM): the same layer
    type as the encoder-decoder's decoder, so the comparison changes one thing — the split."""
    import torch
    import transformers

    cfg = _bart_config(
        task,
        size,
        decoder_layers=size.decoder_only_layers,
        decoder_attention_heads=size.heads,
        decoder_ffn_dim=size.ffn,
        is_decoder=True,
        is_encoder_decoder=False,
        add_cross_attention=False,
    )
    torch.manual_seed(seed)
    return transformers.BartForCausalLM(cfg)


def used_parameters(model: Any) -> int:
    """Parameters the forward pass uses. BartForCausalLM keeps each layer's (unused)
    cross-attention weights; those are not counted, so sizes are compared fairly."""
    return sum(p.numel() for n, p in model.named_parameters() if ".encoder_attn" not in n
               or getattr(model.config, "is_encoder_decoder", False))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the toy models on one CPU thread, then restore the setting. Their matrices are
    64 wide: a team of threads costs more in synchronization than it saves, and on a shared
    machine extra threads that wait on busy cores slow every step down several times."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _loss_encdec(model: Any, task: Seq2SeqTask, src: torch.Tensor, tgt: torch.Tensor):
    import torch

    b = src.shape[0]
    enc_in = torch.cat([src, torch.full((b, 1), task.EOS, dtype=torch.long)], dim=1)
    labels = torch.cat([tgt, torch.full((b, 1), task.EOS, dtype=torch.long)], dim=1)
    dec_in = torch.cat([torch.full((b, 1), task.BOS, dtype=torch.long), tgt], dim=1)
    logits = model(input_ids=enc_in, decoder_input_ids=dec_in).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _loss_decoder(
    model: Any, task: Seq2SeqTask, layout: str, src: torch.Tensor, tgt: torch.Tensor
):
    import torch

    seq = (prefix_layout if layout == "prefix" else interleaved_layout)(task, src, tgt)
    logits = model(input_ids=seq[:, :-1]).logits
    pos = torch.tensor(output_positions(layout, src.shape[1]))
    # logits at position p - 1 predict token p
    return torch.nn.functional.cross_entropy(
        logits[:, pos - 1].flatten(0, 1), seq[:, pos].flatten()
    )


ARCHS = ("encoder-decoder", "decoder (whole input first)", "decoder (answers while reading)")


def build(arch: str, task: Seq2SeqTask, size: ModelSize, seed: int) -> Any:
    """The model of one of ``ARCHS``."""
    if arch == ARCHS[0]:
        return build_encoder_decoder(task, size, seed)
    if arch in ARCHS[1:]:
        return build_decoder_only(task, size, seed)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def train_seq2seq(
    arch: str,
    task: Seq2SeqTask,
    size: ModelSize,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 50,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[Any, list[float]]:
    """Train one model of ``ARCHS`` from random init with AdamW (linear warm-up, cosine decay to
    10 %). In our sweeps (d_model 64, batch 64) lr 1e-3 learned reversal up to length 8 in 1200
    steps for both whole-input models; at 2e-3 the encoder-decoder stalled, at 3e-3 both did.
    Returns the model (eval mode) and the loss of every step. Deterministic for a seed."""
    import torch

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model = build(arch, task, size, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with one_thread():
        _train_loop(arch, task, model, opt, sched, gen, steps, batch_size, losses, progress)
    model.eval()
    return model, losses


def _train_loop(
    arch: str, task: Seq2SeqTask, model: Any, opt: Any, sched: Any, gen: torch.Generator,
    steps: int, batch_size: int, losses: list[float], progress: Callable | None,
) -> None:
    """``steps`` AdamW steps; each batch has one random length, so nothing is padded."""
    import torch

    for step in range(steps):
        length = int(torch.randint(task.min_len, task.max_len + 1, (1,), generator=gen))
        src, tgt = task.batch(batch_size, length, gen)
        if arch == ARCHS[0]:
            loss = _loss_encdec(model, task, src, tgt)
        else:
            layout = "prefix" if arch == ARCHS[1] else "interleaved"
            loss = _loss_decoder(model, task, layout, src, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])


def predict(arch: str, model: Any, task: Seq2SeqTask, src: torch.Tensor) -> torch.Tensor:
    """Greedy outputs [B, L] for sources [B, L]: every output token is the model's own choice,
    fed back for the next step (no teacher forcing)."""
    import torch

    b, length = src.shape
    eos = torch.full((b, 1), task.EOS, dtype=torch.long)
    with torch.inference_mode():
        if arch == ARCHS[0]:
            enc = model.get_encoder()(input_ids=torch.cat([src, eos], dim=1)).last_hidden_state
            dec = torch.full((b, 1), task.BOS, dtype=torch.long)
            for _ in range(length):
                logits = model(encoder_outputs=(enc,), decoder_input_ids=dec).logits[:, -1]
                dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
            return dec[:, 1:]
        if arch == ARCHS[1]:
            seq = prefix_layout(task, src, src)[:, : length + 2]  # bos, x, sep
            for _ in range(length):
                nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
            return seq[:, length + 2 :]
        if arch == ARCHS[2]:
            head = torch.tensor([task.BOS, task.length_token(length)]).expand(b, 2)
            seq, outs = head.clone(), []
            for i in range(length):
                seq = torch.cat([seq, src[:, i : i + 1]], dim=1)  # read x_i
                nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
                outs.append(nxt)
                seq = torch.cat([seq, nxt], dim=1)  # answer y_i, then read on
            return torch.cat(outs, dim=1)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def evaluate(
    arch: str, model: Any, task: Seq2SeqTask, lengths: Sequence[int], n: int, seed: int = 1234
) -> list[dict]:
    """Per length: sequence accuracy (all L outputs right) and token accuracy, on ``n`` fresh
    random sources (a different seed from training)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in lengths:
        src, tgt = task.batch(n, length, gen)
        with one_thread():
            pred = predict(arch, model, task, src)
        right = pred == tgt
        rows.append({
            "arch": arch,
            "length": int(length),
            "seq_acc": float(right.all(dim=1).float().mean()),
            "token_acc": float(right.float().mean()),
            "n": int(n),
        })
    return rows
