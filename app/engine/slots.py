"""When an adapter is on the device: the LRU slot cache over :class:`~app.engine.lora.MultiLoRA`.

A fixed number of slots (``--max-loras``) live on the compute device. An
adapter *version* (:class:`~app.registry.adapter.AdapterVersion`: name and content digest) is loaded into a free slot on first use;
when none is free, the least recently used slot that no running request holds
is evicted (the design of vLLM's ``LRUCacheWorkerLoRAManager``). Requests pin
their slots with :meth:`SlotCache.acquire` and unpin with
:meth:`SlotCache.release`, so an adapter in use is never evicted, and a
replaced adapter's old version stays resident until its last request ends.

Not here: where adapters come from (the registry) or the LoRA math (:mod:`app.engine.lora`).
Not thread-safe on purpose: only the engine thread calls it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from app.engine.lora import MultiLoRA
from app.registry.adapter import AdapterVersion, AdapterWeights

logger = logging.getLogger(__name__)


class NoFreeSlotError(RuntimeError):
    """Every slot is pinned by a running request; the caller should wait and retry."""


@dataclass
class SlotStats:
    """Counters of the cache since start (exported as Prometheus metrics)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds_total: float = 0.0
    last_load_seconds: float | None = None  # duration of the latest load into a slot (seconds)


class SlotCache:
    """Maps adapter versions to device slots with LRU eviction of unpinned slots.

    Args:
        lora: the model's multi-LoRA layers.
        on_load: called with (adapter version, seconds) after each load into a slot.
        on_event: called with ``"hit"``, ``"miss"`` or ``"eviction"`` (for metrics).
    """

    def __init__(
        self,
        lora: MultiLoRA,
        on_load: Callable[[AdapterVersion, float], None] | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.lora = lora
        self.capacity = lora.max_slots
        self._slot_of: OrderedDict[AdapterVersion, int] = OrderedDict()  # version -> slot, least recently used first
        self._refs: dict[int, int] = {}
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() gives slot 0 first
        self._on_load = on_load
        self._on_event = on_event or (lambda kind: None)
        self.stats = SlotStats()

    def __contains__(self, version: object) -> bool:
        return version in self._slot_of

    def keys(self) -> list[AdapterVersion]:
        """Resident adapter versions, least recently used first."""
        return list(self._slot_of)

    @property
    def resident(self) -> int:
        """Number of adapter versions currently on the device."""
        return len(self._slot_of)

    def acquire(self, adapter: AdapterWeights) -> int:
        """Pin ``adapter`` in a slot, loading it if needed, and return the slot index.

        Raises:
            NoFreeSlotError: it is not resident and every slot is pinned.
            whatever writing the adapter into the slot raises (e.g. ``KeyError`` for a module the base model
                lacks); the slot is then free again.
        """
        version = adapter.id
        slot = self._slot_of.get(version)
        if slot is not None:
            self.stats.hits += 1
            self._on_event("hit")
            self._slot_of.move_to_end(version)
        else:
            self.stats.misses += 1
            self._on_event("miss")
            slot = self._take_slot()
            t0 = time.perf_counter()
            try:
                self.lora.write_slot(slot, adapter)
            except BaseException:  # the slot is neither loaded nor lost: zero it and give it back
                self.lora.clear_slot(slot)
                self._free.append(slot)
                raise
            dt = time.perf_counter() - t0
            self.stats.load_seconds_total += dt
            self.stats.last_load_seconds = dt
            self._slot_of[version] = slot
            logger.debug("loaded %s into slot %d in %.1f ms", version, slot, dt * 1e3)
            if self._on_load is not None:
                self._on_load(version, dt)
        self._refs[slot] = self._refs.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        """Unpin one use of ``slot`` (it stays resident until evicted)."""
        n = self._refs.get(slot, 0) - 1
        if n < 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        self._refs[slot] = n

    def drop(self, version: AdapterVersion) -> bool:
        """Forget ``version`` if resident and unpinned (after delete/replace); returns whether it was dropped."""
        slot = self._slot_of.get(version)
        if slot is None or self._refs.get(slot, 0) > 0:
            return False
        del self._slot_of[version]
        self.lora.clear_slot(slot)
        self._free.append(slot)
        return True

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for version, slot in self._slot_of.items():  # least recently used first
            if self._refs.get(slot, 0) == 0:
                del self._slot_of[version]
                self.stats.evictions += 1
                self._on_event("eviction")
                logger.debug("evicted %s from slot %d", version, slot)
                return slot
        raise NoFreeSlotError(f"all {self.capacity} adapter slots are in use by running requests")
