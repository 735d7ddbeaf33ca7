"""Byte-level BPE for Python source, trained with Hugging Face ``tokenizers``.

Plain GPT-2 style on purpose: a ByteLevel pre-tokenizer (``add_prefix_space=False``,
``use_regex=True``), BPE merges, a ByteLevel decoder and no normalizer. Every byte string
round-trips exactly, there is never an unknown token, and llama.cpp can read it as a ``gpt-2``
tokenizer when the GGUF exporter tags it so.

Special tokens (ids fixed, first in the vocabulary):

- ``<|bos|>`` = 0: starts every document; the post-processor prepends it when
  ``add_special_tokens=True`` (the default of ``tokenizer(text)``), as Llama tokenizers do.
- ``<|eos|>`` = 1: ends every document; generation stops on it.
- ``<|pad|>`` = 2: padding for batches; never trained on.

No ``<unk>``: a byte-level vocabulary covers all 256 bytes, so nothing is ever unknown.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from labkit.core import files

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
DEFAULT_VOCAB_SIZE = 8192


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with the lab's pre-tokenizer, decoder and BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2
) -> Tokenizer:
    """Learn BPE merges on ``texts`` (the TRAIN split only, so held-out stays unseen)."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for token, expected in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID), strict=True):
        got = tok.token_to_id(token)
        if got != expected:
            raise RuntimeError(f"special token {token} got id {got}, expected {expected}")
    return tok


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text as ``<|bos|> tokens <|eos|>``: the training and evaluation format."""
    encodings = tok.encode_batch(list(texts), add_special_tokens=False)
    return [[BOS_ID, *e.ids, EOS_ID] for e in encodings]


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json that transformers' AutoTokenizer reads (PreTrainedTokenizerFast)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "special_tokens_doc": {
            BOS: f"id {BOS_ID}: starts every document; prepended by the post-processor",
            EOS: f"id {EOS_ID}: ends every document; generation stops here",
            PAD: f"id {PAD_ID}: padding only, never trained on",
        },
    }


def save(tok: Tokenizer, folder: Path, model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json into ``folder`` (each atomically)."""
    folder.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(folder / "tokenizer.json", tok.to_str(pretty=True))
    files.atomic_write_text(
        folder / "tokenizer_config.json",
        json.dumps(tokenizer_config(model_max_length), indent=2) + "\n",
    )


def load(folder_or_file: Path) -> Tokenizer:
    """The ``tokenizers`` object from a folder holding tokenizer.json, or the file itself."""
    from tokenizers import Tokenizer

    path = Path(folder_or_file)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer.json not found (expected a trained tokenizer)")
    return Tokenizer.from_file(str(path))
