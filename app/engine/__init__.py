"""The batched multi-adapter engine: its public names.

Other packages (the API, training, benchmarks) import from here: the facade :class:`Engine`, its
configuration :class:`EngineConfig`, what a request is made of (:class:`Stance`, :class:`SamplingParams`,
:class:`GenerationRequest`), what comes back (the events and :class:`Completion`), and what an observer of
the engine sees (:class:`Observer`, :class:`EngineStats`, the adapter cache events), and the one set of stance
rules (:class:`StanceResolver`). The other modules of
this package (forward pass, KV cache, LoRA layers, scheduler...) are internal: their names may change.
Loading a model is not the engine's: see :mod:`app.model_loader`.
"""

from app.engine.config import EngineConfig
from app.engine.engine import AdapterSource, Engine
from app.engine.observe import AdapterCacheEvent, AdapterLoadEvent, EngineEvent, EngineStats, Observer
from app.engine.request import (
    BASE_LABEL,
    BLEND_LABEL,
    AdmittedEvent,
    Completion,
    ErrorEvent,
    Event,
    FinishEvent,
    GenerationRequest,
    PreemptedEvent,
    RejectedEvent,
    RequestEvent,
    Stance,
    TokenEvent,
)
from app.engine.sampling import SamplingParams
from app.engine.stances import StanceResolver, blend_size_problem, without_zero_weights
from app.engine.stream import RequestStream

__all__ = [
    "AdapterCacheEvent", "AdapterLoadEvent", "AdapterSource", "AdmittedEvent", "Completion", "Engine",
    "EngineConfig", "EngineEvent", "EngineStats", "ErrorEvent", "Event", "FinishEvent", "GenerationRequest",
    "Observer", "PreemptedEvent", "RejectedEvent", "RequestEvent", "RequestStream", "SamplingParams", "Stance", "StanceResolver",
    "TokenEvent", "BASE_LABEL", "BLEND_LABEL", "blend_size_problem", "without_zero_weights",
]
