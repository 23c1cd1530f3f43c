"""The stance catalog: one object between the API and the engine that owns what a name means.

:class:`StanceCatalog` resolves a request's ``model``/``stances`` to a :class:`Stance`
(base, one adapter, or a blend), registers, replaces and deletes adapters (upload,
server path, vLLM's load/unload), lists them, and keeps the registry gauges and
the per-stance metric series in step. Route functions translate HTTP into these
calls and back; they never call the store and the engine in turn themselves.
Compare vLLM's ``OpenAIServingModels``, which also holds a lock per adapter name.

Every method may block (disk reads, hashing, waiting for the engine thread to
drop a slot): call them from a worker thread, never on the event loop. Not
here: validation rules (:mod:`app.registry.validation`), slot management
(:mod:`app.engine.slots`), HTTP.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from app.engine.engine import Engine
from app.engine.request import Stance
from app.metrics import Metrics
from app.registry.adapter import AdapterRecord, AdapterWeights
from app.registry.store import AdapterStore
from app.registry.upload import stage_upload

logger = logging.getLogger(__name__)


class StanceCatalog:
    """Names -> stances, and the adapter lifecycle.

    Args:
        store: the on-disk adapter store.
        engine: the running engine (its weight cache and slots are kept in step).
        metrics: the service's metrics (registry gauge, per-stance series).
    """

    def __init__(self, store: AdapterStore, engine: Engine, metrics: Metrics | None = None) -> None:
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._update_gauge()

    # ------------------------------------------------------------------ reading
    def resolve(self, model: str, stances: dict[str, float] | None = None) -> Stance:
        """The stance a request asks for (see :meth:`Engine.resolve_stance` for the errors raised)."""
        return self.engine.resolve_stance(model, stances)

    def get(self, name: str) -> AdapterRecord:
        """Raises: AdapterNotFoundError."""
        return self.store.get(name)

    def list(self) -> list[AdapterRecord]:
        """Every registered adapter, sorted by name."""
        return self.store.list()

    # ------------------------------------------------------------------ changing
    def register_upload(
        self,
        name: str,
        files: Iterable[tuple[str, IO[bytes]]],
        *,
        description: str | None,
        metadata: dict | None,
        replace: bool,
        max_bytes: int,
    ) -> AdapterRecord:
        """Stage uploaded files inside the store, validate and register them as ``name``.

        Raises:
            AdapterValidationError, AdapterTooLargeError, AdapterExistsError: see the store and upload modules.
        """
        with self._lock(name):
            with self.store.staging() as tmp:
                staged = stage_upload(files, tmp / "adapter", max_bytes=max_bytes)
                rec, weights = self.store.add(name, staged, description=description, metadata=metadata, replace=replace)
            self._registered(rec, weights)
        return rec

    def register_path(self, name: str, path: Path) -> AdapterRecord:
        """vLLM's ``load_lora_adapter``: register the adapter folder ``path`` on the server's disk."""
        with self._lock(name):
            rec, weights = self.store.register_path(name, path)
            self._registered(rec, weights)
        return rec

    def delete(self, name: str) -> AdapterRecord:
        """Unregister ``name``; requests already running on it finish normally.

        Raises:
            AdapterNotFoundError: no adapter of that name.
        """
        with self._lock(name):
            rec = self.store.delete(name)
            self.engine.forget_adapter(name)  # waits for the engine thread between two steps
            if self.metrics is not None:
                self.metrics.forget_stance(name)
            self._update_gauge()
        logger.info("deleted adapter %s (version %d)", rec.id, rec.version)
        return rec

    def refresh(self, name: str) -> bool:
        """Adopt a change another process made to ``name`` in a shared store (replicas on one ``adapters_dir``).

        Re-reads ``name`` only if its on-disk stamp differs from the record (:meth:`AdapterStore.reload`); a
        new version drops the old one's cached weights and idle slots, a removed one its metric series too.
        Returns whether anything changed. Blocking (a small file read; a full read on change).
        """
        with self._lock(name):
            rec, changed = self.store.reload(name)
            if changed:
                self.engine.forget_adapter(name)
                if rec is None and self.metrics is not None:
                    self.metrics.forget_stance(name)
                self._update_gauge()
                logger.info("adapter %s %s by another process", name, f"now {rec.id}" if rec else "removed")
        return changed

    # ------------------------------------------------------------------ internals
    def _registered(self, rec: AdapterRecord, weights: AdapterWeights) -> None:
        self.engine.forget_adapter(rec.name)  # older versions no running request holds
        self.engine.preload(weights)
        self._update_gauge()
        logger.info("registered adapter %s (version %d, rank %d, %d bytes)", rec.id, rec.version, rec.rank, rec.size_bytes)

    def _update_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.adapters_registered.set(len(self.store))

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[name]
