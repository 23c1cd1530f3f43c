"""The adapter store's folder layout, and the renames that keep every write atomic.

Layout under ``root`` (``Settings.adapters_dir``)::

    root/<name>/adapter_config.json        peft config (as validated)
    root/<name>/adapter_model.safetensors  LoRA factors
    root/<name>/stance.json                {version, created, description, metadata, sha256, size}

Hidden working folders beside them, never listed as adapters::

    root/.tmp-<name>-<hex>/     a new version of <name> being written and fsynced
    root/.old-<name>-<hex>/     the version being replaced, between the two renames of a swap
    root/.del-<name>-<hex>/     a deleted adapter, renamed away before it is removed
    root/.upload-<hex>/         an upload being staged (:meth:`app.registry.store.AdapterStore.staging`)

A new version is swapped in with renames (:func:`swap_in`: ``<name>`` ->
``.old-<name>-<hex>``, tmp -> ``<name>``); a delete renames ``<name>`` away first
(:func:`move_aside`), so an adapter is never half-visible under its name.
:func:`recover` rolls an interrupted swap back (an ``.old-`` folder whose ``<name>`` is
missing is renamed back) and removes stale ``.tmp-`` / ``.del-`` / ``.old-`` /
``.upload-`` folders.

This module only names, renames and removes folders. It does not read, validate or index
adapters, nor write their files (that is :mod:`app.registry.store`), and it takes no lock:
the caller (the store, holding its own lock) serialises calls on one root.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from app.registry.files import fsync_dir, remove_path
from app.registry.validation import NAME_RE

logger = logging.getLogger(__name__)

TMP, OLD, DEL, UPLOAD = ".tmp-", ".old-", ".del-", ".upload-"


def hidden_path(root: Path, prefix: str, name: str | None = None) -> Path:
    """A fresh path ``root/<prefix><name>-<hex>`` (``root/<prefix><hex>`` without ``name``); nothing is created."""
    tag = uuid.uuid4().hex
    return root / (f"{prefix}{tag}" if name is None else f"{prefix}{name}-{tag}")


def split_hidden(entry: str, prefix: str) -> str | None:
    """The adapter name in the folder name ``<prefix><name>-<hex>``, or None if it has no valid name."""
    name, sep, _tag = entry[len(prefix) :].rpartition("-")
    return name if sep and NAME_RE.fullmatch(name) else None


def occupied(root: Path, name: str) -> bool:
    """Whether something (folder, file or symlink, even a dangling one) is at ``root/name``."""
    target = root / name
    return target.exists() or target.is_symlink()


def swap_in(root: Path, name: str, tmp: Path) -> Path | None:
    """Rename the written folder ``tmp`` to ``root/name``, moving an existing one to ``.old-<name>-<hex>`` first.

    Returns:
        The ``.old-`` folder the caller removes once the new version is indexed, or None if
        ``root/name`` did not exist.

    Raises:
        OSError: a rename failed; the old folder is back under ``name`` (if the rollback
            rename itself can be done) and ``tmp`` is left for the caller to remove.
    """
    target = root / name
    old_dir: Path | None = None
    if occupied(root, name):
        old_dir = hidden_path(root, OLD, name)
        os.rename(target, old_dir)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old_dir is not None:
            os.rename(old_dir, target)
        raise
    fsync_dir(root)
    return old_dir


def move_aside(root: Path, name: str) -> Path | None:
    """Rename ``root/name`` to a fresh ``.del-<name>-<hex>`` (fsynced) and return it, for the caller to remove.

    None if ``root/name`` is already gone. Raises OSError if the rename fails otherwise.
    """
    tomb = hidden_path(root, DEL, name)
    try:
        os.rename(root / name, tomb)
    except FileNotFoundError:
        return None
    fsync_dir(root)
    return tomb


def recover(root: Path, version_of: Callable[[Path], int], in_use: Collection[str] = ()) -> None:
    """Finish what a killed process left under ``root``: roll interrupted swaps back and remove stale folders.

    Args:
        root: the store folder.
        version_of: the ``stance.json`` version of an adapter folder; with several
            ``.old-<name>-*`` folders for a missing ``<name>``, the highest version is renamed back.
        in_use: hidden folder names (not paths) being written by this process; left alone.

    Every other ``.old-`` folder and every ``.tmp-``, ``.del-`` and ``.upload-`` entry is
    removed (logged at info level; a recovery is logged as a warning). Other dot-entries
    (``.git``, ``.keep``...) are never touched. Raises OSError if a roll-back rename fails.
    """
    entries = [e for e in root.iterdir() if e.name.startswith(".")]
    olds: dict[str, list[Path]] = {}
    for entry in entries:
        if entry.name.startswith(OLD) and (name := split_hidden(entry.name, OLD)) is not None:
            olds.setdefault(name, []).append(entry)
    for name, paths in olds.items():
        if not occupied(root, name):
            best = max(paths, key=version_of)
            os.rename(best, root / name)
            fsync_dir(root)
            paths.remove(best)
            logger.warning("recovered adapter %s from interrupted replace (%s)", name, best.name)
        for path in paths:
            logger.info("removing leftover %s", path)
            remove_path(path)
    for entry in entries:
        if entry.name.startswith((TMP, DEL, UPLOAD)) and entry.name not in in_use:
            logger.info("removing stale %s", entry)
            remove_path(entry)
