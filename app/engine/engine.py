"""The engine facade the API talks to: prompts in, streamed tokens out, in a chosen stance.

:class:`Engine` owns the resident base model, its multi-LoRA layers, the slot
cache and the scheduler thread. It turns chat messages or text into token ids,
resolves a stance (one adapter by name, or a weighted blend) against the
adapter store, and bridges the scheduler's thread to ``asyncio``. It does not
parse HTTP or validate uploads.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from typing import Any, Protocol

from app.config import MAX_BLEND_ADAPTERS
from app.engine.lora import MultiLoRA
from app.engine.request import (
    BLEND_LABEL,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    Stance,
)
from app.engine.sampling import SamplingParams
from app.engine.scheduler import Scheduler
from app.engine.slots import SlotCache
from app.errors import AdapterNotFoundError, InvalidBlendError, InvalidRequestError, QueueFullError
from app.metrics import Metrics
from app.registry.adapter import AdapterRecord, AdapterWeights, adapter_name
from app.registry.cache import WeightCache

logger = logging.getLogger(__name__)


class AdapterSource(Protocol):
    """What the engine needs of the adapter store."""

    def get(self, name: str) -> AdapterRecord: ...

    def load_weights(self, record: AdapterRecord) -> AdapterWeights: ...


class Engine:
    """A resident base model serving per-request stances.

    Args:
        model: a Hugging Face causal LM in eval mode, on its device.
        tokenizer: its tokenizer.
        model_name: the name clients pass as ``model`` for the base model.
        eos_token_ids: ids that end generation.
        store: the adapter store (may be ``None`` for a base-only engine).
        max_loras: adapter slots on the device.
        max_cpu_loras: parsed adapters kept on CPU (``None``: all).
        max_model_len: longest prompt + completion, in tokens.
        metrics: Prometheus metrics, or ``None``.
        aliases: other strings accepted as the base model's name (e.g. its path).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_name: str,
        eos_token_ids: set[int],
        *,
        store: AdapterSource | None = None,
        max_loras: int = 32,
        max_cpu_loras: int | None = None,
        max_batch_size: int = 16,
        max_waiting: int = 256,
        prefill_chunk_tokens: int = 512,
        max_model_len: int = 2048,
        metrics: Metrics | None = None,
        aliases: tuple[str, ...] = (),
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.base_names = {model_name, *aliases}
        self.eos_token_ids = set(eos_token_ids)
        self.store = store
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.device = next(model.parameters()).device
        self.lora = MultiLoRA(model, max_slots=max_loras)
        self.slots = SlotCache(self.lora, on_load=self._on_slot_load, on_event=self._on_slot_event)
        self.weights = WeightCache(store.load_weights if store is not None else _no_store, max_cpu_loras)
        self.scheduler = Scheduler(
            model, tokenizer, self.lora, self.slots, self.eos_token_ids,
            max_batch_size=max_batch_size, max_waiting=max_waiting,
            prefill_chunk_tokens=prefill_chunk_tokens, metrics=metrics,
        )
        if metrics is not None:
            metrics.bind_gauges(
                running=lambda: self.scheduler.num_running,
                waiting=lambda: self.scheduler.num_waiting,
                loaded=lambda: self.slots.resident,
            )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the scheduler thread."""
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the scheduler thread; queued and running requests get an error event."""
        self.scheduler.stop()

    # ------------------------------------------------------------------ prompts
    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` under the model's chat template, with the assistant turn opened.

        Models without a chat template get a plain ``role: content`` transcript ending in ``assistant:``.
        """
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(tok(text)["input_ids"])

    def text_prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a raw completion prompt (the tokenizer's own special tokens, e.g. BOS, added)."""
        return list(self.tokenizer(prompt)["input_ids"])

    # ------------------------------------------------------------------ stances
    def is_base(self, model: str) -> bool:
        return model in self.base_names

    def resolve_stance(self, model: str, stances: dict[str, float] | None = None) -> Stance:
        """The adapters and weights for a request.

        Args:
            model: the request's ``model``: the base model's name or a registered adapter.
            stances: optional blend ``{adapter name: weight}``; when given it defines the routing.

        Raises:
            AdapterNotFoundError: ``model`` is neither the base model nor a registered adapter.
            InvalidBlendError: the blend is empty, has more than 8 terms, a non-finite weight or an unknown name.
        """
        if stances is not None:
            if not self.is_base(model):
                self._record(model, param="model")  # model must still name something that exists
            if not stances:
                raise InvalidBlendError("stances must name at least one adapter", param="stances")
            if len(stances) > MAX_BLEND_ADAPTERS:
                raise InvalidBlendError(
                    f"a blend may combine at most {MAX_BLEND_ADAPTERS} adapters, got {len(stances)}", param="stances"
                )
            terms = []
            for name, w in stances.items():
                if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
                    raise InvalidBlendError(f"weight of {name!r} must be a finite number, got {w!r}", param=f"stances.{name}")
                try:
                    rec = self._record(name, param=f"stances.{name}")
                except AdapterNotFoundError as e:
                    raise InvalidBlendError(f"blend names unknown adapter {name!r}", param=f"stances.{name}") from e
                terms.append((self.weights.get(rec), float(w)))
            return Stance(BLEND_LABEL, tuple(terms), tuple(stances))
        if self.is_base(model):
            return Stance.base()
        rec = self._record(model, param="model")
        return Stance(rec.name, ((self.weights.get(rec), 1.0),), (rec.name,))

    def _record(self, name: str, *, param: str) -> AdapterRecord:
        if self.store is None:
            raise AdapterNotFoundError(name, param=param)
        try:
            return self.store.get(name)
        except AdapterNotFoundError as e:
            raise AdapterNotFoundError(name, param=param) from e

    def forget_adapter(self, name: str) -> None:
        """After a delete or replace: drop cached versions of ``name`` that no request uses."""
        self.weights.discard_name(name)

        def drop() -> None:
            for key in [k for k in self.slots.keys() if adapter_name(k) == name]:
                self.slots.drop(key)

        self.scheduler.call(drop)

    def preload(self, weights: AdapterWeights) -> None:
        """Keep freshly uploaded weights in the CPU cache (no disk read on first use)."""
        self.weights.put(weights)

    # ------------------------------------------------------------------ generation
    def check_lengths(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Clamp ``params.max_tokens`` to the context left after the prompt.

        Raises:
            InvalidRequestError: the prompt is empty or alone fills ``max_model_len``.
        """
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="messages")
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len}", param="messages"
            )
        params.max_tokens = min(params.max_tokens, room)

    def open(self, prompt_ids: list[int], params: SamplingParams, stance: Stance) -> RequestStream:
        """Queue one request now and return the stream of its events.

        Must be called from a running event loop. Submitting eagerly lets the API answer 429
        before it starts a streaming response.

        Raises:
            QueueFullError: the waiting queue is full.
            InvalidRequestError: the prompt is empty or too long.
        """
        self.check_lengths(prompt_ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        req: GenerationRequest

        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is gone: nobody listens any more
                req.cancelled = True

        req = GenerationRequest(prompt_ids=prompt_ids, params=params, stance=stance, sink=sink)
        try:
            self.scheduler.submit(req)
        except QueueFullError:
            if self.metrics is not None:
                self.metrics.requests.labels(stance.label, "rejected").inc()
            raise
        return RequestStream(req, queue)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, stance: Stance
    ) -> AsyncIterator[Event]:
        """:meth:`open` then yield every event until the request ends (closing early cancels it)."""
        stream = self.open(prompt_ids, params, stance)
        try:
            async for ev in stream:
                yield ev
        finally:
            stream.cancel()

    def _on_slot_event(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_cache.labels(kind).inc()

    def _on_slot_load(self, key: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.adapter_load.observe(seconds)


def _no_store(record: AdapterRecord) -> AdapterWeights:
    raise AdapterNotFoundError(record.name)


class RequestStream:
    """Async iterator over one request's events; ends after its :class:`FinishEvent` or :class:`ErrorEvent`."""

    def __init__(self, req: GenerationRequest, queue: asyncio.Queue[Event]) -> None:
        self.request = req
        self._queue = queue
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Event:
        if self.done:
            raise StopAsyncIteration
        ev = await self._queue.get()
        if isinstance(ev, (FinishEvent, ErrorEvent)):
            self.done = True
        return ev

    def cancel(self) -> None:
        """Stop the request at the engine's next step, unless it already ended."""
        if not self.done:
            self.request.cancelled = True
