"""The engine facade the API talks to: prompts in, streamed tokens out, in a chosen stance.

:class:`Engine` owns the resident base model, its multi-LoRA layers, the slot
cache and the scheduler thread. It turns chat messages or text into token ids,
resolves a stance (one adapter by name, or a weighted blend; the rules are :mod:`app.engine.stances`) against the
adapter store, and bridges the scheduler's thread to ``asyncio``. It does not
parse HTTP or validate uploads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from app.config import MAX_BLEND_ADAPTERS
from app.engine.config import EngineConfig
from app.engine.forward import ForwardPass
from app.engine.grammar import GrammarCompiler
from app.engine.graphs import DecodeGraphs
from app.engine.kv_cache import BLOCK_SIZE, blocks_for, default_budget, token_bytes
from app.engine.lora import MultiLoRA
from app.engine.observe import AdapterCacheEvent, AdapterLoadEvent, EngineEvent, EngineStats, Observer
from app.engine.prefix_cache import PrefixCache
from app.engine.request import (
    Completion,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    RejectedEvent,
    Stance,
    TokenEvent,
)
from app.engine.sampling import SamplingParams
from app.engine.scheduler import Scheduler
from app.engine.slots import SlotCache
from app.engine.stances import StanceResolver
from app.engine.stream import RequestStream
from app.errors import (
    AdapterNotFoundError,
    ContextLengthExceededError,
    InvalidRequestError,
    QueueFullError,
)
from app.registry.adapter import AdapterRecord, AdapterVersion, AdapterWeights
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
        config: slot counts, batch and queue sizes, context limits, blend bound (default:
            :class:`~app.engine.config.EngineConfig`'s, i.e. the settings' defaults). ``max_model_len`` is
            clamped to the model's ``max_position_embeddings``; ``max_prompt_tokens`` defaults to, and is at
            most, ``max_model_len - 1``.
        store: the adapter store (may be ``None`` for a base-only engine).
        observers: watchers of every request's events and of the engine's own (e.g. the app's metrics);
            more can join with :meth:`subscribe`.
        aliases: other strings accepted as the base model's name (e.g. its path).
        keep_model_callable: on CPU with ``weight_prepack``, keep the model's dense weights beside the packed
            ones (``ForwardPass(keep_dense=True)``), for callers that still run ``model`` themselves (peft
            baselines, likelihood scoring); the linear weights are then held twice.
        overrides: ``EngineConfig`` fields replacing ``config``'s (e.g. ``max_loras=4``); ``TypeError`` on
            an unknown name.

    Attributes:
        config: the effective configuration (``max_model_len`` after clamping).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        model_name: str,
        eos_token_ids: set[int],
        *,
        config: EngineConfig | None = None,
        store: AdapterSource | None = None,
        observers: tuple[Observer, ...] = (),
        aliases: tuple[str, ...] = (),
        keep_model_callable: bool = False,
        **overrides: Any,
    ) -> None:
        config = (config or EngineConfig()).replace(**overrides)
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.base_names = {model_name, *aliases}
        self.eos_token_ids = set(eos_token_ids)
        self.store = store
        self.forward_pass = ForwardPass(model, prepack=config.max_batch_size if config.weight_prepack else None,
                               keep_dense=keep_model_callable, attention_kernel=config.cpu_attention_kernel)
        # the kernels' build (once per machine) or load at start-up, not in a request; where they run, every step's
        # LoRA terms go row by row through the C++ kernel too: batch-invariant
        if self.forward_pass.warm_up():
            self.forward_pass.set_lora_kernel("cpu")
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        max_model_len = config.max_model_len
        for limit, what in ((positions, "positions"), (self.forward_pass.max_context, "sliding window")):
            if isinstance(limit, int) and 0 < limit < max_model_len:
                logger.warning("max_model_len %d is past the model's %s: using %d", max_model_len, what, limit)
                config = config.replace(max_model_len=limit)
                max_model_len = limit
        self.config = config
        self.max_model_len = max_model_len
        self.max_prompt_tokens = min(config.max_prompt_tokens or max_model_len - 1, max_model_len - 1)
        self.max_blend_weight = config.max_blend_weight
        #: width of the logits (the output embedding's rows), in tokens
        self.vocab_size = self.forward_pass.lm_head.out_features
        self._token_texts: dict[int, str] = {}
        #: longest vocabulary entry, in characters: bounds the characters one token can cover
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
        #: constrained decoding: grammar text -> compiled :class:`~app.engine.grammar.Grammar` (cached)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        self.device = next(model.parameters()).device
        #: the dtype the model computes in (its first floating-point parameter's)
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        #: the paged KV cache, allocated here once: ``kv_cache_memory_bytes`` of blocks (default: sized from the
        #: device's free memory, up to what ``max_batch_size`` sequences of ``max_model_len`` tokens could hold)
        per_token = token_bytes(self.forward_pass.num_layers, self.forward_pass.kv_heads, self.forward_pass.head_dim, self.forward_pass.dtype)
        most = config.max_batch_size * max_model_len + BLOCK_SIZE  # + the null block
        budget = config.kv_cache_memory_bytes or max(
            default_budget(self.device, max_tokens=most, per_token=per_token), (max_model_len + BLOCK_SIZE) * per_token
        )
        self.kv_cache = self.forward_pass.budgeted_cache(budget, max_model_len, max_blocks=blocks_for(most),
                                                    prefix_bytes=config.prefix_cache_memory_bytes)
        #: KV blocks of prompt prefixes per stance (``prefix_cache_memory_bytes``; 0 turns it off)
        self.prefix_cache = PrefixCache(self.kv_cache)
        self.lora = MultiLoRA(self.forward_pass.linears, max_slots=config.max_loras)
        self.slots = SlotCache(self.lora, on_load=self._on_slot_load, on_event=self._on_slot_event)
        self.weights = WeightCache(store.load_weights if store is not None else _no_store, config.max_cpu_loras)
        #: ``model`` + ``stances`` -> :class:`Stance` (the one set of rules; named blends are the catalog's)
        self.stances = StanceResolver(self.base_names, self.adapter_weights, max_weight=self.max_blend_weight,
                                      registered=self.is_registered)
        #: CUDA graphs of decode steps (``cuda_graphs``, on CUDA only), or ``None``
        self.graphs = None
        if config.cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self.forward_pass, self.kv_cache, self.lora, max_rows=config.max_batch_size,
                                       max_terms=MAX_BLEND_ADAPTERS, max_len=max_model_len)
        self.scheduler = Scheduler(
            self.forward_pass, self.kv_cache, self.lora, self.slots, self.eos_token_ids, config=config,
            prefix_cache=self.prefix_cache, graphs=self.graphs,
        )
        self._observers: list[Observer] = []
        for observer in observers:
            self.subscribe(observer)

    def subscribe(self, observer: Observer) -> None:
        """Give ``observer`` every later event: each request's (on the engine thread) and the engine's own.

        Subscribe before :meth:`start` to see every request.
        """
        self._observers.append(observer)
        self.scheduler.listeners.append(observer.observe)

    def stats(self) -> EngineStats:
        """Live counts: running and waiting requests, resident adapters, preemptions since start."""
        return EngineStats(running=self.scheduler.num_running, waiting=self.scheduler.num_waiting,
                           adapters_loaded=self.slots.resident, preemptions=self.scheduler.preemptions)

    def _tell(self, event: EngineEvent) -> None:
        for observer in self._observers:
            try:
                observer.observe_engine(event)
            except Exception:  # noqa: BLE001 - a failing watcher must not stop the engine
                logger.exception("engine observer %r failed", observer)

    @property
    def served(self) -> dict[str, str]:
        """What is served: ``{"device": "cpu" | "cuda:0" ..., "dtype": "float32" | "bfloat16" | "float16"}``."""
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch.")}

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
        Blocking (templating and tokenisation of up to megabytes): call it off the event loop.

        Raises:
            ContextLengthExceededError: the text is so long it cannot fit ``max_prompt_tokens``
                (checked on its length in characters, before tokenising), or its tokens do not fit.
        """
        tok = self.tokenizer
        self._check_chars(sum(len(m["content"]) for m in messages))
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self._tokenize(text, add_special_tokens=False)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self._tokenize(text, add_special_tokens=True)

    def text_prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a raw completion prompt (the tokenizer's own special tokens, e.g. BOS, added).

        Blocking: call it off the event loop. Raises as :meth:`chat_prompt_ids`.
        """
        return self._tokenize(prompt, add_special_tokens=True)

    def _tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        self._check_chars(len(text))
        ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if len(ids) > self.max_prompt_tokens:
            raise ContextLengthExceededError(
                f"the prompt has {len(ids)} tokens; this server accepts at most {self.max_prompt_tokens} "
                f"(the model's context is {self.max_model_len} tokens)",
                param="prompt",
            )
        return ids

    def token_text(self, token_id: int) -> str:
        """The text of one token alone (for logprobs), cached."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def check_token_ids(self, params: SamplingParams) -> None:
        """Token ids a request names (``logit_bias``, ``stop_token_ids``) must exist in the vocabulary.

        Raises:
            InvalidRequestError: ``param`` names the field.
        """
        for field_name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", param=field_name
                )

    def _check_chars(self, n_chars: int) -> None:
        """Refuse a text that cannot fit ``max_prompt_tokens`` without tokenising it.

        No token of the vocabulary covers more than ``max_token_chars`` characters (BPE, byte-level BPE
        and SentencePiece tokens decode to at most their own string's length), so a text of more than
        ``max_prompt_tokens * max_token_chars`` characters has more tokens than allowed; a factor 2 is
        kept as a margin for normalisers.
        """
        limit = 2 * self.max_prompt_tokens * self.max_token_chars
        if n_chars > limit:
            raise ContextLengthExceededError(
                f"the prompt has {n_chars} characters, more than {self.max_prompt_tokens} tokens can hold; "
                f"this server accepts at most {self.max_prompt_tokens} prompt tokens",
                param="prompt",
            )

    # ------------------------------------------------------------------ stances
    def is_base(self, model: str) -> bool:
        """Whether ``model`` names the base model (its name or an alias)."""
        return model in self.base_names

    def resolve_stance(self, model: str, stances: dict[str, float] | None = None) -> Stance:
        """The adapters and weights for a request, by the rules of :class:`~app.engine.stances.StanceResolver`.

        Args:
            model: the request's ``model``: the base model's name or a registered adapter (named blends are
                the catalog's: :meth:`app.catalog.StanceCatalog.resolve`).
            stances: optional blend ``{adapter name: weight}``; when given it defines the routing.

        Raises:
            AdapterNotFoundError: ``model`` is neither the base model nor a registered adapter.
            InvalidBlendError: the blend is empty, has more than 8 terms, a non-finite weight or one above
                ``max_blend_weight`` in size, or an unknown name.

        Blocking (a cold adapter is read from disk): call it off the event loop.
        """
        return self.stances.resolve(model, stances)

    def adapter_weights(self, name: str) -> AdapterWeights:
        """The weights of registered adapter ``name`` (from the CPU cache, else read from the store).

        Raises:
            AdapterNotFoundError: no adapter of that name. Blocking (a cold adapter is read from disk).
        """
        return self.weights.get(self._record(name, param="model"))

    def is_registered(self, name: str) -> bool:
        """Whether the store has an adapter ``name`` (its weights are not read)."""
        try:
            self._record(name, param="model")
        except AdapterNotFoundError:
            return False
        return True

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
            for version in [v for v in self.slots.keys() if v.name == name]:
                self.slots.drop(version)

        self.scheduler.call(drop)

    def preload(self, weights: AdapterWeights) -> None:
        """Keep freshly uploaded weights in the CPU cache (no disk read on first use)."""
        self.weights.put(weights)

    # ------------------------------------------------------------------ generation
    def check_lengths(self, prompt_ids: list[int], params: SamplingParams, *, explicit_max_tokens: bool = False) -> None:
        """Fit ``params.max_tokens`` to the context left after the prompt.

        A default ``max_tokens`` is clamped to the room left; one the client gave explicitly must fit
        (as vLLM and OpenAI answer ``context_length_exceeded``).

        Raises:
            InvalidRequestError: the prompt is empty (``param="prompt"``).
            ContextLengthExceededError: the prompt alone fills ``max_model_len`` (``param="prompt"``), or
                prompt + explicit ``max_tokens`` exceed it (``param="max_tokens"``).
        """
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        room = self.max_model_len - len(prompt_ids)
        if room < 1 or len(prompt_ids) > self.max_prompt_tokens:
            raise ContextLengthExceededError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len} tokens "
                f"and this server accepts at most {self.max_prompt_tokens} prompt tokens",
                param="prompt",
            )
        if params.max_tokens > room:
            if explicit_max_tokens:
                raise ContextLengthExceededError(
                    f"this model's maximum context length is {self.max_model_len} tokens; you requested "
                    f"{len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                    f"{params.max_tokens} for the completion)",
                    param="max_tokens",
                )
            params.max_tokens = room

    def open(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stance: Stance,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        request_id: str | None = None,
        explicit_max_tokens: bool = False,
    ) -> RequestStream:
        """Queue one request now and return the stream of its events.

        Args:
            loop: the event loop that will read the stream (default: the running loop). Passing it lets
                a worker thread open the request.
            request_id: id used in logs and error messages (default: a fresh ``req-N``).

        Raises:
            QueueFullError: the waiting queue is full.
            NotReadyError: the engine is stopped.
            InvalidRequestError, ContextLengthExceededError: see :meth:`check_lengths`.
        """
        self.check_lengths(prompt_ids, params, explicit_max_tokens=explicit_max_tokens)
        loop = loop or asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        req: GenerationRequest

        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is gone: nobody listens any more
                req.cancelled = True

        req = GenerationRequest(prompt_ids=prompt_ids, params=params, stance=stance, sink=sink)
        if request_id is not None:
            req.request_id = request_id
        try:
            self.scheduler.submit(req)
        except QueueFullError:
            rejected = RejectedEvent()
            for listener in list(self.scheduler.listeners):
                try:
                    listener(req, rejected)
                except Exception:  # noqa: BLE001
                    logger.exception("event listener %r failed", listener)
            raise
        return RequestStream(req, queue, self.tokenizer, self.scheduler)

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

    def generate_batch(
        self,
        prompts: Sequence[list[int]],
        stances: Stance | Sequence[Stance],
        sampling: SamplingParams | Sequence[SamplingParams],
        *,
        max_in_flight: int | None = None,
        on_completion: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Run every prompt to its end and return the answers, in the prompts' order (blocking).

        The requests run together, sharing the engine's batches as the server's requests do. For scripts,
        training and benchmarks: it runs its own event loop, so it cannot be called from a running one.

        Args:
            prompts: token ids of each prompt.
            stances: one resolved stance for every prompt, or one per prompt.
            sampling: one :class:`SamplingParams` for every prompt (copied per request), or one per prompt.
            max_in_flight: at most this many requests queued or running at once (default: all).
            on_completion: called with ``(index, completion)`` as each request ends (e.g. progress).

        Returns:
            one :class:`~app.engine.request.Completion` per prompt.

        Raises:
            ValueError: ``stances`` or ``sampling`` is a sequence of another length than ``prompts``.
            StanceServeError: the first request that ended in an :class:`~app.engine.request.ErrorEvent`
                (its error), or that :meth:`open` refused; the other requests are cancelled.
        """
        n = len(prompts)
        stance_of = [stances] * n if isinstance(stances, Stance) else list(stances)
        params_of = ([dataclasses.replace(sampling) for _ in range(n)] if isinstance(sampling, SamplingParams)
                     else list(sampling))
        if len(stance_of) != n or len(params_of) != n:
            raise ValueError(f"{n} prompts need as many stances and sampling parameters, got "
                             f"{len(stance_of)} and {len(params_of)}")

        async def one(i: int, gate: asyncio.Semaphore) -> Completion:
            tokens: list[TokenEvent] = []
            text: list[str] = []
            async with gate:
                async for ev in self.generate(prompts[i], params_of[i], stance_of[i]):
                    if isinstance(ev, TokenEvent):
                        tokens.append(ev)
                        text.append(ev.text)
                    elif isinstance(ev, FinishEvent):
                        text.append(ev.text)
                        done = Completion(tokens, "".join(text), ev)
                        if on_completion is not None:
                            on_completion(i, done)
                        return done
                    elif isinstance(ev, ErrorEvent):
                        raise ev.error
            raise RuntimeError(f"request {i} ended without a finish event")

        async def main() -> list[Completion]:
            gate = asyncio.Semaphore(max_in_flight or max(n, 1))
            return list(await asyncio.gather(*(one(i, gate) for i in range(n))))

        return asyncio.run(main())

    def _on_slot_event(self, kind: str) -> None:
        self._tell(AdapterCacheEvent(kind))

    def _on_slot_load(self, version: AdapterVersion, seconds: float) -> None:
        self._tell(AdapterLoadEvent(version.name, seconds))


def _no_store(record: AdapterRecord) -> AdapterWeights:
    raise AdapterNotFoundError(record.name)
