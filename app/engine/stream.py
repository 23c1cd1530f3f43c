"""The consumer side of one request: its events, with text, as an async iterator.

The engine thread sends token ids only (:mod:`app.engine.request`). :class:`RequestStream`
reads them from the request's ``asyncio`` queue on the event loop and adds the text:
incremental detokenisation (:class:`~app.engine.detokenizer.TextDecoder`, O(1) per token) and
stop strings. When a stop string appears it ends the stream itself (reason ``"stop"``) and tells
the engine to drop the row at its next step. A failure here (a token the tokenizer cannot decode)
ends this stream alone with an ``internal_error``; the engine and other requests never see it.

Not here: scheduling, sampling, HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.engine.detokenizer import TextDecoder
from app.engine.request import AdmittedEvent, ErrorEvent, Event, FinishEvent, GenerationRequest, TokenEvent
from app.errors import InternalError, NotReadyError

logger = logging.getLogger(__name__)


class RequestStream:
    """Async iterator over one request's :class:`TokenEvent`, then one :class:`FinishEvent` or :class:`ErrorEvent`.

    Token events carry their ``text``; the final ``FinishEvent.text`` is the held-back tail. The token that
    ends a request (EOS, a stop token) is passed on only when the request asked for logprobs. It never
    waits forever: if the engine thread is gone, the stream ends with a ``NotReadyError`` event within
    ``poll_s`` seconds.

    Args:
        req: the request (its ``params.stop`` are the stop strings).
        queue: where the engine's events for it arrive.
        tokenizer: for detokenisation (``None``: no text).
        scheduler: the engine's scheduler, to notice that it stopped (and its test-only ``fault_hook``).
    """

    poll_s = 1.0

    def __init__(
        self, req: GenerationRequest, queue: asyncio.Queue[Event], tokenizer: Any = None, scheduler: Any = None
    ) -> None:
        self.request = req
        self._queue = queue
        self._scheduler = scheduler
        self._decoder = TextDecoder(tokenizer, req.params.stop) if tokenizer is not None else None
        self._tokens = 0  # completion tokens seen, in tokens
        self._first_at: float | None = None
        self._ending: Event | None = None  # the event to end with, once a stop string was found
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self.done:
                raise StopAsyncIteration
            if self._ending is not None:
                ev, self._ending = self._ending, None
            else:
                ev = await self._next_event()
            out = self._consume(ev)
            if out is not None:
                if isinstance(out, (FinishEvent, ErrorEvent)):
                    self.done = True
                return out

    def cancel(self) -> None:
        """Stop the request at the engine's next step, unless it already ended."""
        if not self.done:
            self.request.cancelled = True

    # ------------------------------------------------------------------ internals
    async def _next_event(self) -> Event:
        while True:
            try:
                return await asyncio.wait_for(self._queue.get(), self.poll_s)
            except TimeoutError:
                if self._scheduler is not None and not self._scheduler.alive and self._queue.empty():
                    return ErrorEvent(NotReadyError("the engine stopped before this request ended"))

    def _consume(self, ev: Event) -> Event | None:
        """The event to hand out for ``ev`` (``None``: nothing to hand out)."""
        if isinstance(ev, AdmittedEvent):
            return None
        if isinstance(ev, TokenEvent):
            self._tokens += 1
            if self._first_at is None:
                self._first_at = ev.at
            if ev.ends:
                return ev if self.request.params.logprobs is not None else None
            return self._decode(ev)
        if isinstance(ev, FinishEvent) and self._decoder is not None and ev.reason != "cancelled":
            ev.text = self._decoder.flush()
        return ev

    def _decode(self, ev: TokenEvent) -> Event:
        req = self.request
        if self._decoder is None:
            return ev
        try:
            hook = getattr(self._scheduler, "fault_hook", None)
            if hook is not None:
                hook("detokenize", req)
            ev.text = self._decoder.add(ev.token_id)
        except Exception as e:  # noqa: BLE001 - this request alone fails
            req.cancel_reason = "error"  # the engine ends the row with this reason (metrics count an error)
            req.cancelled = True
            logger.error("request %s failed in detokenisation: %s: %s", req.request_id, type(e).__name__, e,
                         exc_info=e)
            return ErrorEvent(InternalError(f"internal error while detokenising (request id {req.request_id})"))
        if self._decoder.stopped:  # a stop string: end here, and drop the row at the engine's next step
            req.cancel_reason = "stop"
            req.cancelled = True
            ttft = None if self._first_at is None else self._first_at - req.arrival
            self._ending = FinishEvent("stop", len(req.prompt_ids), self._tokens, ttft, ev.at)
        return ev
