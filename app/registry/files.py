"""Small durable-file helpers of the adapter store (:mod:`app.registry.store`).

Writing new files and fsyncing them and their folders, copying with a sha256, and removing
without raising. They know nothing of adapters or of the store layout; a failure to fsync
a folder (not possible on every platform) is ignored, every other OSError propagates
except in :func:`remove_path`, which logs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    """fsync the folder ``path`` so renames in it are durable (best effort: errors are ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform; the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path`` and fsync it. Raises FileExistsError if it exists."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to the new file ``dst`` (fsynced); return its sha256 hex digest and size in bytes."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), size


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of the file ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_id(st: os.stat_result) -> tuple[int, int, int]:
    """``(size, mtime_ns, inode)``: changes when a file is rewritten or replaced."""
    return st.st_size, st.st_mtime_ns, st.st_ino


def read_prefix(path: Path, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of ``path`` (one more than allowed, so a caller sees it is too big).

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)


def remove_path(path: Path) -> None:
    """Remove a file or folder (a symlink itself, never its target), logging (not raising) on failure."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)
