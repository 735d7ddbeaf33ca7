"""Write a Llama model folder (HF layout) as a GGUF file that llama.cpp reads: F32, F16, Q8_0, Q4_0.

Why our own writer instead of llama.cpp's ``convert_hf_to_gguf.py``: the converter identifies a
BPE tokenizer by hashing its pre-tokenizer's output and rejects ours (trained here, so unknown to
its table). We read the pre-tokenizer's structure from tokenizer.json instead and tag the
llama.cpp pre-tokenizer that splits text the same way (:func:`pre_tokenizer_name`): a bare
``ByteLevel(use_regex=True)`` is GPT-2's regex (``gpt-2``: tiny-llama, and the converted
SmolLM2 folder); ``Digits(individual_digits=True)`` then ``ByteLevel`` is llama.cpp's ``smollm``
(every digit alone, then GPT-2's regex). Ids then equal ``tokenizers``' (tests/test_export_gguf.py
checks that through llama.cpp itself).

What the converter does and we repeat:

* tensor names: ``token_embd``, ``blk.N.attn_q`` ... ``output_norm``; no ``output.weight`` when
  the embeddings are tied (llama.cpp then reuses ``token_embd`` for the logits);
* q and k projections permuted (:func:`permute_qk`): HF Llama rotates the two *halves* of each
  head ("rotate_half"), llama.cpp's ``LLAMA_ROPE_TYPE_NORM`` rotates adjacent *pairs*; permuting
  the rows of W_q and W_k turns one layout into the other, and q.k is unchanged because both sides
  move the same way;
* 1-D tensors (the RMSNorm weights) stay F32 in every file type, as llama.cpp expects; a matrix
  whose rows do not split into 32-value blocks (an MLP of 172) is stored F16 in a Q8_0/Q4_0 file,
  as ``llama-quantize`` falls back;
* the tokenizer's special tokens (CONTROL), BOS/EOS/UNK/PAD ids, whether the tokenizer adds BOS
  (read from its post-processor, not assumed), and the chat template when there is one;
* ``head_dim`` when it is not ``hidden_size / num_attention_heads`` (key and value lengths).

The block quantizers are labkit.quant's (byte-exact against gguf-py), not a second copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from labkit.core.checks import one_of, output_path
from labkit.core.files import atomic_path

#: file types we write -> ggml type of the 2-D weights
FILE_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
#: values per quantized block of the block types we write (a row must split into whole blocks)
_BLOCK = {"Q8_0": 32, "Q4_0": 32}

#: HF parameter name (after ``model.``) -> GGUF tensor name; ``{i}`` is the layer index
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """GGUF tensor name of an HF Llama parameter (ValueError for anything else)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    raise ValueError(f"no GGUF name for tensor {hf_name!r} (not a Llama parameter)")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of W_q (``n_head`` = query heads) or W_k (``n_head`` = KV heads), halves -> pairs.

    Within each head the output rows ``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]`` become
    ``[x_0, y_0, x_1, y_1, ...]``: convert_hf_to_gguf.py's ``LlamaModel.permute``.
    """
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"permute_qk: {w.shape[0]} rows do not split into {n_head} heads of pairs")
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llama_config(folder: Path) -> tuple[dict[str, Any], Any]:
    """(config.json as read, the typed and validated LlamaConfig): errors name config.json."""
    from labkit.models.config import architecture_of, parse_config, read_config
    from labkit.models.errors import ModelLoadError

    raw = read_config(folder)
    family, arch = architecture_of(raw, folder / "config.json")
    if family != "llama":
        raise ModelLoadError(folder / "config.json",
                             f"architecture {arch!r}: the GGUF writer handles Llama only")
    return raw, parse_config(raw, folder / "config.json")


def _read_weights(files: list[Path]) -> dict[str, np.ndarray]:
    """Every tensor of the (checked) safetensors files as float32 numpy (fp16/bf16 upcast)."""
    import torch
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                out[name] = f.get_tensor(name).to(torch.float32).numpy()
    return out


def pre_tokenizer_name(pre: dict[str, Any] | None, where: Path) -> str:
    """llama.cpp's name for the pre-tokenizer ``pre`` (tokenizer.json's "pre_tokenizer").

    ``ByteLevel(use_regex=True, add_prefix_space=False)`` splits with GPT-2's regex: ``gpt-2``.
    ``Sequence[Digits(individual_digits=True), ByteLevel(...)]`` first isolates every digit, as
    llama.cpp's ``smollm`` does (its regexes: ``\\p{N}``, then GPT-2's). Anything else would be
    split differently by llama.cpp, so it is refused rather than tagged wrong.
    """
    def byte_level(p: dict[str, Any]) -> bool:
        return (p.get("type") == "ByteLevel" and p.get("use_regex", True)
                and not p.get("add_prefix_space", False))

    pre = pre or {}
    if byte_level(pre):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits"
            and steps[0].get("individual_digits") and byte_level(steps[1])):
        return "smollm"
    raise ValueError(f"{where}: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent "
                     "here (known: ByteLevel -> gpt-2; Digits + ByteLevel -> smollm)")


def _tokenizer_fields(folder: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens (by id, padded to ``vocab_size``), their types, merges, the pre-tokenizer's
    llama.cpp name and the ids the tokenizer adds around a text, from tokenizer.json."""
    from gguf import TokenType

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the GGUF file needs the tokenizer")
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        got = model.get("type") if isinstance(model, dict) else model
        raise ValueError(f"{path}: expected a byte-level BPE tokenizer (model {got!r})")
    if not isinstance(model.get("vocab"), dict) or not model["vocab"]:
        raise ValueError(f"{path}: model.vocab must be a non-empty mapping of token -> id")
    pre_tok = tok.get("pre_tokenizer")
    pre = pre_tokenizer_name(pre_tok if isinstance(pre_tok, dict) else None, path)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    vocab.update({text: t["id"] for text, t in added.items()})
    n = max(max(vocab.values()) + 1, vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TokenType.UNUSED] * n
    for text, idx in vocab.items():
        tokens[idx] = text
        if text not in added:
            types[idx] = TokenType.NORMAL
        else:
            types[idx] = TokenType.CONTROL if added[text].get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre,
            **_added_around(path)}


def _added_around(path: Path) -> dict[str, int | None]:
    """The ids the tokenizer's post-processor puts before and after a text (None: nothing).

    Asked of ``tokenizers`` itself: whether BOS is added is the post-processor's doing (SmolLM2's
    adds nothing, tiny-llama's prepends ``<|bos|>``), not a flag to guess from.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a").ids
    start = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    end = start + len(bare)
    return {"added_before": full[start - 1] if start else None,
            "added_after": full[end] if end < len(full) else None}


def _quantize_2d(w: np.ndarray, file_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for GGUFWriter.add_tensor: float arrays as is, blocks as uint8 rows.

    A row that does not split into whole blocks (``w.shape[1] % 32``) cannot be Q8_0/Q4_0; it is
    stored F16, as ``llama-quantize`` falls back for such tensors.
    """
    from gguf import GGMLQuantizationType

    from labkit.quant.gguf_blocks import quantize

    if file_type in _BLOCK and w.shape[1] % _BLOCK[file_type]:
        file_type = "F16"
    if file_type == "F32":
        return w.astype(np.float32), None
    if file_type == "F16":
        return w.astype(np.float16), None
    blocks = quantize(w.astype(np.float32), file_type)
    return blocks, GGMLQuantizationType[file_type]


#: (GGUF key after ``llama.``, config field), in the order llama.cpp's converter writes them.
_METADATA = (
    ("context_length", "max_position_embeddings"), ("embedding_length", "hidden_size"),
    ("block_count", "num_hidden_layers"), ("feed_forward_length", "intermediate_size"),
    ("head_count", "num_attention_heads"), ("head_count_kv", "num_key_value_heads"),
    ("rope_dimension_count", "head_dim"), ("rope_freq_base", "rope_theta"),
    ("layer_norm_rms_eps", "rms_norm_eps"), ("vocab_size", "vocab_size"),
)


def _write_metadata(writer: Any, cfg: Any, name: str) -> None:
    """Architecture, shapes, RoPE and norm epsilon, as llama.cpp's loader reads them."""
    writer.add_name(name)
    for key, field in _METADATA[:6]:
        getattr(writer, f"add_{key}")(getattr(cfg, field))
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:  # else llama.cpp derives it
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    for key, field in _METADATA[6:]:
        getattr(writer, f"add_{key}")(getattr(cfg, field))


def _write_tokenizer(writer: Any, cfg: Any, tok: dict[str, Any], folder: Path) -> None:
    """The vocabulary, merges, pre-tokenizer, special ids and the chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    # BOS: the id the tokenizer puts before a text, when it puts one (llama.cpp then adds it
    # where tokenizers does); else config.json's. EOS: config.json's (where generation stops).
    bos = tok["added_before"] if tok["added_before"] is not None else cfg.bos_token_id
    for token_id, adder in ((bos, writer.add_bos_token_id), (cfg.eos_token_id, writer.add_eos_token_id)):
        if isinstance(token_id, int):
            adder(token_id)
    tcfg = _tokenizer_config(folder)
    for key, adder in (("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        if tcfg.get(key) in tok["tokens"]:
            adder(tok["tokens"].index(tcfg[key]))
    writer.add_add_bos_token(tok["added_before"] is not None)
    writer.add_add_eos_token(tok["added_after"] is not None and tok["added_after"] == cfg.eos_token_id)
    template = tcfg.get("chat_template")
    if not template and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _write_tensors(writer: Any, weights: dict[str, np.ndarray], cfg: Any, file_type: str) -> None:
    """Every weight under its GGUF name: q/k permuted to llama.cpp's RoPE layout, 1-D kept F32."""
    for hf_name, w in weights.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name.endswith("self_attn.q_proj.weight"):
            w = permute_qk(w, cfg.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            w = permute_qk(w, cfg.num_key_value_heads)
        data, raw = (w.astype(np.float32), None) if w.ndim == 1 else _quantize_2d(w, file_type)
        writer.add_tensor(gguf_name(hf_name), data, raw_dtype=raw)


def export_gguf(
    model_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    file_type: str = "F16",
    *,
    name: str | None = None,
) -> Path:
    """Write ``model_dir`` (config.json, model*.safetensors, tokenizer.json) to ``out_path``.

    ``file_type``: F32, F16, Q8_0 or Q4_0 for the 2-D weights (norms stay F32). The folder is
    checked the way ``labkit.models.load`` checks it (config fields, safetensors headers, every
    tensor's shape against config.json) before anything is written; the file is written to a
    temporary beside ``out_path`` and renamed, so a failed export leaves no file.
    """
    import gguf

    from labkit.models.loader import check_weights

    one_of(file_type, "file_type", FILE_TYPES, "export_gguf")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"export_gguf: name must be a non-empty str or None, got {name!r}")
    out = output_path(out_path, "out_path", "export_gguf")
    if not isinstance(model_dir, str | os.PathLike):
        raise TypeError(f"export_gguf: model_dir must be a model folder's path, got {model_dir!r}")
    folder = Path(model_dir)
    raw, cfg = _llama_config(folder)
    files = check_weights(folder, raw)
    tok = _tokenizer_fields(folder, cfg.vocab_size)
    weights = _read_weights(files)
    file_code = f"MOSTLY_{file_type}" if file_type != "F32" else "ALL_F32"
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_file_type(int(gguf.LlamaFileType[file_code]))
        _write_metadata(writer, cfg, name or folder.name)
        _write_tokenizer(writer, cfg, tok, folder)
        _write_tensors(writer, weights, cfg, file_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out
