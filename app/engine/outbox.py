"""Where a request's events go, and how a row ends: :class:`Outbox`.

Every event the scheduler produces goes through one :class:`Outbox`: the request's own consumer (its ``sink``)
gets each event of that request, and every listener (metrics, tests) gets each event of every request, on the
engine thread; neither a dead consumer nor a raising listener stops the engine. A row ends here too: finished
(EOS, stop, length, cancelled) with one :class:`~app.engine.request.FinishEvent`, or failed with one
:class:`~app.engine.request.ErrorEvent`, and in both cases it gives back its adapter slots and KV blocks (a row
that decoded to its end first keys its full blocks in the prefix cache, generated tokens included). The
test-only ``fault_hook`` lives here, so every stage that may fail a row injects its fault through one place.

Not here: deciding when a row ends or fails (:mod:`app.engine.scheduler`), admission and preemption
(:mod:`app.engine.admission`), the consumer's side of the stream (:mod:`app.engine.stream`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from app.engine.batch import Sequence
from app.engine.kv_cache import PagedKVCache
from app.engine.prefix_cache import PrefixCache
from app.engine.request import ErrorEvent, Event, FinishEvent, GenerationRequest, Listener, RequestEvent
from app.engine.slots import SlotCache
from app.errors import InternalError, StanceServeError

logger = logging.getLogger(__name__)


class Outbox:
    """Sends requests and listeners their events, and ends rows (giving back their slots and blocks).

    Args:
        cache: the paged KV cache a row's blocks go back to.
        slots: the slot cache a row's pinned adapter slots go back to.
        listeners: called with ``(request, event)`` for every event of every request, on the engine thread; see
            :data:`~app.engine.request.Listener`. Copied once: append to :attr:`listeners` to
            subscribe later.
        prefix: the prefix cache that keys the full blocks of rows that decoded to their end (``None``: off).
    """

    def __init__(self, cache: PagedKVCache, slots: SlotCache, listeners: list[Listener] | None = None,
                 prefix: PrefixCache | None = None) -> None:
        self.kv = cache
        self.slots = slots
        self.prefix = prefix
        self.listeners: list[Listener] = list(listeners or [])
        #: tests only: ``fault_hook(stage, request)`` may raise to make that row fail at that stage
        self.fault_hook: Callable[[str, GenerationRequest], None] | None = None

    # ------------------------------------------------------------------ faults
    def inject(self, stage: str, req: GenerationRequest) -> None:
        """Fault injection for tests: ``fault_hook(stage, request)`` may raise to fail that row at that stage.

        Stages: ``admission``, ``prefill``, ``decode``, ``sampling``, ``grammar`` (a constrained row's
        matcher, after its token is chosen) (``detokenize`` is raised by the
        consumer, :class:`~app.engine.engine.RequestStream`).

        Raises:
            whatever ``fault_hook`` raises.
        """
        if self.fault_hook is not None:
            self.fault_hook(stage, req)

    def fail_row(self, s: Sequence, error: BaseException) -> None:
        """End one row with an error: release its slots and blocks; the caller drops it from the batch.

        A row that has already ended is left as it is (it gets one ending only).
        """
        if s.finish_reason is not None:
            return
        s.finish_reason = "error"
        self.retire(s)
        self.error(s.req, error)

    # ------------------------------------------------------------------ endings
    def release(self, pairs: list[tuple[int, float]]) -> None:
        """Unpin the adapter slots of ``pairs`` (``(slot, weight)`` pairs, as a row holds them)."""
        for slot, _ in pairs:
            self.slots.release(slot)

    def retire(self, s: Sequence) -> None:
        """Give back what a finished row holds: its adapter slots and its KV blocks."""
        self.release(s.slots)
        if s.blocks:
            blocks, s.blocks = s.blocks, []
            self.kv.release(blocks)

    def finish(self, s: Sequence, reason: str, *, decoded: bool = False) -> None:
        """End one row with ``reason`` (``stop``, ``length`` or a cancel reason): retire it, send its
        :class:`~app.engine.request.FinishEvent` (TTFT in seconds from arrival; ``None`` before a first token).

        With ``decoded`` (the row decoded to its end, so the KV of every token but its last is written), its full
        blocks, prompt and generated tokens alike, are keyed in the prefix cache before they go back: a next turn
        that sends the conversation so far shares them instead of prefilling the answer again.
        """
        s.finish_reason = reason
        if decoded and self.prefix is not None and s.blocks:
            self.prefix.store(s.prefix_key, s.prefill_ids(), s.blocks)
        self.retire(s)
        req = s.req
        ttft = None if s.first_token_at is None else s.first_token_at - req.arrival
        mask_s = s.matcher.mask_s if s.matcher is not None else 0.0
        self.emit(req, FinishEvent(reason, len(req.prompt_ids), len(s.out_ids), ttft, time.perf_counter(), "",
                                   s.prompt_cached, mask_s))

    def finish_unstarted(self, req: GenerationRequest, reason: str) -> None:
        """End a request that was never admitted (no row, nothing held) with ``reason``."""
        self.emit(req, FinishEvent(reason, len(req.prompt_ids), 0, None, time.perf_counter()))

    # ------------------------------------------------------------------ delivery
    def error(self, req: GenerationRequest, error: BaseException) -> None:
        """Send ``req`` its one :class:`ErrorEvent`; an unexpected error becomes a logged ``internal_error``."""
        if not isinstance(error, StanceServeError):
            logger.error("request %s failed: %s: %s", req.request_id, type(error).__name__, error, exc_info=error)
            error = InternalError(f"internal error while generating (request id {req.request_id})")
        self.emit(req, ErrorEvent(error))

    def emit(self, req: GenerationRequest, ev: Event) -> None:
        """Send one event to the request's consumer and to every listener; neither can stop the engine."""
        try:
            req.sink(ev)
        except Exception:  # noqa: BLE001 - a dead consumer must not stop the engine
            logger.exception("could not deliver an event of request %s", req.request_id)
        self.notify(req, ev)

    def notify(self, req: GenerationRequest, ev: RequestEvent) -> None:
        """Send one event to every listener only (a raising listener is logged and skipped)."""
        for listener in self.listeners:
            try:
                listener(req, ev)
            except Exception:  # noqa: BLE001
                logger.exception("event listener %r failed", listener)
