"""Named blends on disk: ``{name: {adapter: weight}}`` recipes kept next to the adapters.

A named blend (``POST /v1/stances``) is a name that resolves to a live weighted blend of
registered adapters. :class:`NamedBlendStore` keeps them in one JSON file inside the adapter
store's root, ``root/.stances.json`` (a dot-entry, which the adapter store's scan ignores)::

    {"format": 1,
     "blends": {"friendly-expert": {"stances": {"curious-uncertainty": 0.6, "confident-expertise": 0.4},
                                     "version": 2, "created": 1767225600.0, "description": null}},
     "last_versions": {"friendly-expert": 2}}

Every change writes the whole file anew, atomically: a new file ``.stances.json.tmp-<hex>``
is written and fsynced, then renamed over the old one (``os.replace``) and the folder fsynced,
so a reader or a restart sees the old recipe set or the new one, never half of one. A stale
temporary file left by a killed write is removed when the store opens. Version numbers grow
per name across replaces, deletes and restarts (``last_versions``).

This module stores recipes only. It does not check that members exist, that weights are in
range or that names do not clash with adapters (:class:`app.catalog.StanceCatalog` does), and
it does not touch the engine. Thread-safe (one lock); one process owns a root.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import StanceExistsError, StanceNotFoundError
from app.registry.files import fsync_dir, remove_path
from app.registry.jsonread import loads_limited

logger = logging.getLogger(__name__)

FILE = ".stances.json"
FORMAT = 1
#: Largest ``.stances.json`` read at start-up, in bytes (thousands of recipes fit in far less).
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class NamedBlend:
    """One stored recipe.

    Attributes:
        name: the model name clients use.
        stances: ``{adapter name: weight}`` in the order given at registration.
        version: 1 for the first registration of the name, +1 per replace (also across delete and re-add).
        created: registration time of this version, Unix seconds.
        description: free text, or ``None``.
    """

    name: str
    stances: dict[str, float] = field(hash=False)
    version: int = 1
    created: float = 0.0
    description: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"stances": dict(self.stances), "version": self.version, "created": self.created,
                "description": self.description}


class NamedBlendStore:
    """The named blends of one adapter-store root, read at construction, written atomically on change.

    Args:
        root: the adapter store's folder (``Settings.adapters_dir``), created if missing.

    An unreadable or malformed file is logged and set aside as ``.stances.json.bad-<hex>`` (never
    fatal at start-up); malformed entries are skipped one by one.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / FILE
        self._lock = threading.Lock()
        self._blends: dict[str, NamedBlend] = {}
        self._last: dict[str, int] = {}
        self._load()

    # ------------------------------------------------------------------ reads
    def get(self, name: str) -> NamedBlend:
        """Raises: StanceNotFoundError."""
        with self._lock:
            blend = self._blends.get(name)
        if blend is None:
            raise StanceNotFoundError(name)
        return blend

    def list(self) -> list[NamedBlend]:
        """Every named blend, sorted by name."""
        with self._lock:
            return [self._blends[n] for n in sorted(self._blends)]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._blends

    def using(self, adapter: str) -> list[str]:
        """Names of the blends that have ``adapter`` as a member, sorted."""
        with self._lock:
            return sorted(n for n, b in self._blends.items() if adapter in b.stances)

    # ------------------------------------------------------------------ changes
    def put(self, name: str, stances: dict[str, float], *, description: str | None = None,
            replace: bool = False) -> NamedBlend:
        """Store ``name`` -> ``stances`` (durable when this returns) and return its record.

        Raises:
            StanceExistsError: ``name`` is stored and ``replace`` is false.
            OSError: the file cannot be written (the stored set is unchanged).
        """
        with self._lock:
            if name in self._blends and not replace:
                raise StanceExistsError(
                    f"named blend {name!r} already exists; send ?replace=true to replace it", param="name")
            version = self._last.get(name, 0) + 1
            blend = NamedBlend(name, {str(a): float(w) for a, w in stances.items()}, version, time.time(), description)
            blends = {**self._blends, name: blend}
            last = {**self._last, name: version}
            self._write(blends, last)
            self._blends, self._last = blends, last
        logger.info("named blend %s (version %d) = %s", name, version, blend.stances)
        return blend

    def delete(self, name: str) -> NamedBlend:
        """Remove ``name`` (durable when this returns).

        Raises:
            StanceNotFoundError: no blend of that name.
        """
        with self._lock:
            blend = self._blends.get(name)
            if blend is None:
                raise StanceNotFoundError(name)
            blends = {n: b for n, b in self._blends.items() if n != name}
            self._write(blends, self._last)
            self._blends = blends
        logger.info("named blend %s (version %d) deleted", name, blend.version)
        return blend

    # ------------------------------------------------------------------ internals
    def _write(self, blends: dict[str, NamedBlend], last: dict[str, int]) -> None:
        data = {"format": FORMAT, "blends": {n: blends[n].to_json() for n in sorted(blends)},
                "last_versions": dict(sorted(last.items()))}
        tmp = self.root / f"{FILE}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "x", encoding="utf-8") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            remove_path(tmp)
            raise
        fsync_dir(self.root)

    def _load(self) -> None:
        for entry in self.root.glob(f"{FILE}.tmp-*"):
            logger.info("removing stale %s", entry)
            remove_path(entry)
        if not self.path.exists():
            return
        try:
            with open(self.path, "rb") as f:
                raw_bytes = f.read(MAX_FILE_BYTES + 1)
            # recipes nest 3 deep ({"blends": {name: {"stances": {...}}}})
            data = loads_limited(raw_bytes, max_depth=8, param=FILE, max_bytes=MAX_FILE_BYTES)
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("blends"), dict):
                raise ValueError(f"not a format-{FORMAT} named-blend file")
        except Exception as exc:  # never fatal at start-up: keep the file aside for a person to look at
            aside = self.root / f"{FILE}.bad-{uuid.uuid4().hex}"
            logger.warning("named blends not loaded from %s (%s: %s); moved to %s", self.path,
                           type(exc).__name__, exc, aside.name)
            os.replace(self.path, aside)
            return
        for name, raw in data["blends"].items():
            try:
                stances = raw["stances"]
                if not isinstance(stances, dict) or not stances or not all(
                        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                        for w in stances.values()):
                    raise ValueError("stances must be a non-empty {adapter: finite weight} object")
                desc = raw.get("description")
                self._blends[name] = NamedBlend(name, {str(a): float(w) for a, w in stances.items()},
                                                int(raw["version"]), float(raw["created"]),
                                                desc if isinstance(desc, str) else None)
            except Exception as exc:
                logger.warning("skipping named blend %r in %s: %s", name, self.path, exc)
        last = data.get("last_versions")
        if isinstance(last, dict):
            self._last = {str(n): int(v) for n, v in last.items() if isinstance(v, int)}
        for name, b in self._blends.items():
            self._last[name] = max(self._last.get(name, 0), b.version)
        logger.info("named blends: %d loaded from %s", len(self._blends), self.path)
