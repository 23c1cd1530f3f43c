"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

``model`` is the base model's name or a registered adapter; a blend goes in the
extra field ``stances``. Streaming uses server-sent events with OpenAI's chunk
shapes and a final ``data: [DONE]``. These handlers translate HTTP to engine
calls and back; the engine does the work.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from app.deps import EngineDep, SettingsDep, StoreDep
from app.engine.engine import Engine, RequestStream
from app.engine.request import ErrorEvent, FinishEvent, Stance, TokenEvent
from app.errors import StanceServeError
from app.schemas import (
    ChatChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)

router = APIRouter(prefix="/v1", tags=["openai"])


async def _watch_disconnect(request: Request, stream: RequestStream) -> None:
    """Cancel ``stream`` if the client of a non-streaming request goes away."""
    while not stream.done:
        if await request.is_disconnected():
            stream.cancel()
            return
        await asyncio.sleep(0.25)


async def _collect(request: Request, stream: RequestStream) -> tuple[str, FinishEvent]:
    watcher = asyncio.create_task(_watch_disconnect(request, stream))
    parts: list[str] = []
    try:
        async for ev in stream:
            if isinstance(ev, TokenEvent):
                parts.append(ev.text)
            elif isinstance(ev, FinishEvent):
                parts.append(ev.text)
                return "".join(parts), ev
            elif isinstance(ev, ErrorEvent):
                if isinstance(ev.error, StanceServeError):
                    raise ev.error
                raise RuntimeError(f"generation failed: {ev.error}") from ev.error
    finally:
        watcher.cancel()
        stream.cancel()
    raise RuntimeError("stream ended without a finish event")


def _usage(fin: FinishEvent) -> Usage:
    return Usage(
        prompt_tokens=fin.prompt_tokens,
        completion_tokens=fin.completion_tokens,
        total_tokens=fin.prompt_tokens + fin.completion_tokens,
    )


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _stream_sse(
    stream: RequestStream, chunk: Callable[[str | None, str | None], dict], include_usage: bool, usage_base: dict
) -> AsyncIterator[str]:
    """SSE lines for a stream; ``chunk(text, finish_reason)`` builds one OpenAI chunk."""
    try:
        first = chunk(None, None)
        if first:
            yield _sse(first)
        async for ev in stream:
            if isinstance(ev, TokenEvent):
                if ev.text:
                    yield _sse(chunk(ev.text, None))
            elif isinstance(ev, FinishEvent):
                reason = "length" if ev.reason == "length" else "stop"
                if ev.text:
                    yield _sse(chunk(ev.text, None))
                yield _sse(chunk(None, reason))
                if include_usage:
                    yield _sse({**usage_base, "choices": [], "usage": _usage(ev).model_dump()})
            elif isinstance(ev, ErrorEvent):
                err = ev.error if isinstance(ev.error, StanceServeError) else StanceServeError(str(ev.error))
                yield _sse(err.to_body())
        yield "data: [DONE]\n\n"
    finally:
        stream.cancel()


def _stance_and_stream(
    engine: Engine, body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int], default_max: int
) -> tuple[Stance, RequestStream]:
    stance = engine.resolve_stance(body.model, body.stances)
    return stance, engine.open(prompt_ids, body.sampling(default_max), stance)


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep):
    """Chat completion in the stance named by ``model`` (or the blend in ``stances``)."""
    prompt_ids = engine.chat_prompt_ids([{"role": m.role, "content": m.text()} for m in body.messages])
    _, stream = _stance_and_stream(engine, body, prompt_ids, settings.default_max_tokens)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
        sent_role = False

        def chunk(text: str | None, finish: str | None) -> dict:
            nonlocal sent_role
            delta: dict[str, str] = {}
            if not sent_role:
                delta["role"] = "assistant"
                sent_role = True
                if text is None and finish is None:
                    delta["content"] = ""
            if text is not None:
                delta["content"] = text
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream_sse(stream, chunk, include_usage, base), media_type="text/event-stream")
    text, fin = await _collect(request, stream)
    return ChatCompletionResponse(
        id=rid,
        created=created,
        model=body.model,
        choices=[ChatChoice(message=ChatCompletionMessage(content=text), finish_reason=_reason(fin))],
        usage=_usage(fin),
        stances=body.stances,
    )


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep):
    """Text completion of ``prompt`` (no chat template) in the chosen stance."""
    prompt = body.prompt_text()
    prompt_ids = engine.text_prompt_ids(prompt)
    _, stream = _stance_and_stream(engine, body, prompt_ids, settings.default_max_tokens)
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}

        def chunk(text: str | None, finish: str | None) -> dict:
            if text is None and finish is None:
                return {}
            return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream_sse(stream, chunk, include_usage, base), media_type="text/event-stream")
    text, fin = await _collect(request, stream)
    if body.echo:
        text = prompt + text
    return CompletionResponse(
        id=rid,
        created=created,
        model=body.model,
        choices=[CompletionChoice(text=text, finish_reason=_reason(fin))],
        usage=_usage(fin),
        stances=body.stances,
    )


def _reason(fin: FinishEvent) -> str:
    return "length" if fin.reason == "length" else "stop"


@router.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep, store: StoreDep, settings: SettingsDep) -> ModelList:
    """The base model, then every registered adapter with the base as ``parent``."""
    now = int(time.time())
    cards = [ModelCard(id=engine.model_name, created=now, root=settings.model, max_model_len=settings.max_model_len)]
    for rec in store.list():
        cards.append(ModelCard(id=rec.name, created=int(rec.created), root=rec.name, parent=engine.model_name))
    return ModelList(data=cards)
