"""Seeding a new adapter store with the stance adapters shipped with stanceserve.

The shipped adapters are data, not a package. They are found in this order (:func:`shipped_adapters_dir`):

1. ``adapters/`` beside the ``app`` package: a source checkout, or an editable install of one;
2. ``<sys.prefix>/share/stanceserve/adapters``: where ``pip install .`` puts them (the ``data-files`` table of
   ``pyproject.toml``), also inside the Docker image.

:func:`seed_store` fills a store that holds no adapters: a folder that does not exist yet (a first start) or one
with no adapter in it (a new, empty ``STANCESERVE_ADAPTERS_DIR``). A missing store is created atomically: the
copies are made in a hidden sibling folder that is renamed to the store, so a crash never leaves a half-seeded
store that would not be seeded again. A store holding at least one adapter is never touched by start-up (an
adapter deleted on purpose stays deleted). Whether start-up seeds at all is :meth:`app.config.Settings.seeds_store`.

:func:`add_shipped` copies every shipped adapter whose name the store does not hold yet, never replacing one
(``stanceserve adapters seed``, and seeding an existing empty store): each copy is written to a hidden
``.tmp-<name>-<hex>`` folder of the store (which the store removes if a crash leaves one) and renamed to its name.
:func:`empty_store_warning` is the start-up warning for a store with no adapters.

This module does not validate adapters: :meth:`app.registry.store.AdapterStore.scan` does, when the store opens.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

from app.registry.files import remove_path
from app.registry.peft_reader import CONFIG_FILE, MODEL_FILE

logger = logging.getLogger(__name__)

#: Where the shipped adapters are installed, relative to the installation prefix (``sys.prefix``).
INSTALLED_SUBDIR = Path("share") / "stanceserve" / "adapters"


def adapter_folders(source: Path) -> list[Path]:
    """The sub-folders of ``source`` that hold a peft adapter (its config and weights files), sorted by name.

    Hidden folders (the store's own ``.tmp-`` / ``.upload-`` ...) are left out; a missing ``source`` has none.
    """
    if not source.is_dir():
        return []
    return sorted(
        p for p in source.iterdir()
        if not p.name.startswith(".") and p.is_dir() and (p / CONFIG_FILE).is_file() and (p / MODEL_FILE).is_file()
    )


def shipped_adapters_dir(checkout: Path | None = None, prefix: Path | None = None) -> Path | None:
    """The folder of the shipped adapters, or None if no candidate holds any.

    Args:
        checkout: the source tree to look in first (default: the folder that holds the ``app`` package).
        prefix: the installation prefix to look in next (default: ``sys.prefix``), at :data:`INSTALLED_SUBDIR`.
    """
    checkout = Path(__file__).resolve().parents[2] if checkout is None else Path(checkout)
    installed = (Path(sys.prefix) if prefix is None else Path(prefix)) / INSTALLED_SUBDIR
    for candidate in (checkout / "adapters", installed):
        if adapter_folders(candidate):
            return candidate
    return None


def _no_shipped(root: Path) -> None:
    logger.warning("no shipped adapters found to seed %s (looked beside the app package and in %s)",
                   root, Path(sys.prefix) / INSTALLED_SUBDIR)


def add_shipped(root: Path, source: Path | None = None) -> tuple[list[str], list[str]]:
    """Copy into the existing store folder ``root`` every adapter of ``source`` whose name it does not hold.

    Args:
        root: an adapter store folder (created if missing, with its parents).
        source: where the adapters come from (default: :func:`shipped_adapters_dir`).

    Returns:
        ``(copied, kept)``: names copied, and names skipped because the store already has a folder of that name
        (never replaced). Both empty when there is nothing to copy (a warning is logged).

    Raises:
        OSError: a copy failed (disk full, permissions); the adapters copied before it stay, the partial copy is
            removed.
    """
    root = Path(root)
    source = shipped_adapters_dir() if source is None else Path(source)
    folders = adapter_folders(source) if source is not None else []
    if not folders:
        _no_shipped(root)
        return [], []
    root.mkdir(parents=True, exist_ok=True)
    copied, kept = [], []
    for folder in folders:
        target = root / folder.name
        if target.exists() or target.is_symlink():
            kept.append(folder.name)
            continue
        tmp = root / f".tmp-{folder.name}-{uuid.uuid4().hex[:12]}"  # the store's own temp prefix: cleaned at start-up
        try:
            shutil.copytree(folder, tmp, symlinks=False)
            try:
                os.rename(tmp, target)  # fails if the name appeared meanwhile: kept
            except OSError:
                if target.exists():
                    kept.append(folder.name)
                    continue
                raise
            copied.append(folder.name)
        finally:
            if tmp.exists():
                remove_path(tmp)
    if copied:
        logger.info("copied %d shipped adapters into %s from %s: %s", len(copied), root, source, ", ".join(copied))
    return copied, kept


def empty_store_warning(root: Path) -> str:
    """The start-up warning for a store with no adapters: what it means and the ways to fill it."""
    return (f"the adapter store {root} holds no adapters: every request naming a stance answers 404. Fill it with "
            "the shipped stances (`stanceserve adapters seed`, or set STANCESERVE_SEED_ADAPTERS=true and restart), "
            "or upload one (POST /v1/adapters)")


def seed_store(root: Path, source: Path | None = None) -> list[str]:
    """Fill the store ``root`` with a copy of every adapter folder in ``source``, if it holds no adapters.

    Args:
        root: the adapter store (``Settings.adapters_dir``). Its parent folders are created.
        source: where the adapters come from (default: :func:`shipped_adapters_dir`).

    Returns:
        The names of the adapters copied: empty when ``root`` already held an adapter or there was nothing to copy
        (then a missing ``root`` is left for the store to create, empty).

    Raises:
        OSError: the copy failed (disk full, permissions); a store that did not exist is not left behind.
    """
    root = Path(root)
    if root.is_symlink() and not root.exists():
        return []
    if root.exists():
        if not root.is_dir() or adapter_folders(root):
            return []
        names, _ = add_shipped(root, source)
        if names:
            logger.info("seeded the empty adapter store %s with %d shipped adapters: %s", root, len(names),
                        ", ".join(names))
        return names
    source = shipped_adapters_dir() if source is None else Path(source)
    folders = adapter_folders(source) if source is not None else []
    if not folders:
        _no_shipped(root)
        return []
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.seed-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        for folder in folders:
            shutil.copytree(folder, tmp / folder.name, symlinks=False)
        try:
            os.rename(tmp, root)  # atomic; fails if another process made a non-empty root meanwhile
        except OSError:
            if root.is_dir():
                logger.info("adapter store %s appeared while seeding it; left as it is", root)
                return []
            raise
    finally:
        if tmp.exists():
            remove_path(tmp)
    names = [f.name for f in folders]
    logger.info("seeded the new adapter store %s with %d shipped adapters from %s: %s",
                root, len(names), source, ", ".join(names))
    return names
