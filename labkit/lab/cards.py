"""The model card of an embedded checkpoint, written from what the lab measures on it.

``python -m labkit.lab.cards`` (``--manifest`` first when the wheel's version changed) writes
``data/models/<name>/MODEL_CARD.md`` from the template beside this module: origin and licence,
the Q4_1 caveat, the architecture, held-out perplexity against a unigram baseline, greedy chat
answers. Every number in it is computed here, so the card cannot drift from the weights.
"""

from __future__ import annotations

import argparse
import math
from importlib import resources
from string import Template
from typing import Any

import numpy as np

from labkit.models.embedded import SMOLLM2, EmbeddedGGUF

TEMPLATE = "EMBEDDED_CARD.md.tmpl"
QUESTIONS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "What is 12 times 12?",
    "Name the three primary colours.",
    "Translate 'good morning' into French.",
)
MAX_NEW_TOKENS = 64


def perplexities(model: Any, windows: Any) -> dict[str, float]:
    """Model and unigram perplexity on the second half of ``windows``; the unigram is fitted on
    the first half (add-one smoothing over the vocabulary)."""
    from labkit.quant.evaluate import reference

    half = len(windows) // 2
    fit, scored = windows[:half], windows[half:]
    vocab = model.config.vocab_size
    counts = np.bincount(fit[:, 1:].reshape(-1).numpy(), minlength=vocab).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab))
    targets = scored[:, 1:].reshape(-1).numpy()
    unigram_nll = float(-logp[targets].mean())
    nll = reference(model, scored).nll
    return {"nll": nll, "ppl": math.exp(nll), "unigram_nll": unigram_nll,
            "unigram_ppl": math.exp(unigram_nll), "fit_windows": half,
            "eval_windows": len(scored), "targets": int(targets.size)}


def answers(model: Any, tokenizer: Any) -> str:
    """The greedy answer to each of QUESTIONS, as Markdown quotes."""
    from labkit.inference.chat import chat

    out = []
    for q in QUESTIONS:
        a = chat(model, tokenizer, q, max_new_tokens=MAX_NEW_TOKENS)
        text = a.text.strip().replace("\n", "\n> ")
        out.append(f"**{q}**\n\n> {text}" + ("" if a.stopped else " *(cut at the token limit)*"))
    return "\n\n".join(out)


def _architecture(cfg: Any, n_params: int) -> dict[str, Any]:
    return {"arch": "LlamaForCausalLM", "params": f"{n_params:,}", "params_m": f"{n_params / 1e6:.1f}",
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "group": cfg.num_attention_heads // cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "mlp": cfg.intermediate_size, "rope_theta": f"{cfg.rope_theta:g}",
            "eps": f"{cfg.rms_norm_eps:.3g}", "vocab": f"{cfg.vocab_size:,}",
            "context": f"{cfg.max_position_embeddings:,}", "eos_id": cfg.eos_token_id,
            "weights_mb": f"{n_params * 4 / 1e6:.0f}"}


def card_text(model: EmbeddedGGUF = SMOLLM2) -> str:
    """The card's Markdown, every value measured now on the converted folder."""
    from labkit.models import embedded, load
    from labkit.quant.evaluate import heldout_windows

    loaded = load(model.name, device="cpu")
    folder = embedded.folder(model)
    manifest = embedded.read_manifest(model) or {}
    n = loaded.model.num_parameters()
    windows = heldout_windows(folder, _n_windows(folder), embedded.HELDOUT_CONTEXT)
    ppl = perplexities(loaded.model, windows)
    values = {
        "title": f"{model.name}: {model.origin.split('/')[-1]}, the lab's embedded real model",
        "name": model.name, "origin": model.origin, "license": model.license,
        "gguf_file": model.filename, "install": model.install,
        "gguf_mb": f"{manifest.get('gguf_bytes', 0) / 1e6:.1f}",
        "gguf_sha": manifest.get("gguf_sha256", "?")[:16] + "...",
        **_architecture(loaded.model.config, n),
        "windows": len(windows), "context_eval": embedded.HELDOUT_CONTEXT,
        **{k: (f"{v:.4f}" if "nll" in k else f"{v:.2f}" if "ppl" in k else v) for k, v in ppl.items()},
        "ratio": f"{ppl['unigram_ppl'] / ppl['ppl']:.1f}", "max_new": MAX_NEW_TOKENS,
        "answers": answers(loaded.model, loaded.tokenizer),
    }
    template = resources.files("labkit.lab").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return Template(template).substitute(values)


def _n_windows(folder: Any) -> int:
    from safetensors import safe_open

    from labkit.models.embedded import HELDOUT_FILE

    with safe_open(str(folder / HELDOUT_FILE), framework="np") as f:
        return int(f.get_slice("windows").get_shape()[0])


def write_card(model: EmbeddedGGUF = SMOLLM2):
    """data/models/<name>/MODEL_CARD.md, written atomically."""
    from labkit.core import paths
    from labkit.core.files import atomic_write_text

    return atomic_write_text(paths.repo_models_dir() / model.name / "MODEL_CARD.md", card_text(model))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.lab.cards", description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", action="store_true",
                    help="first record the installed GGUF's and its tensors' sha256 (a new wheel)")
    args = ap.parse_args(argv)
    if args.manifest:
        from labkit.models.embedded import write_manifest

        print(f"wrote {write_manifest()}")
    print(f"wrote {write_card()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
