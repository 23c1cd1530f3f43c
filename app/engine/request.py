"""The request the engine runs and the events it streams back.

A :class:`GenerationRequest` carries token ids, sampling parameters and a
resolved :class:`Stance` (the adapter versions and weights the request will use
from start to end, even if the registry changes meanwhile). Events flow back
through the request's ``sink`` callable, which the engine calls from its own
thread. No model code here.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.engine.sampling import SamplingParams
from app.registry.adapter import AdapterWeights

_ids = itertools.count()

BASE_LABEL = "base"
BLEND_LABEL = "blend"


@dataclass(frozen=True)
class Stance:
    """The adapters a request runs with: none (base), one with weight 1, or a weighted blend.

    Attributes:
        label: metrics label, the adapter name, ``"base"`` or ``"blend"``.
        terms: (adapter version, weight) pairs; empty for the base model.
        names: the adapter names of ``terms`` in order, for responses and logs.
    """

    label: str
    terms: tuple[tuple[AdapterWeights, float], ...] = ()
    names: tuple[str, ...] = ()

    @classmethod
    def base(cls) -> Stance:
        return cls(BASE_LABEL)


@dataclass
class TokenEvent:
    """One generated token.

    Attributes:
        token_id: the token.
        text: the newly safe text (may be empty while held back for a stop string or a partial character).
        logprob: the token's log-probability (natural log) when the request asked for logprobs, else ``None``.
        top_logprobs: the most likely (token id, logprob) pairs of that step, most likely first.
    """

    token_id: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class FinishEvent:
    """The end of a request.

    Attributes:
        reason: ``"stop"`` (EOS or stop string), ``"length"`` (max_tokens) or ``"cancelled"``.
        text: text released at the end (held-back tail), may be empty.
        prompt_tokens, completion_tokens: usage counts, in tokens.
        ttft_s: time to first token, in seconds.
    """

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None = None


@dataclass
class ErrorEvent:
    """The engine failed this request; ``error`` is the exception."""

    error: BaseException


Event = TokenEvent | FinishEvent | ErrorEvent


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
    """

    prompt_ids: list[int]
    params: SamplingParams
    stance: Stance
    sink: Callable[[Event], None]
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
