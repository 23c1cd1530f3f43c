"""Request and response bodies of the HTTP API (OpenAI-compatible where OpenAI has the endpoint).

The chat and text completion shapes follow OpenAI's API so the official
``openai`` client works unchanged; stanceserve's extras (``stances``,
``top_k``, ``ignore_eos``) arrive through the client's ``extra_body``. Unknown
OpenAI fields are ignored. This module holds shapes and field checks only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.sampling import SamplingParams


class ChatMessage(BaseModel):
    """One chat turn; ``content`` may be a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., description="The base model's name, or a registered adapter (stance) name.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off (stanceserve/vLLM extra).")
    seed: int | None = Field(None, description="Seed for reproducible sampling.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    ignore_eos: bool = Field(False, description="Keep generating past EOS (benchmarks).")
    stances: dict[str, float] | None = Field(
        None,
        description='Weighted blend of adapters, e.g. {"curious-uncertainty": 0.7, "confident-expertise": 0.3}. '
        "Every targeted layer computes W x + sum_i w_i (alpha_i/r_i) B_i A_i x. At most 8 adapters.",
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The engine's :class:`SamplingParams` for this request."""
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=list(self.stop or []),
            ignore_eos=self.ignore_eos,
        )


class ChatCompletionRequest(_GenerationFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        p = super().sampling(default_max_tokens)
        if self.max_completion_tokens is not None and self.max_tokens is None:
            p.max_tokens = self.max_completion_tokens
        return p


class CompletionRequest(_GenerationFields):
    """``POST /v1/completions``: ``prompt`` is a string (or a one-element list of strings)."""

    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    stances: dict[str, float] | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    stances: dict[str, float] | None = None


class ModelCard(BaseModel):
    """An entry of ``GET /v1/models``; adapters name the base model as ``parent`` (as vLLM does)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "stanceserve"
    root: str
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterInfo(BaseModel):
    """``GET /v1/adapters/{name}``."""

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


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class LoadLoRARequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter``: an adapter folder on the server's disk."""

    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    lora_name: str
