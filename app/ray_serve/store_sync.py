"""Keeping one replica's adapter index in step with a store folder that other replicas write too.

Every replica opens the same ``adapters_dir`` (a shared filesystem: NFS, a CSI volume, or an fsspec mount of
``s3://...`` such as mountpoint-s3 / s3fs-fuse for a real deployment). An upload, replace or delete through
one replica writes that folder (atomically, :mod:`app.registry.store`); the others learn of it two ways:

* per request (:meth:`StoreSync.check`): before a request is served, each adapter it names is compared with
  its on-disk stamp (``stance.json``: version, created, sha256; about 300 bytes read) and re-read if it
  changed. So a request that arrives after an upload's response was sent never runs on the old version, in
  whatever replica it lands: a replaced adapter never serves stale weights (caches key on the content digest,
  :class:`app.registry.adapter.AdapterVersion`, and the old version's idle slots are dropped);
* in the background (:meth:`StoreSync.refresh_all`, every ``Settings.store_watch_interval_s``): every folder
  and every indexed name, so ``/v1/models`` and ``/v1/adapters`` on any replica list a change within that
  interval.

It never writes the store and never removes another replica's in-flight folders (that is
:meth:`AdapterStore.scan`'s start-up clean-up, which a replica runs once when it starts).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the ingress imports this module too, and must not pull in torch
    from app.catalog import StanceCatalog

logger = logging.getLogger(__name__)


class StoreSync:
    """Adopts other replicas' changes to the shared store into ``catalog`` (thread-safe; calls block).

    Args:
        catalog: this replica's catalog (its store's root is the shared folder).
        interval_s: seconds between two background passes (:meth:`start`).
    """

    def __init__(self, catalog: StanceCatalog, interval_s: float) -> None:
        self.catalog = catalog
        self.interval_s = float(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, names: Iterable[str]) -> None:
        """Re-read each of ``names`` whose on-disk version differs from the indexed one (a small read per name)."""
        for name in dict.fromkeys(names):
            try:
                self.catalog.refresh(name)
            except Exception:  # a broken folder must not fail the request here: resolving it reports it
                logger.exception("checking adapter %s against the shared store failed", name)

    def names_on_disk(self) -> set[str]:
        """The adapter folders in the store now (dot-folders, in-flight writes among them, excluded)."""
        try:
            with os.scandir(self.catalog.store.root) as it:
                return {e.name for e in it if not e.name.startswith(".") and e.is_dir()}
        except OSError as exc:
            logger.warning("cannot list the adapter store %s: %s", self.catalog.store.root, exc)
            return set()

    def refresh_all(self) -> None:
        """One pass over every folder on disk and every indexed name."""
        self.check(sorted(self.names_on_disk() | {r.name for r in self.catalog.list()}))

    def start(self) -> None:
        """Run :meth:`refresh_all` every ``interval_s`` seconds in a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.refresh_all()
                except Exception:
                    logger.exception("adapter store refresh failed")

        self._thread = threading.Thread(target=loop, name="stanceserve-store-sync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
