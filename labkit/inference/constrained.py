"""Grammar-constrained decoding: only tokens that keep the output valid under a JSON schema.

At each step a matcher (llguidance's ``LLMatcher``) says which tokens of the vocabulary can
extend the text so far to something the grammar accepts; every other logit is set to -inf before
the token is picked, and the picked token is fed back to the matcher. Once the grammar is
complete the matcher allows only the end-of-sequence token, so the answer stops there.

Why llguidance (``pip install llguidance``): a Rust library with prebuilt wheels and no Python
dependencies, that builds its token masks lazily (no index over the whole vocabulary up front,
so a new schema per request costs milliseconds), runs on the CPU next to any model, and is the
engine llama.cpp itself uses for JSON schemas when it is built with it (xllamacpp's wheel is:
its ``json_schema_to_grammar`` returns an ``%llguidance`` grammar), so the torch path and the
llama.cpp path of a study enforce the same grammar. The alternatives on PyPI: xgrammar pulls in
triton (a GPU compiler, gigabytes) on Linux; outlines-core compiles a schema into a regex index
over the vocabulary before the first token; lm-format-enforcer walks the schema in Python at
every step.

The loop is :func:`labkit.inference.generate.stream`'s (prefill once into a KV cache, then one
token per step) with a picker that masks before its argmax: :func:`stream_constrained`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from labkit.inference.generate import stream

#: JSON written the way ``json.dumps`` writes it: ", " between items, ": " after keys, no other
#: whitespace. A small model left free to add whitespace can emit newlines until max_new_tokens.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_TOKENIZERS: dict[tuple[int, tuple[int, ...]], Any] = {}


def ll_tokenizer(tokenizer: Any, eos_ids: list[int]) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer, stopping at ``eos_ids[0]`` (built
    once per tokenizer: it reads the whole vocabulary, about a second)."""
    import llguidance.hf

    key = (id(tokenizer), tuple(eos_ids))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos_ids[0])
    return _TOKENIZERS[key]


class JsonSchemaConstraint:
    """A matcher for one JSON schema: :meth:`allowed` before each token, :meth:`advance` after.

    ``options`` are llguidance's JSON compile options (default :data:`COMPACT_JSON`).
    """

    def __init__(self, ll_tok: Any, schema: dict[str, Any],
                 options: dict[str, Any] | None = None) -> None:
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides=COMPACT_JSON if options is None else options)
        self.matcher = llguidance.LLMatcher(ll_tok, grammar)
        if self.matcher.is_error():
            raise ValueError(f"llguidance rejects the schema: {self.matcher.get_error()}")

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """Boolean mask ``[vocab_size]`` of the tokens the grammar allows next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.zeros(vocab_size, dtype=bool)  # tokens past the tokenizer's own: never allowed
        known = np.unpackbits(bits, bitorder="little")[:vocab_size].astype(bool)
        mask[: known.size] = known
        return torch.from_numpy(mask)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise RuntimeError(f"token {token} refused by the grammar: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The grammar accepts the text so far (the answer may stop here)."""
        return self.matcher.is_accepting()


def masked_greedy(constraint: JsonSchemaConstraint):
    """A picker for a batch of one: argmax over the tokens the constraint allows, then advance."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != 1:
            raise ValueError(f"constrained decoding takes one sequence, got a batch of {logits.shape[0]}")
        mask = constraint.allowed(logits.shape[-1]).to(logits.device)
        token = logits.masked_fill(~mask, float("-inf")).argmax(dim=-1)
        constraint.advance(int(token[0]))
        return token

    return pick


def stream_constrained(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                       constraint: JsonSchemaConstraint | None, *,
                       eos_token_id: int | list[int] | None = None) -> Iterator[torch.Tensor]:
    """Yield each new token ``[1]`` as it is chosen: greedy, masked by ``constraint`` (None:
    plain greedy through the same loop, so a free and a constrained run differ only in the
    mask)."""
    pick = masked_greedy(constraint) if constraint is not None else (lambda x: x.argmax(dim=-1))
    return stream(model, input_ids, max_new_tokens, cache=True, eos_token_id=eos_token_id,
                  pick=pick)
