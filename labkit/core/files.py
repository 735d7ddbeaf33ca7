"""The one atomic writer: every file and folder the lab writes goes through here.

Why: a figure, a results file, a GGUF or a converted model folder that is half-written after an
interrupt (Ctrl-C, a killed kernel, a full disk) is worse than none, because the next run reads
it. So every write goes to a temporary sibling in the same folder (same file system, so the final
``os.replace`` is atomic) and is renamed into place only once it is complete; on any error the
temporary is removed and the previous file, if any, is untouched.

Temporaries are hidden and carry the writer's process id: ``.<name>.<pid>.<random>.tmp``. A
process killed with SIGKILL cannot clean up, so the next atomic write into that folder removes
the temporaries whose process is gone (:func:`remove_stale_temps`); a live writer's are kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Permissions of what the lab writes: readable by everyone (a site or a GGUF is for sharing),
#: as a plain ``open()`` under the usual umask would give; mkstemp alone would make it 0600.
FILE_MODE = 0o644
DIR_MODE = 0o755

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def temp_sibling(path: str | os.PathLike[str]) -> Path:
    """A fresh hidden name beside ``path`` for its temporary (nothing is created)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries in ``folder`` left by writers that no longer run; return them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMP_RE.match(entry.name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _discard(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int = FILE_MODE) -> Iterator[Path]:
    """Yield a temporary path to write a *file* to; it becomes ``path`` when the block ends.

    For writers that want a file name rather than bytes (a library's ``save(path)``): the block
    writes the temporary, and on success it gets ``mode`` and replaces ``path`` in one rename. On
    an exception the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: the writer produced no file at {tmp}")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = FILE_MODE) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    with atomic_path(path, mode=mode) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int = FILE_MODE) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (sorted keys are the caller's choice; a trailing newline added)."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary *folder*; it replaces the folder ``path`` when the block ends.

    For outputs that are folders (a converted HF model, an .mlpackage, the site, a training
    run). A folder cannot be swapped in one rename when one already exists, so the old one is
    first renamed aside, the new one renamed in, and only then the old one deleted: at every
    moment ``path`` is either the complete old folder or the complete new one (or, between the
    two renames, absent, never half-written). On an exception the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_sibling(path)
    tmp.mkdir(mode=DIR_MODE)
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if path.exists() or path.is_symlink():
            old = temp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            _discard(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (a checkpoint never sits in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
