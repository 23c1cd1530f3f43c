"""Seeding a new adapter store with the stance adapters shipped with stanceserve.

The shipped adapters are data, not a package. They are found in this order (:func:`shipped_adapters_dir`):

1. ``adapters/`` beside the ``app`` package: a source checkout, or an editable install of one;
2. ``<sys.prefix>/share/stanceserve/adapters``: where ``pip install .`` puts them (the ``data-files`` table of
   ``pyproject.toml``), also inside the Docker image.

:func:`seed_store` copies them into a store folder that does not exist yet (a first start), atomically: the
copies are made in a hidden sibling folder that is renamed to the store, so a crash never leaves a half-seeded
store that would not be seeded again. An existing store is never touched, even an empty one (its adapters may
have been deleted on purpose). Whether to seed at all is :meth:`app.config.Settings.seeds_store`.

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


def seed_store(root: Path, source: Path | None = None) -> list[str]:
    """Create the store folder ``root`` holding a copy of every adapter folder in ``source``, if ``root`` does not exist.

    Args:
        root: the adapter store (``Settings.adapters_dir``). Its parent folders are created.
        source: where the adapters come from (default: :func:`shipped_adapters_dir`).

    Returns:
        The names of the adapters copied: empty when ``root`` already existed or there was nothing to copy (then
        ``root`` is left for the store to create, empty).

    Raises:
        OSError: the copy failed (disk full, permissions); nothing is left behind under the parent of ``root``.
    """
    root = Path(root)
    if root.exists() or root.is_symlink():
        return []
    source = shipped_adapters_dir() if source is None else Path(source)
    folders = adapter_folders(source) if source is not None else []
    if not folders:
        logger.warning("no shipped adapters found to seed %s (looked beside the app package and in %s)",
                       root, Path(sys.prefix) / INSTALLED_SUBDIR)
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
