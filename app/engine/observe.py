"""What the engine tells whoever watches it (metrics), without knowing who that is.

Three channels, all read-only for the watcher: the per-request events (:data:`~app.engine.request.Event`
and the listener-only :class:`~app.engine.request.RejectedEvent` and :class:`~app.engine.request.PreemptedEvent`,
given to :meth:`Observer.observe` on the engine thread),
the engine-wide events of the adapter slot cache (:data:`EngineEvent`, given to
:meth:`Observer.observe_engine`), and a snapshot of live counts (:class:`EngineStats`, read on demand
through :meth:`~app.engine.engine.Engine.stats`). The engine imports nothing of its watchers; the app
subscribes them (:meth:`~app.engine.engine.Engine.subscribe`). No Prometheus here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only
    from app.engine.request import GenerationRequest, RequestEvent


@dataclass(frozen=True)
class AdapterCacheEvent:
    """One lookup of the adapter slot cache.

    Attributes:
        result: ``"hit"`` (already in a slot), ``"miss"`` (copied into one) or ``"eviction"`` (an unused
            adapter left its slot to make room).
    """

    result: str


@dataclass(frozen=True)
class AdapterLoadEvent:
    """An adapter was copied into a device slot.

    Attributes:
        name: the adapter's name.
        seconds: how long the copy took, in seconds.
    """

    name: str
    seconds: float


#: Events of the engine as a whole (not of one request).
EngineEvent = AdapterCacheEvent | AdapterLoadEvent


@dataclass(frozen=True)
class EngineStats:
    """Live counts of the engine, read at one instant.

    Attributes:
        running: sequences in the running batch.
        waiting: requests queued, not yet admitted.
        adapters_loaded: adapter versions resident in device slots.
        preemptions: sequences preempted since start because the KV cache ran out of blocks (a counter).
    """

    running: int
    waiting: int
    adapters_loaded: int
    preemptions: int


class Observer(Protocol):
    """Something that watches the engine (e.g. :class:`app.metrics.Metrics`).

    Both methods are called on the engine thread (or the thread that submits a request, for a
    :class:`~app.engine.request.RejectedEvent`); they must be quick and must not raise (a raising
    observer is logged and skipped).
    """

    def observe(self, request: GenerationRequest, event: RequestEvent) -> None:
        """One event of one request."""

    def observe_engine(self, event: EngineEvent) -> None:
        """One engine-wide event."""
