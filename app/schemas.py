"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has the endpoint).

The chat and text completion shapes follow OpenAI's API so the official
``openai`` client works unchanged; stanceserve's extras (``stances``,
``top_k``, ``ignore_eos``...) arrive through the client's ``extra_body``. Every
sampling field is checked against the range the engine can take; OpenAI fields
that stanceserve does not implement are refused (HTTP 400
``unsupported_parameter``), never silently ignored; fields OpenAI does not
define are logged as ignored, as vLLM does. This module holds shapes and field
checks only.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from app.config import MAX_BLEND_ADAPTERS
from app.engine import SamplingParams, blend_size_problem
from app.errors import InvalidRequestError, UnsupportedParameterError
from app.registry.adapter import AdapterRecord, thaw_json

logger = logging.getLogger(__name__)


#: Seeds ``torch.Generator.manual_seed`` accepts: a signed or unsigned 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
#: Most choices one request may ask for (``n``); each is a row of the batch.
MAX_N = 16
#: Most logprobs per token (OpenAI's ``top_logprobs`` maximum).
MAX_LOGPROBS = 20
_INT32 = 2**31 - 1
#: Smallest ``repetition_penalty``: the penalty divides positive logits, and a tiny one (say 1e-309, a valid
#: float > 0) makes them infinite, failing the request with HTTP 500.
MIN_REPETITION_PENALTY = 0.01
#: ``top_p`` values below this are passed on as this: the engine compares in float32, where a top_p under
#: ~1e-45 (say 5e-324, a valid float > 0) reads as 0 and drops even the top token (HTTP 500). Any top_p this
#: small keeps only the most likely token, as 1e-6 does.
MIN_TOP_P = 1e-6

#: OpenAI request fields that change what the answer must be and that stanceserve does not implement.
#: A request that sets one (to anything but its "off" value) gets HTTP 400 ``unsupported_parameter``.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    # field: values that mean "off" and are accepted
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
#: OpenAI fields accepted and ignored because they do not change the answer (bookkeeping only).
IGNORED_OPENAI_FIELDS = frozenset(
    {"user", "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key"}
)


class MessageToolCallFunction(BaseModel):
    name: str
    arguments: str | dict[str, Any] = Field("{}", description="The call's arguments (a JSON string, as OpenAI sends).")


class MessageToolCall(BaseModel):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageToolCallFunction


class ChatMessage(BaseModel):
    """One chat turn; ``content`` may be a string or OpenAI's list of text parts (``None`` for an assistant turn
    that only called tools)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, description="An assistant turn's earlier tool calls.")
    tool_call_id: str | None = Field(None, description="A tool turn: the call it answers.")
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")


class StreamOptions(BaseModel):
    include_usage: bool = False


# What the validators below check, said in the OpenAPI schema (``WithJsonSchema`` documents, it does not validate:
# the validators word the errors). The vocabulary, the registered stances and ``max_blend_weight`` are the server's.
_STOP_TEXT = {"type": "string", "minLength": 1, "maxLength": 256}
_STOP_SCHEMA = {"anyOf": [_STOP_TEXT, {"type": "array", "items": _STOP_TEXT, "maxItems": 4}, {"type": "null"}]}
_TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": _INT32}
#: Keys: ASCII digits, 9 at most so every id the pattern allows is under 2**31 (no vocabulary nears 10**9 tokens).
_LOGIT_BIAS_SCHEMA = {
    "type": "object", "propertyNames": {"pattern": "^[0-9]{1,9}$"},
    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}, "maxProperties": 1024,
}
_STANCES_SCHEMA = {
    "type": "object", "additionalProperties": {"type": "number"},
    "minProperties": 1, "maxProperties": MAX_BLEND_ADAPTERS,
}


def _document_refusals(schema: dict[str, Any]) -> None:
    """Put the refused OpenAI fields (:data:`UNSUPPORTED_FIELDS`) in a request's schema, each taking only its "off"
    values: the body otherwise allows any extra field, and a client would learn of the refusal only from the 400."""
    props = schema.setdefault("properties", {})
    for name, off in UNSUPPORTED_FIELDS.items():
        text = f"Not supported: accepted only as {json.dumps(off[-1])}."
        props.setdefault(name, {"enum": list(off), "description": text})


class _GenerationFields(BaseModel):
    """Fields shared by chat and text completions, each checked against the range the engine can take."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, json_schema_extra=_document_refusals)

    model: str = Field(..., description="The base model's name, or a registered adapter (stance) name.")
    max_tokens: int | None = Field(
        None, ge=1, le=_INT32, description="Most tokens to generate; prompt + max_tokens must fit the context."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=_INT32, description="0 or -1 = off (stanceserve/vLLM extra).")
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="Seed for reproducible sampling: a 64-bit integer, signed or not."
    )
    stop: Annotated[str | list[str] | None, WithJsonSchema(_STOP_SCHEMA)] = Field(
        None, description="Up to 4 stop strings."
    )
    stop_token_ids: list[Annotated[int, WithJsonSchema(_TOKEN_ID_SCHEMA)]] | None = Field(
        None, max_length=64, description="Token ids that end the completion (vLLM extra)."
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_tokens_as_token_ids: bool = Field(
        False, description='Logprobs name each token "token_id:<id>" instead of its text (vLLM extra).')
    response_format: dict[str, Any] | None = Field(
        None, description='Constrain the output: {"type": "text" | "json_object"} or {"type": "json_schema", '
                          '"json_schema": {"name": ..., "schema": {...}}}.')
    guided_json: dict[str, Any] | str | None = Field(None, description="A JSON schema the output matches (vLLM extra).")
    guided_regex: str | None = Field(None, description="A regular expression the output matches (vLLM extra).")
    guided_choice: list[str] | None = Field(
        None, min_length=1, description="The output is one of these strings (vLLM extra).")
    guided_grammar: str | None = Field(
        None, description="A Lark or GBNF grammar the output matches (vLLM extra).")
    structured_outputs: dict[str, Any] | None = Field(
        None, description='vLLM\'s newer form: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}.')
    n: int = Field(1, ge=1, le=MAX_N, description=f"Number of choices (at most {MAX_N}).")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's presence penalty.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's frequency penalty.")
    repetition_penalty: float = Field(
        1.0, ge=MIN_REPETITION_PENALTY, le=10.0,
        description="CTRL repetition penalty over prompt and output tokens (vLLM extra).",
    )
    logit_bias: Annotated[dict[str, float], WithJsonSchema(_LOGIT_BIAS_SCHEMA)] | None = Field(
        None, max_length=1024, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    min_tokens: int = Field(0, ge=0, le=_INT32, description="End-of-sequence is masked until this many tokens (vLLM extra).")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks).")
    stances: Annotated[dict[str, float], WithJsonSchema(_STANCES_SCHEMA)] | None = Field(
        None,
        description='Weighted blend of adapters, e.g. {"curious-uncertainty": 0.7, "confident-expertise": 0.3}. '
        "Every targeted layer computes W x + sum_i w_i (alpha_i/r_i) B_i A_i x. At most 8 adapters; "
        "|w| at most the server's max_blend_weight (default 16).",
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        if any(len(s) > 256 for s in stops):
            raise ValueError("stop strings must be at most 256 characters")
        return stops

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 0 <= t <= _INT32 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not (key.isascii() and key.isdigit()) or int(key) > _INT32:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias of token {key} must lie in [-100, 100], got {bias}")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _GenerationFields:
        extra = self.model_extra or {}
        for name, off in UNSUPPORTED_FIELDS.items():
            if name in extra and extra[name] not in off:
                raise UnsupportedParameterError(
                    f"{name!r} is not supported by this server; remove it (accepted only as {off[-1]!r})", param=name
                )
        unknown = sorted(k for k in extra if k not in UNSUPPORTED_FIELDS and k not in IGNORED_OPENAI_FIELDS)
        if unknown:
            logger.warning("request fields ignored (not part of the API): %s", ", ".join(unknown[:20]))
        return self

    def logprobs_count(self) -> int | None:
        """How many top logprobs per token the client wants (``None``: no logprobs)."""
        return None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The engine's :class:`SamplingParams` for this request (choice 0; see :meth:`choice_seed`)."""
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=max(self.top_p, MIN_TOP_P),
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=list(self.stop or []),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()},
            stop_token_ids=list(self.stop_token_ids or []),
            min_tokens=self.min_tokens,
            logprobs=self.logprobs_count(),
        )

    def explicit_max_tokens(self) -> bool:
        return self.max_tokens is not None


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice ``index`` of an ``n > 1`` request: ``seed + index``, wrapped into the 64-bit range."""
    if seed is None or index == 0:
        return seed
    return (seed + index - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN


def _chat_schema_extra(schema: dict[str, Any]) -> None:
    _document_refusals(schema)
    # the rule of :meth:`ChatCompletionRequest.logprobs_count`: ``top_logprobs`` (a number) needs ``logprobs: true``
    schema["if"] = {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]}
    schema["then"] = {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}


class ChatCompletionRequest(_GenerationFields):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(json_schema_extra=_chat_schema_extra)

    messages: list[ChatMessage] = Field(..., min_length=1)
    tools: list[dict[str, Any]] | None = Field(
        None, max_length=128, description="Functions the model may call ({'type': 'function', 'function': {...}}).")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description="none, auto (default with tools), required, or {'type': 'function', 'function': {'name'}}.")
    parallel_tool_calls: bool = Field(True, description="Allow more than one call in an answer.")
    max_completion_tokens: int | None = Field(None, ge=1, le=_INT32, description="OpenAI's newer name for max_tokens.")
    logprobs: bool = Field(False, description="Return the log-probability of each output token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With logprobs: the most likely tokens to list per position."
    )

    def logprobs_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        p = super().sampling(default_max_tokens)
        if self.max_completion_tokens is not None and self.max_tokens is None:
            p.max_tokens = self.max_completion_tokens
        return p

    def explicit_max_tokens(self) -> bool:
        return self.max_tokens is not None or self.max_completion_tokens is not None


class CompletionRequest(_GenerationFields):
    """``POST /v1/completions``: ``prompt`` is a string (or a one-element list of strings)."""

    #: the schema of the list says "exactly one" (checked by :meth:`_one_prompt`, which words the error)
    prompt: str | Annotated[
        list[str], WithJsonSchema({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1})
    ]
    echo: bool = False
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Return the logprobs of each token and of this many top tokens."
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    """One candidate token of a position (OpenAI chat format)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """The chosen token of a position and its most likely alternatives (OpenAI chat format)."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions logprobs: parallel lists, one entry per output token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(..., description="The arguments, as a JSON string.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    stances: dict[str, float] | None = None


class ToolCallDelta(BaseModel):
    """A streamed tool call: the first chunk of a call has ``id``, ``type`` and the name; later ones add to
    ``function.arguments``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    stances: dict[str, float] | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed text completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ErrorBody(BaseModel):
    """The one error shape of every non-2xx response (OpenAI's)."""

    message: str
    type: str
    code: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    """An entry of ``GET /v1/models``; adapters name the base model as ``parent`` (as vLLM does)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stanceserve"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    device: str | None = Field(None, description="Where the model is served: cpu, cuda:0... (stanceserve extra).")
    dtype: str | None = Field(
        None, description="The dtype it computes in: float32, bfloat16 or float16 (stanceserve extra).")
    stances: dict[str, float] | None = Field(
        None, description="A named blend's recipe {adapter: weight} (stanceserve extra; absent for other models).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterInfo(BaseModel):
    """``GET /v1/adapters/{name}``: the public view of an :class:`~app.registry.adapter.AdapterRecord`."""

    name: str
    version: int
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    sha256: str
    created: int
    base_model: str | None = None
    description: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_record(cls, rec: AdapterRecord) -> AdapterInfo:
        """The record's public fields (no server path); ``created`` in whole seconds, metadata as plain JSON."""
        fields = {name: getattr(rec, name) for name in cls.model_fields}
        fields.update(created=int(rec.created), metadata=thaw_json(rec.metadata))
        return cls.model_validate(fields)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


#: Stance names, as the registry checks them (``app.registry.validation.NAME_RE``); for the OpenAPI schema.
STANCE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class LoadLoRARequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter``: an adapter folder on the server's disk."""

    lora_name: str = Field(..., json_schema_extra={"pattern": STANCE_NAME_PATTERN})
    lora_path: str


class UnloadLoRARequest(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    lora_name: str


class NamedBlendRequest(BaseModel):
    """``POST /v1/stances``: register a name for a live weighted blend of registered adapters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(..., json_schema_extra={"pattern": STANCE_NAME_PATTERN},
                      description="The model name clients will use, e.g. friendly-expert.")
    stances: Annotated[dict[str, float], WithJsonSchema(_STANCES_SCHEMA)] = Field(
        ..., description='{adapter name: weight}, e.g. {"curious-uncertainty": 0.6, "confident-expertise": 0.4}; '
        "1 to 8 registered adapters, |weight| at most the server's max_blend_weight.")
    description: str | None = Field(None, max_length=1000, description="Free text.")

    @field_validator("stances")
    @classmethod
    def _stances(cls, v: dict[str, float]) -> dict[str, float]:
        problem = blend_size_problem(len(v))  # the weights and members are the resolver's, with the registry at hand
        if problem:
            raise ValueError(problem)
        return v


class NamedBlendInfo(BaseModel):
    """A named blend: its recipe, version and registration time (Unix seconds)."""

    object: Literal["stance"] = "stance"
    name: str
    stances: dict[str, float]
    version: int
    created: int
    description: str | None = None

    @classmethod
    def from_blend(cls, blend: Any) -> NamedBlendInfo:
        """From an :class:`~app.registry.blends.NamedBlend`; ``created`` in whole seconds."""
        return cls(name=blend.name, stances=dict(blend.stances), version=blend.version, created=int(blend.created),
                   description=blend.description)


class NamedBlendList(BaseModel):
    object: Literal["list"] = "list"
    data: list[NamedBlendInfo]
