"""Chat with an instruction-tuned model: its own chat template, streamed, stopped at its end token.

The model only ever sees one token sequence: the chat template (ChatML for SmolLM2:
``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``) turns the turns into it, and
``<|im_end|>`` is where the model says its turn is over. ``labkit chat`` and the notebooks call
:func:`chat` so an answer, its time to first token and its decode speed are measured one way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from labkit.core.checks import positive_int
from labkit.inference.generate import check_token_ids, stream


@dataclass
class ChatAnswer:
    """One answer: its text, its token ids, and how long it took."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    ttft_s: float  # prompt in, first answer token chosen
    decode_s: float  # every later step (the end-of-turn token's included)
    steps: int  # tokens generated, the end-of-turn token included
    stopped: bool  # ended at the end-of-turn token (not at max_new_tokens)
    pieces: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.steps - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def chat_ids(tokenizer: Any, question: str, system: str | None = None) -> torch.Tensor:
    """Token ids ``[1, T]`` of a one-question conversation, through the model's chat template,
    ending with the assistant's turn opened (``add_generation_prompt``)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string or None, got {type(system).__name__}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template: not a chat model "
                         "(try smollm2-135m, or give the prompt to generate directly)")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def end_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids generation stops at: the config's eos (a chat model's end of turn) and the
    tokenizer's."""
    ids = getattr(model.config, "eos_token_id", None)
    found = set(ids if isinstance(ids, list) else [ids]) | {tokenizer.eos_token_id}
    return sorted(i for i in found if isinstance(i, int))


def stream_answer(model: Any, tokenizer: Any, question: str, *, max_new_tokens: int = 128,
                  system: str | None = None) -> Iterator[str]:
    """Yield the answer's text piece by piece as it is generated; the last value returned (in
    ``StopIteration.value``) is the ``ChatAnswer``. A generated id the tokenizer cannot decode
    (a model whose vocabulary is larger than its tokenizer's) raises instead of showing as ""."""
    positive_int(max_new_tokens, "max_new_tokens", "chat")
    device = next(model.parameters()).device
    ids = chat_ids(tokenizer, question, system).to(device)
    eos = end_token_ids(model, tokenizer)
    known = len(tokenizer)
    tokens: list[int] = []
    shown = ""
    pieces: list[str] = []
    start = time.perf_counter()
    first = None
    steps = 0
    for token in stream(model, ids, max_new_tokens, eos_token_id=eos):
        tok = int(token[0])
        first = first or time.perf_counter()
        steps += 1
        if tok in eos:
            break
        check_token_ids([tok], known, "generated token (for the tokenizer)")
        tokens.append(tok)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):  # whole characters only
            pieces.append(text[len(shown):])
            shown = text
            yield pieces[-1]
    end = time.perf_counter()
    first = first or end
    return ChatAnswer(text=tokenizer.decode(tokens, skip_special_tokens=True), tokens=tokens,
                      prompt_tokens=int(ids.shape[1]), ttft_s=first - start, decode_s=end - first,
                      steps=steps, stopped=len(tokens) < steps, pieces=pieces)


def chat(model: Any, tokenizer: Any, question: str, *, max_new_tokens: int = 128,
         system: str | None = None, on_piece: Callable[[str], None] | None = None) -> ChatAnswer:
    """The whole answer (``on_piece`` sees each piece as it is generated)."""
    gen = stream_answer(model, tokenizer, question, max_new_tokens=max_new_tokens, system=system)
    while True:
        try:
            piece = next(gen)
        except StopIteration as done:
            return done.value
        if on_piece is not None:
            on_piece(piece)
