"""Shared fixtures and builders. Model fixtures build tiny random checkpoints with transformers into
tmp_path: no test reads weights from the network or from data/models unless it says so.

Builders: ``TINY_SHAPE`` (the shape most tests use), ``tiny_config`` / ``random_model`` /
``random_llama`` / ``decisive_llama`` (labkit models of it, a test passing only what differs),
``build_hf_checkpoint`` / ``hf_checkpoint`` (transformers-written folders), ``load_pair`` (ours and
transformers' model of one folder), ``reload_in_transformers`` (the other direction),
``max_abs_diff`` and ``token_prompt``. Bounds come from labkit.core.tolerances, never from here."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# No GUI backend for the figures tests draw: on macOS matplotlib would pick "macosx" (a Dock icon
# during make test, a failure in headless sessions); labkit reproduce sets Agg for notebooks too.
os.environ.setdefault("MPLBACKEND", "Agg")


def _openmp_guard() -> None:
    """torch, faiss-cpu and scikit-learn each bring a libomp on macOS: the second to start aborts
    the whole pytest process unless KMP_DUPLICATE_LIB_OK is set (labkit.core.env.openmp_guard)."""
    from labkit.core import env

    env.openmp_guard()


_openmp_guard()


def needs_macos(version: tuple[int, int] = (14, 0), what: str = "") -> pytest.MarkDecorator:
    """Skip unless this is macOS ``version`` or later on Apple silicon; the reason starts with
    "needs macOS N" and says what to install, so a Linux run lists the Mac suite it skipped."""
    from labkit.core import env

    here = env.macos_version()
    ok = here is not None and tuple(here) >= version and platform.machine() == "arm64"
    label = f"{version[0]}" + (f".{version[1]}" if version[1] else "")
    found = (f"macOS {'.'.join(map(str, here))} on {platform.machine()}" if here
             else platform.system())
    return pytest.mark.skipif(not ok, reason=f"needs macOS {label} on Apple silicon"
                              + (f" ({what})" if what else "") + f"; this is {found}")


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


#: The shape most unit tests use: small enough to run in milliseconds, with grouped-query
#: attention (4 query heads share 2 KV heads) so GQA paths are exercised.
TINY_SHAPE: dict[str, Any] = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


#: build_hf_checkpoint's vocabulary (a test drawing token ids for its folders uses it)
HF_VOCAB = 128


def build_hf_checkpoint(
    folder: Path, arch: str = "llama", *, seed: int = 0, tokenizer: bool = True, **overrides: Any
) -> Path:
    """Save a tiny random transformers model (``arch`` "llama", "mistral" or "phi") as safetensors."""
    import torch
    import transformers

    base: dict[str, Any] = {**TINY_SHAPE, "vocab_size": HF_VOCAB, **overrides}
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


def load_pair(folder: Path) -> tuple[Any, Any]:
    """(ours, reference) from one transformers-written folder: labkit's Llama or Phi (by the
    config's model_type) with the folder's weights loaded strictly, and transformers' model of
    the folder; both fp32 in eval mode."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from labkit.models.config import LlamaConfig, PhiConfig
    from labkit.models.llama import Llama
    from labkit.models.phi import Phi

    d = json.loads((folder / "config.json").read_text())
    config_class, ours_class, ref_class = {
        "llama": (LlamaConfig, Llama, transformers.LlamaForCausalLM),
        "phi": (PhiConfig, Phi, transformers.PhiForCausalLM),
    }[d["model_type"]]
    ours = ours_class(config_class.from_dict(d, source="cfg")).eval()
    ours.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    ref = ref_class.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32
    ).eval()  # transformers 5 would keep an fp16 checkpoint in fp16
    return ours, ref


def reload_in_transformers(model: Any, folder: Path) -> Any:
    """The other direction: our ``config.to_hf_dict()`` and our state dict, written to ``folder``,
    read back by transformers' AutoModelForCausalLM (eval mode)."""
    import transformers
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    save_file(model.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| over two tensors of one shape (the number every parity bound is checked on)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """labkit's LlamaConfig (or PhiConfig, ``arch="phi"``) of ``TINY_SHAPE`` + overrides."""
    from labkit.models.config import LlamaConfig, PhiConfig

    config_class = {"llama": LlamaConfig, "phi": PhiConfig}[arch]
    return config_class(**{**TINY_SHAPE, **overrides})


def random_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """labkit's Llama (or Phi) of ``tiny_config(arch, **overrides)``, random weights drawn after
    ``torch.manual_seed(seed)``, in eval mode (fp32, CPU)."""
    import torch

    from labkit.models.llama import Llama
    from labkit.models.phi import Phi

    torch.manual_seed(seed)
    return {"llama": Llama, "phi": Phi}[arch](tiny_config(arch, **overrides)).eval()


def random_llama(seed: int = 0, *, logit_scale: float = 1.0, **overrides: Any):
    """labkit's Llama with random weights (eval mode, fp32, CPU) of ``TINY_SHAPE`` + overrides.

    ``logit_scale`` > 1 multiplies the output matrix so greedy choices are decisive, not near-ties
    decided by float rounding (tests that compare greedy tokens across code paths use it).
    """
    import torch

    model = random_model("llama", seed, **overrides)
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

    from labkit.quant import evaluate as ev

    model = random_llama(0, vocab_size=64, max_position_embeddings=64)
    windows = torch.randint(0, 64, (2, 33))
    return model, ev.QuantCache(model), windows, ev.reference(model, windows)


def random_llama_with_shipped_tokenizer(out: Path, seed: int = 0, **shape: Any) -> Path:
    """A random tied GQA Llama folder (2 layers, hidden 64, vocab 8192 unless ``shape`` says
    otherwise) with tiny-llama's tokenizer: real byte-level BPE ids for a tiny model."""
    import shutil

    from labkit.core.paths import models_dir
    from labkit.ports.swift import random_llama

    base: dict[str, Any] = dict(vocab_size=8192, hidden_size=64, intermediate_size=128, layers=2,
                                heads=4, kv_heads=2, max_positions=256, tie=True)
    random_llama(out, "float32", seed, **{**base, **shape})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models_dir() / "tiny-llama" / name, out / name)
    return out


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
