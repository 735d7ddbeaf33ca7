"""Versioned reference dumps: what the PyTorch side computed, for a port to check itself against.

Why: the best parity practice for a port (llm.c's test_gpt2) is that the reference writes the
numbers once, in a small binary file with a stated layout, and the port reads them in its own
test and fails outside stated tolerances. A version number in the file lets the layout change
later without a silent misread: a reader refuses a version it does not know.

Layout, version 1 (the Swift reader in swift/Sources/LMPort/RefDump.swift mirrors it)::

    bytes 0..8     magic b"LMREFDMP"
    bytes 8..12    format version, uint32 little-endian
    bytes 12..16   header length in bytes, uint32 little-endian
    header         UTF-8 JSON: {"format": "labkit-refdump", "arrays": {name: {dtype, shape,
                   offset, nbytes}}, "layer_indices": [...], "meta": {...}}
    data           starts at the next multiple of 16; each array at its offset from there,
                   16-byte aligned, little-endian float32 or int32, C order

Arrays: ``prompt_tokens`` int32 [P]; ``hidden`` float32 [len(layer_indices), positions, hidden]
(the residual stream after each chosen decoder layer, for the prompt then each fed token, so
positions = P + steps - 1); ``logits`` float32 [steps, vocab] (step 0 from the prompt's last
position); ``greedy_tokens`` int32 [steps] (the argmax of each step's logits).

Only numpy is needed here, so reading a dump never imports torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labkit.core import files

MAGIC = b"LMREFDMP"
VERSION = 1
_ALIGN = 16
_DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4")}
_ARRAYS = {  # name -> (dtype, rank)
    "prompt_tokens": ("int32", 1),
    "hidden": ("float32", 3),
    "logits": ("float32", 2),
    "greedy_tokens": ("int32", 1),
}


@dataclass
class RefDump:
    """One reference run: prompt, per-layer hidden states, per-step logits, greedy tokens.

    ``meta`` holds what a reader needs to judge the numbers (arch, dtype of the weights, steps,
    the library that computed them); it must be JSON-serialisable.
    """

    prompt_tokens: np.ndarray
    layer_indices: list[int]
    hidden: np.ndarray
    logits: np.ndarray
    greedy_tokens: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_tokens = np.ascontiguousarray(self.prompt_tokens, dtype=np.int32)
        self.hidden = np.ascontiguousarray(self.hidden, dtype=np.float32)
        self.logits = np.ascontiguousarray(self.logits, dtype=np.float32)
        self.greedy_tokens = np.ascontiguousarray(self.greedy_tokens, dtype=np.int32)
        self.layer_indices = [int(i) for i in self.layer_indices]
        for name, (_, rank) in _ARRAYS.items():
            arr = getattr(self, name)
            if arr.ndim != rank:
                raise ValueError(f"RefDump.{name}: expected rank {rank}, got shape {arr.shape}")
        steps = self.logits.shape[0]
        if self.greedy_tokens.shape[0] != steps:
            raise ValueError(
                f"RefDump: greedy_tokens has {self.greedy_tokens.shape[0]} steps, logits {steps}"
            )
        if self.hidden.shape[0] != len(self.layer_indices):
            raise ValueError(
                f"RefDump.hidden: first axis {self.hidden.shape[0]} != "
                f"{len(self.layer_indices)} layer indices"
            )
        positions = self.prompt_tokens.shape[0] + steps - 1
        if self.hidden.shape[1] != positions:
            raise ValueError(
                f"RefDump.hidden: {self.hidden.shape[1]} positions; expected prompt + steps - 1 "
                f"= {positions}"
            )

    @property
    def steps(self) -> int:
        return int(self.logits.shape[0])


def write(path: str | os.PathLike[str], dump: RefDump) -> Path:
    """Write ``dump`` to ``path`` atomically (labkit.core.files). Returns the path."""
    path = Path(path)
    arrays: dict[str, dict[str, Any]] = {}
    blobs: list[tuple[int, bytes]] = []
    offset = 0
    for name, (dtype, _) in _ARRAYS.items():
        blob = np.ascontiguousarray(getattr(dump, name), dtype=_DTYPES[dtype]).tobytes()
        arrays[name] = {
            "dtype": dtype,
            "shape": list(getattr(dump, name).shape),
            "offset": offset,
            "nbytes": len(blob),
        }
        blobs.append((offset, blob))
        offset += -(-len(blob) // _ALIGN) * _ALIGN
    header = json.dumps(
        {
            "format": "labkit-refdump",
            "arrays": arrays,
            "layer_indices": dump.layer_indices,
            "meta": dump.meta,
        },
        sort_keys=True,
    ).encode()
    data_start = -(-(16 + len(header)) // _ALIGN) * _ALIGN
    out = bytearray(data_start + offset)
    out[0:16] = MAGIC + struct.pack("<II", VERSION, len(header))
    out[16 : 16 + len(header)] = header
    for start, blob in blobs:
        out[data_start + start : data_start + start + len(blob)] = blob
    return files.atomic_write_bytes(path, bytes(out))


def read(path: str | os.PathLike[str]) -> RefDump:
    """Read a dump written by :func:`write`; refuses other magics and versions, naming the file."""
    path = Path(path)
    raw = path.read_bytes()
    if len(raw) < 16 or raw[:8] != MAGIC:
        raise ValueError(f"{path}: not a labkit reference dump (expected magic {MAGIC!r})")
    version, header_len = struct.unpack("<II", raw[8:16])
    if version != VERSION:
        raise ValueError(f"{path}: reference dump version {version}; this reader expects {VERSION}")
    if 16 + header_len > len(raw):
        raise ValueError(f"{path}: header length {header_len} runs past the file")
    header = json.loads(raw[16 : 16 + header_len])
    data_start = -(-(16 + header_len) // _ALIGN) * _ALIGN
    values: dict[str, np.ndarray] = {}
    for name, (dtype, rank) in _ARRAYS.items():
        entry = header["arrays"].get(name)
        if entry is None:
            raise ValueError(f"{path}: no array {name!r}")
        shape = tuple(entry["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * 4
        start = data_start + entry["offset"]
        if entry["dtype"] != dtype or len(shape) != rank or entry["nbytes"] != nbytes:
            raise ValueError(f"{path}: array {name} is {entry}; expected {dtype} of rank {rank}")
        if start + nbytes > len(raw):
            raise ValueError(f"{path}: array {name} runs past the end of the file")
        values[name] = np.frombuffer(raw, dtype=_DTYPES[dtype], count=nbytes // 4, offset=start)
        values[name] = values[name].reshape(shape).copy()
    return RefDump(layer_indices=header["layer_indices"], meta=header.get("meta", {}), **values)
