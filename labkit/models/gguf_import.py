"""A Llama GGUF file -> an HF model folder (the lab's interchange), through transformers.

transformers reads GGUF (``from_pretrained(..., gguf_file=...)``): it dequantizes every tensor
with the ``gguf`` package's own code, undoes llama.cpp's q/k row permutation, and rebuilds the
fast tokenizer and its chat template from the GGUF metadata. Here that result is written as a
plain float32 folder: ``config.json`` (written by ``LlamaConfig.to_hf_dict``, so labkit and
transformers read the same), ``model.safetensors`` (a tied output matrix stored once),
``tokenizer.json``, ``tokenizer_config.json`` (with the chat template inside, as older readers
expect), ``generation_config.json`` stopping at the chat's end token. Written into a temporary
folder and swapped in whole (``core.files.atomic_dir``): an interrupted conversion leaves
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from labkit.models.errors import ModelLoadError


def _hf_llama(gguf: Path):
    """(transformers model in float32, its tokenizer) read from the GGUF file."""
    import torch
    import transformers

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.float32, trust_remote_code=False, **kwargs)
    except ImportError:
        raise
    except Exception as exc:
        raise ModelLoadError(gguf, f"transformers could not read the GGUF file: {exc}") from exc
    if type(model).__name__ != "LlamaForCausalLM":
        raise ModelLoadError(gguf, f"a {type(model).__name__}: only Llama GGUF files are converted")
    return model, tok


def _config(model: Any, eos_id: int | None) -> dict[str, Any]:
    """config.json of the converted folder, through labkit's parser (so both readers agree)."""
    from labkit.models.config import LlamaConfig

    raw = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    raw["architectures"] = ["LlamaForCausalLM"]
    raw["torch_dtype"] = "float32"
    cfg = LlamaConfig.from_dict(raw, source="gguf metadata")
    if eos_id is not None:
        cfg.eos_token_id = eos_id
    out = cfg.to_hf_dict()
    out["pad_token_id"] = raw.get("pad_token_id")
    return out


def from_gguf(gguf: str | Path, out_dir: str | Path, *, eos_token: str | None = None,
              name: str | None = None) -> Path:
    """Convert the Llama GGUF file ``gguf`` into the HF folder ``out_dir`` (atomically).

    ``eos_token``: the token generation stops at (a chat model's end of turn); it becomes
    ``eos_token_id`` in config.json and generation_config.json.
    """
    import torch
    from safetensors.torch import save_file

    from labkit.core.files import atomic_dir, atomic_write_json

    gguf = Path(gguf)
    if not gguf.is_file():
        raise ModelLoadError(gguf, "no such GGUF file")
    model, tok = _hf_llama(gguf)
    eos_id = tok.convert_tokens_to_ids(eos_token) if eos_token else None
    config = _config(model, eos_id)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()
             if not (config["tie_word_embeddings"] and k == "lm_head.weight")}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config)
        tok.save_pretrained(str(tmp))
        tcfg = json.loads((tmp / "tokenizer_config.json").read_text())
        if tok.chat_template:
            tcfg["chat_template"] = tok.chat_template
        atomic_write_json(tmp / "tokenizer_config.json", tcfg)
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
               "pad_token_id": config.get("pad_token_id"), "do_sample": False}
        atomic_write_json(tmp / "generation_config.json", gen)
        atomic_write_json(tmp / "source.json", {"gguf": gguf.name, "origin": name or gguf.stem})
    return Path(out_dir)
