"""The stance catalog: one object between the API and the engine that owns what a name means.

:class:`StanceCatalog` resolves a request's ``model``/``stances`` to a :class:`Stance`
(base, one adapter, a named blend, or an anonymous blend), registers, replaces and deletes
adapters (upload, server path, vLLM's load/unload) and named blends (``/v1/stances``,
recipes kept by :class:`~app.registry.blends.NamedBlendStore`), lists them, and keeps the
registry gauges and the per-stance metric series in step.

Named blends: a name resolves to the live blend of its recipe, labelled with its own name
in the metrics (anonymous blends keep the shared ``"blend"`` label). Names are one namespace:
an adapter and a named blend never share a name (409 either way). Registering a blend whose
member adapter is not registered is refused with 409, so is a request for a stored blend whose
member has gone missing (e.g. its folder was removed before a restart); deleting an adapter
that a named blend uses is refused with 409 naming the blends (delete the blends first), so a
stored recipe never silently loses a member. Route functions translate HTTP into these
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

from app.engine import BASE_LABEL, BLEND_LABEL, Engine, Stance, StanceResolver
from app.errors import (
    AdapterInUseError,
    AdapterValidationError,
    BlendMemberMissingError,
    InvalidBlendError,
    StanceExistsError,
    StanceNotFoundError,
)
from app.metrics import Metrics
from app.redaction import contains_secret, redact_json
from app.registry.adapter import AdapterRecord, AdapterWeights
from app.registry.blends import NamedBlend, NamedBlendStore
from app.registry.store import AdapterStore
from app.registry.upload import stage_upload
from app.registry.validation import validate_name

logger = logging.getLogger(__name__)


def redact_upload(name: str, description: str | None, metadata: dict | None,
                  secrets: Iterable[str] = ()) -> tuple[str | None, dict | None]:
    """``description`` and ``metadata`` with secrets replaced by ``***`` (see :meth:`StanceCatalog.register_upload`).

    Logs a warning naming the adapter, never the secret, when a known secret (the admin key) was found.
    """
    secrets = [s for s in secrets if s]
    if contains_secret([description, metadata], secrets):
        logger.warning("upload of adapter %r: its description or metadata held the server's admin key; "
                       "stored with the key replaced by ***", name)
    new_description = redact_json(description, secrets) if description is not None else None
    new_metadata = redact_json(metadata, secrets) if metadata is not None else None
    return new_description, new_metadata


class StanceCatalog:
    """Names -> stances, and the adapter lifecycle.

    Args:
        store: the on-disk adapter store.
        engine: the running engine (its weight cache and slots are kept in step).
        metrics: the service's metrics (registry gauge, per-stance series).
        blends: the named-blend recipes (default: those stored in ``store.root``).
    """

    def __init__(self, store: AdapterStore, engine: Engine, metrics: Metrics | None = None,
                 blends: NamedBlendStore | None = None) -> None:
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.blends = blends if blends is not None else NamedBlendStore(store.root)
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        #: held while a blend's members are checked and stored, and while an adapter's users are checked and it is
        #: removed: no blend is ever stored with a member that is being deleted
        self._members = threading.Lock()
        #: the stance rules (:mod:`app.engine.stances`), with this catalog's named blends and registered adapters
        self.resolver = StanceResolver(engine.base_names, engine.adapter_weights, max_weight=engine.max_blend_weight,
                                       named_blend=self._recipe, registered=store.__contains__)
        self._update_gauge()

    # ------------------------------------------------------------------ reading
    def resolve(self, model: str, stances: dict[str, float] | None = None) -> Stance:
        """The stance a request asks for.

        ``model`` may name a named blend: without ``stances`` it resolves to the blend's live recipe, labelled
        with its name; with ``stances`` the request's own blend wins (as for any model) and is anonymous.

        Raises:
            BlendMemberMissingError: the named blend's recipe names an adapter that is not registered.
            AdapterNotFoundError, InvalidBlendError: see :class:`~app.engine.stances.StanceResolver`.
        """
        return self.resolver.resolve(model, stances)

    def _recipe(self, name: str) -> dict[str, float] | None:
        """The recipe of named blend ``name``, or ``None`` (also when it was deleted a moment ago: then the name
        is answered as any unknown model, 404 with param ``model``)."""
        if name not in self.blends:
            return None
        try:
            return dict(self.blends.get(name).stances)
        except StanceNotFoundError:
            return None

    def list_blends(self) -> list[NamedBlend]:
        """Every named blend, sorted by name."""
        return self.blends.list()

    def get_blend(self, name: str) -> NamedBlend:
        """Raises: StanceNotFoundError."""
        return self.blends.get(name)

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
        secrets: Iterable[str] = (),
    ) -> AdapterRecord:
        """Stage uploaded files inside the store, validate and register them as ``name``.

        ``description`` and ``metadata`` are stored redacted (:func:`app.redaction.redact_json`): the value of
        every secret command-line option in them (``--admin-key ...`` in a recorded command) and every one of
        ``secrets`` (the server passes its own admin key) are replaced by ``***``, and a warning is logged
        (without the secret). Metadata is readable without the admin key (``GET /v1/adapters``), so nothing
        secret is ever stored in it.

        Raises:
            AdapterValidationError, AdapterTooLargeError, AdapterExistsError: see the store and upload modules.
        """
        description, metadata = redact_upload(name, description, metadata, secrets)
        with self._lock(name):
            self._not_a_blend(name)
            with self.store.staging() as tmp:
                staged = stage_upload(files, tmp / "adapter", max_bytes=max_bytes)
                rec, weights = self.store.add(name, staged, description=description, metadata=metadata, replace=replace)
            self._registered(rec, weights)
        return rec

    def register_path(self, name: str, path: Path) -> AdapterRecord:
        """vLLM's ``load_lora_adapter``: register the adapter folder ``path`` on the server's disk."""
        with self._lock(name):
            self._not_a_blend(name)
            rec, weights = self.store.register_path(name, path)
            self._registered(rec, weights)
        return rec

    def delete(self, name: str) -> AdapterRecord:
        """Unregister ``name``; requests already running on it finish normally.

        Raises:
            AdapterNotFoundError: no adapter of that name.
            AdapterInUseError: named blends use it (nothing is deleted).
        """
        with self._lock(name):
            with self._members:
                users = self.blends.using(name)
                if users and name in self.store:
                    raise AdapterInUseError(name, users)
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

    def register_blend(self, name: str, stances: dict[str, float], *, description: str | None = None,
                       replace: bool = False) -> NamedBlend:
        """Store the named blend ``name`` = ``stances`` (durable, versioned); servable when this returns.

        Raises:
            AdapterValidationError: ``name`` is not a valid stance name, or is ``"base"`` / ``"blend"`` (the
                shared metric labels).
            StanceExistsError: ``name`` is the base model's, an adapter's, or a named blend's (without ``replace``).
            InvalidBlendError: empty, more than 8 members, a member that is itself a named blend, a weight that
                is not finite or is past ``max_blend_weight`` (``param`` names the member).
            BlendMemberMissingError: a member adapter is not registered.
        """
        validate_name(name)
        if name in (BASE_LABEL, BLEND_LABEL):
            raise AdapterValidationError(f"{name!r} is reserved (a shared metrics label)", param="name")
        if self.engine.is_base(name):
            raise StanceExistsError(f"{name!r} is the base model's name", param="name")
        nested = [a for a in stances if a in self.blends]
        if nested:
            raise InvalidBlendError(f"members must be adapters; {nested[0]!r} is a named blend",
                                    param=f"stances.{nested[0]}")
        with self._lock(name), self._members:
            if name in self.store:
                raise StanceExistsError(f"an adapter is registered as {name!r}; named blends and adapters share "
                                        "one namespace", param="name")
            missing = [a for a in stances if a not in self.store]
            if missing:
                raise BlendMemberMissingError(
                    f"member adapter {missing[0]!r} is not registered", param=f"stances.{missing[0]}")
            self.resolver.blend(stances)  # weights, count; warms the CPU cache
            return self.blends.put(name, stances, description=description, replace=replace)

    def delete_blend(self, name: str) -> NamedBlend:
        """Forget the named blend ``name`` (its adapters stay); requests already running on it finish normally.

        Raises:
            StanceNotFoundError: no named blend of that name.
        """
        with self._lock(name):
            blend = self.blends.delete(name)
            if self.metrics is not None:
                self.metrics.forget_stance(name)
        return blend

    # ------------------------------------------------------------------ internals
    def _not_a_blend(self, name: str) -> None:
        if name in self.blends:
            raise StanceExistsError(f"a named blend is registered as {name!r}; delete it first "
                                    "(DELETE /v1/stances/{name})", param="name")

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
