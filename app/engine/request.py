"""The request the engine runs and the events it streams back.

A :class:`GenerationRequest` carries token ids, sampling parameters and a
resolved :class:`Stance` (the adapter versions and weights the request will use
from start to end, even if the registry changes meanwhile). Events flow back
through the request's ``sink`` callable, which the engine calls from its own
thread, and to every listener (metrics). No model code here.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from app.engine.sampling import SamplingParams
from app.registry.adapter import AdapterWeights

_ids = itertools.count()

BASE_LABEL = "base"
BLEND_LABEL = "blend"


@dataclass(frozen=True)
class Stance:
    """The adapters a request runs with: none (base), one with weight 1, or a weighted blend.

    Build one with :meth:`base`, :meth:`single` or :meth:`blend`. Each term's weights carry
    their own :class:`~app.registry.adapter.AdapterVersion` (``weights.id``), which pins the
    exact content the request runs with.

    Attributes:
        label: metrics label, the adapter name, ``"base"`` or ``"blend"``.
        terms: (adapter weights, weight) pairs; empty for the base model.
    """

    label: str
    terms: tuple[tuple[AdapterWeights, float], ...] = ()

    @classmethod
    def base(cls) -> Stance:
        """The base model, no adapter."""
        return cls(BASE_LABEL)

    @classmethod
    def single(cls, weights: AdapterWeights) -> Stance:
        """One adapter with weight 1, labelled with its name."""
        return cls(weights.id.name, ((weights, 1.0),))

    @classmethod
    def blend(cls, terms: Mapping[AdapterWeights, float]) -> Stance:
        """A weighted blend ``{weights: weight}``, terms in the mapping's order, labelled ``"blend"``."""
        return cls(BLEND_LABEL, tuple((w, float(x)) for w, x in terms.items()))


@dataclass
class AdmittedEvent:
    """The engine took the request into the batch (its adapters are pinned; prefill starts).

    Attributes:
        prompt_tokens: prompt length, in tokens.
        at: ``time.perf_counter()`` of admission, in seconds.
        cached_tokens: leading prompt tokens whose KV came from the prefix cache (not prefilled again).
    """

    prompt_tokens: int
    at: float = 0.0
    cached_tokens: int = 0


@dataclass
class TokenEvent:
    """One generated token.

    The engine sends token ids only; :class:`~app.engine.engine.RequestStream` fills ``text`` on the
    consumer side (incremental detokenisation, stop strings), so no text work runs on the model thread.

    Attributes:
        token_id: the token.
        logprob: its log-probability (natural log) when the request asked for logprobs, else ``None``.
        top_logprobs: the most likely (token id, logprob) pairs of that step, most likely first.
        at: ``time.perf_counter()`` when it was sampled, in seconds.
        ends: the token is the EOS or a stop token that ends the request (it has no text).
        text: the newly safe text (may be empty while held back for a stop string or a partial character).
    """

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    at: float = 0.0
    ends: bool = False
    text: str = ""


@dataclass
class FinishEvent:
    """The end of a request.

    Attributes:
        reason: ``"stop"`` (EOS, stop token or stop string), ``"length"`` (max_tokens) or ``"cancelled"``.
        prompt_tokens, completion_tokens: usage counts, in tokens.
        ttft_s: time to first token, in seconds.
        at: ``time.perf_counter()`` of the end, in seconds.
        text: text released at the end (held-back tail), filled on the consumer side; may be empty.
        cached_tokens: prompt tokens whose KV came from the prefix cache.
        mask_s: seconds spent computing this request's token masks (constrained decoding; 0 otherwise).
    """

    reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None = None
    at: float = 0.0
    text: str = ""
    cached_tokens: int = 0
    mask_s: float = 0.0


@dataclass
class ErrorEvent:
    """The engine failed this request; ``error`` is the exception (a :class:`~app.errors.StanceServeError`)."""

    error: BaseException


#: The one stream of per-request events: admitted, tokens, then exactly one finish or error.
Event = AdmittedEvent | TokenEvent | FinishEvent | ErrorEvent


@dataclass
class RejectedEvent:
    """The request was refused before it was queued (the waiting queue was full).

    Given to listeners only: the caller of :meth:`~app.engine.engine.Engine.open` gets the error raised.

    Attributes:
        reason: why, ``"queue_full"``.
        at: ``time.perf_counter()`` of the refusal, in seconds.
    """

    reason: str = "queue_full"
    at: float = field(default_factory=time.perf_counter)


@dataclass
class PreemptedEvent:
    """The request's sequence was preempted: the KV cache ran out of blocks, so its blocks were freed and it waits
    at the head of the queue to recompute its KV (its client sees only a longer wait, and the same tokens).

    Given to listeners only: the request's own stream goes on as if nothing happened.

    Attributes:
        tokens: the KV positions the sequence held when it was preempted, in tokens: its prompt and generated
            tokens but the newest (whose KV the next decode step would have written).
        at: ``time.perf_counter()`` of the preemption, in seconds.
    """

    tokens: int
    at: float = field(default_factory=time.perf_counter)


#: What a listener may see of a request: its stream's events, its rejection, or its preemptions.
RequestEvent = Event | RejectedEvent | PreemptedEvent

#: Something that watches every request's events (metrics): ``listener(request, event)``, called on the
#: engine thread; it must be quick and must not raise (a raising listener is logged and skipped).
Listener = Callable[["GenerationRequest", RequestEvent], None]


@dataclass
class Completion:
    """One request's whole answer, drained from its event stream (:meth:`~app.engine.engine.Engine.generate_batch`).

    Attributes:
        tokens: every :class:`TokenEvent`, in order (the last one may be the ending EOS or stop token: ``ends``).
        text: the answer's text (every token's released text and the finish's held-back tail).
        finish: the request's :class:`FinishEvent` (reason, usage, timings).
    """

    tokens: list[TokenEvent]
    text: str
    finish: FinishEvent

    @property
    def token_ids(self) -> list[int]:
        """The sampled token ids, ending token included."""
        return [t.token_id for t in self.tokens]


@dataclass
class GenerationRequest:
    """One completion to run.

    Attributes:
        prompt_ids: the prompt's token ids (chat template already applied).
        params: sampling parameters.
        stance: resolved adapters and weights.
        sink: called with each :data:`Event`, from the engine thread.
        request_id: unique id.
        arrival: ``time.perf_counter()`` at submission, in seconds.
        cancelled: set to true to stop the request at the next step (client went away).
        cancel_reason: the finish reason reported for a cancelled request (``"stop"`` when the consumer
            found a stop string, ``"error"`` when the consumer failed it, ``"cancelled"`` when the client
            went away).
    """

    prompt_ids: list[int]
    params: SamplingParams
    stance: Stance
    sink: Callable[[Event], None]
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    cancel_reason: str = "cancelled"
