"""The CPU tier of adapter caching: parsed adapter versions kept in memory, LRU.

Device slots (:mod:`app.engine.slots`) hold the adapters rows are using now;
this cache holds up to ``max_items`` parsed :class:`AdapterWeights` on CPU so a
slot miss needs no disk read. Past that, adapters are read again from the
store. Keys are :class:`~app.registry.adapter.AdapterVersion` (name and content
digest), so a replaced adapter never returns stale weights. Thread-safe. It does not validate (the store did) nor touch the device.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from app.registry.adapter import AdapterRecord, AdapterVersion, AdapterWeights


class WeightCache:
    """LRU map ``record.id -> AdapterWeights``.

    Args:
        load: reads a record's weights from disk (the store's ``load_weights``); their id must be ``record.id``.
        max_items: most adapter versions kept; ``None`` keeps all.
    """

    def __init__(self, load: Callable[[AdapterRecord], AdapterWeights], max_items: int | None = None) -> None:
        self._load = load
        self.max_items = max_items
        self._items: OrderedDict[AdapterVersion, AdapterWeights] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[AdapterVersion, threading.Lock] = {}  # one lock per version being read from disk
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, weights: AdapterWeights) -> None:
        """Insert freshly loaded weights (e.g. right after an upload)."""
        with self._lock:
            self._items[weights.id] = weights
            self._items.move_to_end(weights.id)
            self._trim()

    def get(self, record: AdapterRecord) -> AdapterWeights:
        """The weights of ``record``, from memory or read from disk.

        Raises:
            whatever the loader raises (e.g. :class:`~app.errors.AdapterValidationError` for a corrupted file).
        """
        key = record.id
        with self._lock:
            w = self._items.get(key)
            if w is not None:
                self.hits += 1
                self._items.move_to_end(key)
                return w
            key_lock = self._loading.setdefault(key, threading.Lock())
        # Per-key lock: concurrent requests for the same cold adapter read it from disk once;
        # other keys load in parallel (the global lock is not held during the read).
        with key_lock:
            with self._lock:
                w = self._items.get(key)
                if w is not None:
                    self.hits += 1
                    return w
                self.misses += 1
            try:
                w = self._load(record)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            self.put(w)
            return w

    def discard_name(self, name: str) -> None:
        """Forget every version of adapter ``name``."""
        with self._lock:
            for key in [k for k in self._items if k.name == name]:
                del self._items[key]

    def _trim(self) -> None:
        if self.max_items is None:
            return
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
