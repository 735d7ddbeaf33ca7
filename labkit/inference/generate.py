"""Autoregressive generation: prefill the prompt once, then decode one token per step.

``greedy``, ``sample`` and ``stream`` share one loop (``_decode``). With ``cache=True`` (the
default) the loop allocates a ``KVCache`` for prompt + new tokens up front, runs the prompt through
the model once (prefill) and then feeds one token per step (decode), so each step costs one
token's work. With ``cache=False`` every step reruns the model on the whole sequence so far — the
quadratic baseline a KV-cache study compares against.

The per-token Python overhead is kept small on purpose (a later study compares tokens/s with
``transformers.generate``): the loop runs under ``torch.inference_mode``, writes tokens into one
preallocated output buffer, and allocates nothing per step beyond what the model itself does.

Models: anything called as ``model(input_ids, cache=...)`` returning logits ``[B, T, V]``
(labkit's Llama and Phi). With ``cache=False`` a transformers model (output with ``.logits``)
works too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from labkit.core.checks import is_int, nonnegative_int
from labkit.inference.kv_cache import KVCache
from labkit.models.layers import Cache


@dataclass
class Generation:
    """What ``greedy`` and ``sample`` return.

    tokens: ``[B, T_prompt + n]`` prompt followed by the ``n`` generated tokens (``n`` is less
        than ``max_new_tokens`` when every row hit an end-of-sequence token; rows that finished
        early are padded with the first EOS id).
    logits: ``[B, n, V]`` the logits each new token was chosen from, if requested, else None.
    prompt_length: ``T_prompt``.
    """

    tokens: torch.Tensor
    logits: torch.Tensor | None
    prompt_length: int

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length :]


def _as_logits(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits  # type: ignore[attr-defined]


def _eos_ids(eos_token_id: int | list[int] | None, device: torch.device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if is_int(eos_token_id) else list(eos_token_id)
    return torch.tensor([int(i) for i in ids], device=device) if ids else None


def model_limits(model: Any) -> tuple[int | None, int | None]:
    """(vocabulary size, context length) from ``model.config`` (None where the model has none)."""
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    context = getattr(cfg, "max_position_embeddings", None)
    return (vocab if is_int(vocab) else None), (context if is_int(context) else None)


def check_token_ids(ids: Any, vocab: int | None, name: str = "input_ids") -> None:
    """``ids`` (a tensor or a list of ints) are integer token ids in ``0..vocab-1``.

    Why: torch casts float ids silently (3.7 becomes 3) and an id outside the embedding fails
    deep inside it ("index out of range in self") without the id or the vocabulary size;
    a tokenizer decodes an unknown id to "" without a word.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype "
                            f"{str(ids.dtype).removeprefix('torch.')}")
        if ids.numel() == 0 or vocab is None:
            return
        low, high = int(ids.min()), int(ids.max())
    else:
        values = list(ids)
        bad = [v for v in values if not is_int(v)]
        if bad:
            raise TypeError(f"{name} must be integer token ids, got {bad[0]!r} "
                            f"({type(bad[0]).__name__})")
        if not values or vocab is None:
            return
        low, high = min(values), max(values)
    for value in (low, high):
        if not 0 <= value < vocab:
            raise ValueError(f"{name} holds token id {value}, outside the vocabulary "
                             f"(ids 0..{vocab - 1}, vocab_size {vocab})")


def _check_eos(eos_token_id: Any, vocab: int | None) -> None:
    if eos_token_id is None:
        return
    ids = [eos_token_id] if not isinstance(eos_token_id, list | tuple) else list(eos_token_id)
    if not all(is_int(i) for i in ids):
        raise TypeError(f"eos_token_id must be an integer token id, a list of them or None, "
                        f"got {eos_token_id!r} (a token's text? use tokenizer.eos_token_id)")
    check_token_ids(ids, vocab, "eos_token_id")


def check_generation(model: Any, input_ids: Any, max_new_tokens: Any,
                     eos_token_id: Any = None) -> None:
    """Every argument of a generation call, before the first step: the prompt's shape, dtype and
    ids (within the vocabulary), max_new_tokens, the end-of-sequence ids, and prompt +
    max_new_tokens within the model's context (naming both numbers)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a LongTensor [batch, tokens>=1], got "
                        f"{type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a LongTensor [batch, tokens>=1], got shape "
                         f"{tuple(input_ids.shape)}")
    nonnegative_int(max_new_tokens, "max_new_tokens")
    vocab, context = model_limits(model)
    check_token_ids(input_ids, vocab)
    _check_eos(eos_token_id, vocab)
    prompt = input_ids.shape[1]
    if context is not None and prompt + max_new_tokens > context:
        raise ValueError(
            f"a prompt of {prompt} tokens + max_new_tokens {max_new_tokens} = "
            f"{prompt + max_new_tokens} positions exceeds the model's context "
            f"(max_position_embeddings {context})")


def _pick_greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _sampler(temperature: float, top_k: int | None, generator: torch.Generator):
    """A picker: logits [B, V] -> token ids [B], drawn from softmax(logits / T) over the top k."""
    real = isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
    if not real or not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0 (use greedy for 0), "
                         f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scaled = logits.float() / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return pick


def _decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    pick,
    *,
    cache: bool | Cache,
    eos_token_id: int | list[int] | None,
    out: torch.Tensor,
    logits_out: torch.Tensor | None,
) -> Iterator[torch.Tensor]:
    """The loop. Writes tokens into ``out`` [B, T+n] (prompt already copied in) and yields each
    step's new tokens [B]. Stops early once every row has produced an EOS token."""
    b, t = input_ids.shape
    eos = _eos_ids(eos_token_id, input_ids.device)
    finished = (
        torch.zeros(b, dtype=torch.bool, device=input_ids.device) if eos is not None else None
    )
    kv: Cache | None = None
    if cache is True:
        kv = KVCache.for_model(model, max_len=t + max_new_tokens, batch=b)
    elif cache is not False:
        kv = cache
        if hasattr(kv, "reset"):
            kv.reset()
    for step in range(max_new_tokens):
        pos = t + step
        if kv is None:
            logits = _as_logits(model(out[:, :pos]))[:, -1]
        elif step == 0:
            logits = model(out[:, :pos], cache=kv)[:, -1]  # prefill
        else:
            logits = model(out[:, pos - 1 : pos], cache=kv)[:, -1]  # decode one token
        token = pick(logits)
        if finished is not None:
            token = torch.where(finished, eos[0], token)
            finished |= torch.isin(token, eos)
        out[:, pos] = token
        if logits_out is not None:
            logits_out[:, step] = logits
        yield token
        if finished is not None and bool(finished.all()):
            return


def _run(model, input_ids, max_new_tokens, pick, cache, eos_token_id, return_logits) -> Generation:
    check_generation(model, input_ids, max_new_tokens, eos_token_id)
    b, t = input_ids.shape
    with torch.inference_mode():
        out = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=input_ids.device)
        out[:, :t] = input_ids
        logits_out = None
        if return_logits:
            vocab = getattr(getattr(model, "config", None), "vocab_size", None)
            if vocab is None:
                raise ValueError("return_logits needs model.config.vocab_size")
            logits_out = torch.empty(b, max_new_tokens, vocab, device=input_ids.device)
        n = 0
        for _ in _decode(
            model,
            input_ids,
            max_new_tokens,
            pick,
            cache=cache,
            eos_token_id=eos_token_id,
            out=out,
            logits_out=logits_out,
        ):
            n += 1
    return Generation(
        tokens=out[:, : t + n],
        logits=None if logits_out is None else logits_out[:, :n],
        prompt_length=t,
    )


def greedy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    cache: bool | Cache = True,
    eos_token_id: int | list[int] | None = None,
    return_logits: bool = False,
) -> Generation:
    """Append the most likely token ``max_new_tokens`` times (or until every row emits EOS).

    ``cache``: True allocates a KVCache for prompt + new tokens; False recomputes the whole
    sequence each step; a cache object is reset and reused (saves the allocation in benchmarks).
    """
    return _run(model, input_ids, max_new_tokens, _pick_greedy, cache, eos_token_id, return_logits)


def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    cache: bool | Cache = True,
    eos_token_id: int | list[int] | None = None,
    return_logits: bool = False,
) -> Generation:
    """Sample from softmax(logits / temperature), restricted to the ``top_k`` most likely tokens.

    Deterministic: the draws come from ``generator`` if given, else a torch.Generator seeded with
    ``seed`` on the input's device. Logits returned are the raw (unscaled) ones.
    """
    check_generation(model, input_ids, max_new_tokens, eos_token_id)
    gen = generator or torch.Generator(device=input_ids.device).manual_seed(
        nonnegative_int(seed, "seed"))
    pick = _sampler(temperature, top_k, gen)
    return _run(model, input_ids, max_new_tokens, pick, cache, eos_token_id, return_logits)


def stream(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    cache: bool | Cache = True,
    eos_token_id: int | list[int] | None = None,
    pick: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each new token (``[B]`` LongTensor) as soon as it is chosen (for TTFT/TPOT timing
    and for printing text as it appears). ``temperature=0`` is greedy.

    ``pick`` replaces the choice of the next token (last-position logits ``[B, V]`` -> ids
    ``[B]``; temperature and top_k are then unused): a grammar's mask over greedy
    (``labkit.inference.constrained``) decodes through this same loop.
    The arguments are checked here, when ``stream`` is called, not at the first ``next``.
    """
    check_generation(model, input_ids, max_new_tokens, eos_token_id)
    if pick is None and temperature == 0:
        pick = _pick_greedy
    elif pick is None:
        gen = torch.Generator(device=input_ids.device).manual_seed(nonnegative_int(seed, "seed"))
        pick = _sampler(temperature, top_k, gen)
    b, t = input_ids.shape
    with torch.inference_mode():
        out = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=input_ids.device)
        out[:, :t] = input_ids
        steps = _decode(
            model,
            input_ids,
            max_new_tokens,
            pick,
            cache=cache,
            eos_token_id=eos_token_id,
            out=out,
            logits_out=None,
        )
    return _outside_inference_mode(steps)


def _outside_inference_mode(steps: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Each step under inference_mode, never held across a yield: the caller's code between
    tokens must not silently run in inference mode."""
    while True:
        with torch.inference_mode():
            try:
                token = next(steps)
            except StopIteration:
                return
        yield token


def agreed_steps(new_tokens: torch.Tensor, reference: torch.Tensor, reference_logits: torch.Tensor,
                 tie: float) -> tuple[int, bool]:
    """How many generated steps two greedy runs of one model share, and whether they agree.

    They agree when every token is the same, or when they first differ at a near-tie: a step
    where the reference's top-2 logits are less than ``tie`` apart, so another summation order
    (a GPU's kernels) may pick either and both are right; after that step the two sequences
    continue from different prefixes and are no longer comparable. ``tie`` 0 (a CPU's fixed
    order, ``tolerances.NEAR_TIE``) asks for identical tokens. Shapes: ``[B, n]`` tokens and
    ``[B, n, V]`` the logits the reference chose from; returns (steps before the first
    difference in any row, agreed)."""
    if new_tokens.shape != reference.shape or reference_logits.shape[:2] != reference.shape:
        raise ValueError(f"shapes differ: tokens {tuple(new_tokens.shape)}, reference "
                         f"{tuple(reference.shape)}, its logits {tuple(reference_logits.shape)}")
    same = (new_tokens.to(reference.device) == reference).all(dim=0)
    if bool(same.all()):
        return int(same.numel()), True
    step = int((~same).nonzero()[0, 0])
    top2 = reference_logits[:, step].float().topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    return step, margin < tie
