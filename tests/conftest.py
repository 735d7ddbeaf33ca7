"""Shared fixtures. Model fixtures build tiny random checkpoints with transformers into tmp_path:
no test reads weights from the network or from data/models unless it says so."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json (+ tokenizer_config.json) whose ids fit ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )


def build_hf_checkpoint(
    folder: Path, arch: str = "llama", *, seed: int = 0, tokenizer: bool = True, **overrides: Any
) -> Path:
    """Save a tiny random transformers model (``arch`` "llama", "mistral" or "phi") as safetensors."""
    import torch
    import transformers

    base: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    base.update(overrides)
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**base))
    elif arch == "phi":
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**base))
    else:
        raise ValueError(f"build_hf_checkpoint: unknown arch {arch!r}")
    # Random init leaves norm weights at one and biases at zero; perturb them so a bug that
    # ignores a norm weight or a bias cannot pass the parity tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        _write_tokenizer(folder, base["vocab_size"])
    return folder


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``hf_checkpoint("llama", num_key_value_heads=1)`` -> a folder in tmp_path."""
    counter = iter(range(1000))

    def make(arch: str = "llama", **kwargs: Any) -> Path:
        return build_hf_checkpoint(tmp_path / f"{arch}-{next(counter)}", arch, **kwargs)

    return make


#: The shape most unit tests use: small enough to run in milliseconds, with grouped-query
#: attention (4 query heads share 2 KV heads) so GQA paths are exercised.
TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def random_llama(seed: int = 0, *, logit_scale: float = 1.0, **overrides: Any):
    """labkit's Llama with random weights (eval mode, fp32, CPU) of ``TINY_SHAPE`` + overrides.

    ``logit_scale`` > 1 multiplies the output matrix so greedy choices are decisive, not near-ties
    decided by float rounding (tests that compare greedy tokens across code paths use it).
    """
    import torch

    from labkit.models.config import LlamaConfig
    from labkit.models.llama import Llama

    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**TINY_SHAPE, **overrides})).eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            model.output_weight.mul_(logit_scale)
    return model


def decisive_llama(seed: int = 0, *, tied: bool = False, kv_heads: int = 2, vocab: int = 96):
    """A tiny random GQA Llama whose greedy choices are decisive: norms moved away from one (a
    dropped norm shows) and the final norm scaled up (peaked logits, no near-ties)."""
    import torch

    model = random_llama(seed, vocab_size=vocab, num_key_value_heads=kv_heads,
                         tie_word_embeddings=tied)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif tied and "layers" in name:  # else the tied embedding just repeats its input
                p.mul_(5.0)
        model.model.norm.weight.mul_(20.0)
    return model


def token_prompt(t: int = 5, b: int = 1, vocab: int = 96):
    """Random token ids [b, t] from a fixed generator."""
    import torch

    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(11))


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast, and immune to a busy shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

@pytest.fixture
def well_drawn() -> Callable[[Any], None]:
    """Check a study's figure against the house rule save_figure enforces (a title, labelled
    axes: labkit.core.plotting.check_figure), then close it."""

    def check(fig: Any) -> None:
        import matplotlib.pyplot as plt

        from labkit.core import plotting

        try:
            plotting.check_figure(fig)
        finally:
            plt.close(fig)

    return check


def tiny_llama_slice(layers: int = 2, vocab_size: int = 512, seed: int = 0) -> Any:
    """A random labkit Llama of tiny-llama's shapes (hidden 512, 8/2 heads, MLP 1408) with fewer
    layers and a smaller vocabulary, its weights rounded to fp16 (the shipped checkpoint is fp16)
    and its norm weights random (all-ones norms would be folded away by coremltools).

    Core ML conversion of the full 8-layer model takes ~40-50 s per ladder step on the shared
    2-core box; this slice a few seconds, with the same per-layer shapes.
    """
    import torch

    from labkit.core.paths import models_dir
    from labkit.models.config import LlamaConfig
    from labkit.models.llama import Llama

    d = json.loads((models_dir() / "tiny-llama" / "config.json").read_text())
    d.update(num_hidden_layers=layers, vocab_size=vocab_size, max_position_embeddings=64)
    torch.manual_seed(seed)
    m = Llama(LlamaConfig.from_dict(d, "tiny-llama slice")).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            p.copy_(p.half().float())
    return m


@pytest.fixture(scope="module")
def tiny_quant() -> tuple[Any, Any, Any, Any]:
    """(model, QuantCache, windows, fp32 Reference): a tiny random Llama (2 layers, hidden 64,
    vocab 64) and two random 33-token windows. Random weights are fine for plumbing, not for
    conclusions about quantization quality."""
    import torch

    from labkit.models.config import LlamaConfig
    from labkit.models.llama import Llama
    from labkit.quant import evaluate as ev

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Llama(cfg).eval()
    windows = torch.randint(0, 64, (2, 33))
    return model, ev.QuantCache(model), windows, ev.reference(model, windows)


@pytest.fixture(scope="module")
def tiny_quant_fp16(tiny_quant) -> tuple[Any, Any, Any, Any]:
    """``tiny_quant`` with every weight rounded to an fp16 value (a copy): the fp16 scheme then
    reconstructs every quantized weight exactly, as on a checkpoint shipped in fp16."""
    import copy

    import torch

    from labkit.quant import evaluate as ev

    model, _, windows, _ = tiny_quant
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model, ev.QuantCache(model), windows, ev.reference(model, windows)
