"""Sentence embeddings from the MiniLM encoder (all-MiniLM-L6-v2), as sentence-transformers
computes them: BERT's last hidden states, mean-pooled over the real (non-padding) tokens, then
L2-normalized. The pooling must use the attention mask — averaging the padding too would make an
embedding depend on how long the other sentences in the batch are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from labkit.models.loader import LoadedModel

_DEFAULT: LoadedModel | None = None


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors [B, T, D] where the mask [B, T] is 1 -> [B, D]."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def embed(
    texts: list[str] | str,
    loaded: LoadedModel | None = None,
    *,
    normalize: bool = True,
    batch_size: int = 32,
    max_length: int = 256,
) -> torch.Tensor:
    """Embeddings [N, 384] of ``texts`` (unit length if ``normalize``), float32 on the CPU.

    ``loaded`` defaults to ``load("minilm", device="cpu")`` (cached after the first call; a
    caller who wants MPS or CUDA passes its own ``load(..., device=...)``). ``max_length`` 256
    is the sequence length all-MiniLM-L6-v2 was trained with; longer texts are truncated.
    Texts are batched longest first (as sentence-transformers does), so each batch pads to
    similar lengths; rows come back in the order given.
    """
    import torch
    import torch.nn.functional as F

    global _DEFAULT
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty list of strings")
    if loaded is None:
        if _DEFAULT is None:
            from labkit.models.loader import load

            _DEFAULT = load("minilm", device="cpu")
        loaded = _DEFAULT
    model, tok = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tok(
                [texts[j] for j in order[i : i + batch_size]],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**batch).last_hidden_state
            pooled = mean_pool(hidden, batch["attention_mask"]).float()
            chunks.append(F.normalize(pooled, dim=-1) if normalize else pooled)
    out = torch.empty_like(torch.cat(chunks))
    out[torch.tensor(order)] = torch.cat(chunks)
    return out.cpu()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of matching rows (or of two vectors)."""
    import torch.nn.functional as F

    return F.cosine_similarity(a, b, dim=-1)
