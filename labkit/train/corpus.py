"""A corpus of Python source that exists on every machine that runs the lab, offline.

Sources: the standard library of the running interpreter and the ``.py`` files of the lab's
pinned dependencies installed beside it (torch, transformers, numpy, pandas, ...). Tests, test
tooling and generated giants are left out, identical files are kept once (by sha256), and a
held-out split of WHOLE files is chosen by a hash of the file's path, so the split of a file never
depends on which other files happen to be installed.

Why a manifest: the corpus depends on the installed versions, so the manifest records every file
(path, package, sha256, bytes, split), the versions, and one hash over the file list. Two machines
with the same manifest hash trained on the same text.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Distributions whose Python sources join the standard library. These are the lab's direct
# dependencies (pyproject.toml) that ship meaningful Python source; a missing one is skipped and
# the manifest says so.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "torch",
    "transformers",
    "numpy",
    "pandas",
    "matplotlib",
    "tokenizers",
    "safetensors",
    "papermill",
    "ipykernel",
    "nbformat",
    "pyyaml",
    "psutil",
    "rich",
    "tqdm",
)

# Any path component in this set drops the file: tests and test tooling, the IDE, the 2to3
# fixers, vendored installers, demos, and caches.
EXCLUDED_DIRS: frozenset[str] = frozenset(
    {
        "test",
        "tests",
        "testing",
        "idlelib",
        "site-packages",
        "dist-packages",
        "lib2to3",
        "ensurepip",
        "turtledemo",
        "__pycache__",
        "lib-dynload",
    }
)
EXCLUDED_NAMES: frozenset[str] = frozenset({"conftest.py"})
# Files that are data written as Python (documentation dumps, tuning tables), not code.
EXCLUDED_PATHS: frozenset[str] = frozenset(
    {
        "stdlib/pydoc_data/topics.py",
        "site-packages/torch/sparse/_triton_ops_meta.py",
    }
)
# Generated files (Unicode tables, operator registries) teach the model little Python and
# distort a small vocabulary; the cap drops them.
MAX_FILE_BYTES = 1_000_000
# The held-out split: a file goes to held-out when the first 8 hex digits of sha256(path),
# read as an integer, modulo 1000 fall below this (2.5 % of files).
HELDOUT_PER_MILLE = 25

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SourceFile:
    """One file of the corpus: where it is on disk and how the manifest names it."""

    path: str  # stable relative name, "stdlib/json/decoder.py" or "site-packages/numpy/..."
    package: str  # "stdlib" or the distribution name
    abspath: Path


def split_of(path: str) -> str:
    """'heldout' or 'train' for a manifest path: a pure function of the path string."""
    digest = hashlib.sha256(path.encode("utf-8")).hexdigest()
    return "heldout" if int(digest[:8], 16) % 1000 < HELDOUT_PER_MILLE else "train"


def _is_excluded(rel_parts: tuple[str, ...]) -> bool:
    if any(part in EXCLUDED_DIRS for part in rel_parts[:-1]):
        return True
    name = rel_parts[-1]
    return name in EXCLUDED_NAMES or name.startswith("test_") or not name.endswith(".py")


def stdlib_files(stdlib_dir: Path | None = None) -> Iterator[SourceFile]:
    """The standard library's .py files, tests and the other excluded folders left out."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for abspath in root.rglob("*.py"):
        rel = abspath.relative_to(root)
        path = f"stdlib/{rel.as_posix()}"
        if not _is_excluded(rel.parts) and path not in EXCLUDED_PATHS and abspath.is_file():
            yield SourceFile(path, "stdlib", abspath)


def package_files(dist_name: str) -> Iterator[SourceFile]:
    """A distribution's installed .py files (from its RECORD), tests left out."""
    dist = importlib.metadata.distribution(dist_name)
    for entry in dist.files or []:
        rel = Path(str(entry))
        if rel.parts and rel.parts[0].endswith((".dist-info", ".data")) or rel.parts[0] == "..":
            continue
        if _is_excluded(rel.parts):
            continue
        abspath = Path(dist.locate_file(entry))
        path = f"site-packages/{rel.as_posix()}"
        if path not in EXCLUDED_PATHS and abspath.is_file():
            yield SourceFile(path, dist_name, abspath)


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed version of each distribution, None where it is not installed."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def collect(packages: Iterable[str] = DEFAULT_PACKAGES) -> list[SourceFile]:
    """All candidate files, sorted by manifest path (the corpus order)."""
    files = list(stdlib_files())
    for name, version in package_versions(packages).items():
        if version is not None:
            files.extend(package_files(name))
    return sorted(files, key=lambda f: f.path)


def manifest_hash(entries: list[dict]) -> str:
    """sha256 over the (path, sha256, split) lines: what the text and its split are, nothing else."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e['path']}\t{e['sha256']}\t{e['split']}\n".encode())
    return h.hexdigest()


def build_manifest(files: list[SourceFile]) -> tuple[dict, dict[str, str]]:
    """Read, filter and dedupe ``files``; return the manifest and {path: text} of kept files.

    Kept: UTF-8 decodable, non-empty, at most MAX_FILE_BYTES, first of identical contents in
    path order (so a copied file never sits in both splits).
    """
    seen: set[str] = set()
    entries: list[dict] = []
    texts: dict[str, str] = {}
    dropped = {"duplicate": 0, "empty": 0, "too_large": 0, "not_utf8": 0}
    for f in files:
        raw = f.abspath.read_bytes()
        if not raw.strip():
            dropped["empty"] += 1
            continue
        if len(raw) > MAX_FILE_BYTES:
            dropped["too_large"] += 1
            continue
        digest = hashlib.sha256(raw).hexdigest()
        if digest in seen:
            dropped["duplicate"] += 1
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            dropped["not_utf8"] += 1
            continue
        seen.add(digest)
        entries.append(
            {
                "path": f.path,
                "package": f.package,
                "sha256": digest,
                "bytes": len(raw),
                "split": split_of(f.path),
            }
        )
        texts[f.path] = text
    packages = sorted({e["package"] for e in entries} - {"stdlib"})
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "manifest_hash": manifest_hash(entries),
        "python": sys.version.split()[0],
        "stdlib_dir": sysconfig.get_paths()["stdlib"],
        "package_versions": package_versions(packages),
        "rules": {
            "excluded_dirs": sorted(EXCLUDED_DIRS),
            "excluded_names": sorted(EXCLUDED_NAMES) + ["test_*.py"],
            "excluded_paths": sorted(EXCLUDED_PATHS),
            "max_file_bytes": MAX_FILE_BYTES,
            "heldout": f"int(sha256(path)[:8], 16) % 1000 < {HELDOUT_PER_MILLE}",
        },
        "dropped": dropped,
        "totals": _totals(entries),
        "files": entries,
    }
    return manifest, texts


def _totals(entries: list[dict]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for e in entries:
        t = out.setdefault(e["split"], {"files": 0, "bytes": 0})
        t["files"] += 1
        t["bytes"] += e["bytes"]
    return out


def documents(manifest: dict, texts: dict[str, str], split: str) -> list[str]:
    """The texts of one split, in manifest (path) order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [texts[e["path"]] for e in manifest["files"] if e["split"] == split]
