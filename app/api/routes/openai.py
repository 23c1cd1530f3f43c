"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

``model`` is the base model's name or a registered adapter; a blend goes in the
extra field ``stances``. Streaming uses server-sent events with OpenAI's chunk
shapes and a final ``data: [DONE]``. ``n > 1`` runs ``n`` rows in the batch
(choice ``i`` seeded with ``seed + i``).

These handlers translate HTTP to engine calls and back. Everything that can
take long (JSON parsing, chat templating, tokenisation, stance resolution with
a cold adapter read) runs in a worker thread, never on the event loop; the
engine does the generating.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.api.offload import OffloadedJSONRoute
from app.api.responses import INFERENCE_ERRORS, sse_response
from app.api.structured import Constraint, chat_messages, constraint_for, parse_tool_output, tool_turns_as_user
from app.catalog import StanceCatalog
from app.deps import CatalogDep, EngineDep, SettingsDep
from app.engine import Engine, ErrorEvent, FinishEvent, RequestStream, TokenEvent
from app.errors import InvalidRequestError, StanceServeError
from app.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    choice_seed,
)

router = APIRouter(prefix="/v1", tags=["openai"], route_class=OffloadedJSONRoute, responses=INFERENCE_ERRORS)

GenerationBody = ChatCompletionRequest | CompletionRequest


# ---------------------------------------------------------------------------- opening requests
def _chat_prompt_ids(engine: Engine, body: ChatCompletionRequest, constraint: Constraint | None) -> list[int]:
    messages = chat_messages(body.messages, constraint)
    try:
        return engine.chat_prompt_ids(messages)
    except StanceServeError:
        raise
    except Exception as e:  # noqa: BLE001 - the chat template refused the conversation
        if not any(m["role"] == "tool" for m in messages):
            raise InvalidRequestError(f"the model's chat template refused the messages: {e}", param="messages") from e
    ids = [None] * (len(messages) - len(body.messages)) + [m.tool_call_id for m in body.messages]
    try:
        return engine.chat_prompt_ids(tool_turns_as_user(messages, ids))
    except StanceServeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InvalidRequestError(f"the model's chat template refused the messages: {e}", param="messages") from e


def _open_choices(
    engine: Engine, catalog: StanceCatalog, body: GenerationBody, default_max_tokens: int, max_messages: int,
    rid: str, loop,
) -> tuple[list[RequestStream], int, Constraint | None]:
    """Blocking part of a request, run in a worker thread: prompt ids, stance, the output's constraint
    (compiled here, so a bad schema is refused before anything is queued), and one engine row per choice.

    Returns:
        the ``n`` streams, the prompt length in tokens, and the constraint (``None``: free output).

    Raises:
        StanceServeError: with ``param`` naming the request's field (``messages`` for chat, ``prompt`` for
            completions).
    """
    chat = isinstance(body, ChatCompletionRequest)
    try:
        constraint = constraint_for(body)
        grammar = None if constraint is None else engine.grammars.compile(
            constraint.grammar, constraint.kind, constraint.param)
        if chat:
            if len(body.messages) > max_messages:
                raise InvalidRequestError(
                    f"{len(body.messages)} messages; this server accepts at most {max_messages}", param="messages"
                )
            prompt_ids = _chat_prompt_ids(engine, body, constraint)
        else:
            prompt_ids = engine.text_prompt_ids(body.prompt_text())
        base = body.sampling(default_max_tokens)
        engine.check_token_ids(base)
        stance = catalog.resolve(body.model, body.stances)
        streams: list[RequestStream] = []
        try:
            for i in range(body.n):
                params = body.sampling(default_max_tokens)
                params.seed = choice_seed(params.seed, i)
                params.grammar = grammar
                streams.append(engine.open(
                    prompt_ids, params, stance, loop=loop, request_id=rid if body.n == 1 else f"{rid}-{i}",
                    explicit_max_tokens=body.explicit_max_tokens(),
                ))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return streams, len(prompt_ids), constraint
    except StanceServeError as e:
        if chat and e.param == "prompt":
            e.param = "messages"
        raise


async def _open(
    engine: Engine, catalog: StanceCatalog, body: GenerationBody, settings, rid: str
) -> tuple[list[RequestStream], int, Constraint | None]:
    loop = asyncio.get_running_loop()
    return await run_in_threadpool(
        _open_choices, engine, catalog, body, settings.default_max_tokens, settings.max_messages, rid, loop
    )


# ---------------------------------------------------------------------------- collecting events
@dataclass
class _Choice:
    """What one choice produced so far."""

    parts: list[str] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None


def _raise(ev: ErrorEvent) -> None:
    if isinstance(ev.error, StanceServeError):
        raise ev.error
    raise RuntimeError(f"generation failed: {ev.error}") from ev.error


async def _watch_disconnect(request: Request, streams: list[RequestStream]) -> None:
    """Cancel ``streams`` if the client of a non-streaming request goes away."""
    while not all(s.done for s in streams):
        if await request.is_disconnected():
            for s in streams:
                s.cancel()
            return
        await asyncio.sleep(0.25)


async def _collect_one(stream: RequestStream) -> _Choice:
    out = _Choice()
    async for ev in stream:
        if isinstance(ev, TokenEvent):
            out.parts.append(ev.text)
            out.tokens.append(ev)
        elif isinstance(ev, FinishEvent):
            out.parts.append(ev.text)
            out.finish = ev
        elif isinstance(ev, ErrorEvent):
            _raise(ev)
    if out.finish is None:
        raise RuntimeError("stream ended without a finish event")
    return out


async def _collect(request: Request, streams: list[RequestStream]) -> list[_Choice]:
    watcher = asyncio.create_task(_watch_disconnect(request, streams))
    try:
        return list(await asyncio.gather(*(_collect_one(s) for s in streams)))
    finally:
        watcher.cancel()
        for s in streams:
            s.cancel()


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Events of all ``streams`` as ``(choice index, event)``, in arrival order."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        async for ev in s:
            await queue.put((i, ev))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_ = len(streams)
    try:
        while open_:
            i, ev = await queue.get()
            if isinstance(ev, (FinishEvent, ErrorEvent)):
                open_ -= 1
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


def _reason(fin: FinishEvent) -> str:
    return "length" if fin.reason == "length" else "stop"


def _chat_answer(text: str, fin: FinishEvent, constraint: Constraint | None) -> tuple[str | None, list[ToolCall] | None,
                                                                                     str]:
    """``(content, tool_calls, finish_reason)`` of a finished chat choice: a completed tool-format answer is
    unwrapped; one cut by ``max_tokens`` stays raw text with ``length``."""
    reason = _reason(fin)
    if constraint is None or constraint.kind != "tools" or reason != "stop":
        return text, None, reason
    content, calls = parse_tool_output(text, constraint)
    if calls:
        return None, [ToolCall.model_validate(c) for c in calls], "tool_calls"
    return content, None, reason


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


# ---------------------------------------------------------------------------- logprobs formats
def _token_label(engine: Engine, token_id: int, as_ids: bool) -> str:
    """A token as logprobs name it: its text, or ``"token_id:<id>"`` with vLLM's ``return_tokens_as_token_ids``."""
    return f"token_id:{token_id}" if as_ids else engine.token_text(token_id)


def _chat_logprobs(engine: Engine, tokens: list[TokenEvent], as_ids: bool = False) -> ChatLogprobs:
    def entry(tok: int, lp: float) -> dict[str, Any]:
        text = engine.token_text(tok)
        return {"token": _token_label(engine, tok, as_ids), "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = [
        TokenLogprob(**entry(t.token_id, t.logprob), top_logprobs=[TopLogprob(**entry(i, lp)) for i, lp in t.top_logprobs])
        for t in tokens
        if t.logprob is not None
    ]
    return ChatLogprobs(content=content)


def _completion_logprobs(engine: Engine, tokens: list[TokenEvent], offset: int = 0,
                         as_ids: bool = False) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for t in tokens:
        if t.logprob is None:
            continue
        text = engine.token_text(t.token_id)
        out.tokens.append(_token_label(engine, t.token_id, as_ids))
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({_token_label(engine, i, as_ids): lp for i, lp in t.top_logprobs})
        out.text_offset.append(offset)
        offset += len(text)
    return out


# ---------------------------------------------------------------------------- SSE
def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump_json(exclude_unset=True) if isinstance(obj, BaseModel) else _json(obj)
    return f"data: {data}\n\n"


def _json(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


async def _stream_chat(
    engine: Engine, streams: list[RequestStream], body: ChatCompletionRequest, rid: str, created: int, prompt_tokens: int,
    constraint: Constraint | None = None,
) -> AsyncIterator[str]:
    """SSE chunks of a chat completion. Under ``tools`` each choice's JSON is held until it ends, then sent as
    OpenAI's ``delta.tool_calls`` (a chunk with each call's id and name, then one with its arguments) or as
    ``delta.content``."""
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model}
    tools = constraint is not None and constraint.kind == "tools"
    held: dict[int, list[str]] = {i: [] for i in range(len(streams))}
    want_lp = body.logprobs and not tools
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    completion = 0
    opened = False
    async for i, ev in _merged(streams):
        if not opened:
            # the role chunks wait for the engine's first event: a request still queued has sent no byte, so a
            # Ray Serve ingress can still replay it on another replica (app/ray_serve/deployments.py)
            opened = True
            for j in range(len(streams)):
                yield _sse(ChatCompletionChunk(**head, choices=[
                    ChatChunkChoice(index=j, delta=ChatDelta(role="assistant", content=""), finish_reason=None)
                ]))
        if isinstance(ev, TokenEvent) and tools:
            held[i].append(ev.text)
        elif isinstance(ev, TokenEvent):
            if ev.text or (want_lp and ev.logprob is not None):
                choice = ChatChunkChoice(index=i, delta=ChatDelta(content=ev.text), finish_reason=None)
                if want_lp:
                    choice.logprobs = _chat_logprobs(engine, [ev], body.return_tokens_as_token_ids)
                yield _sse(ChatCompletionChunk(**head, choices=[choice]))
        elif isinstance(ev, FinishEvent):
            completion += ev.completion_tokens
            reason = _reason(ev)
            if tools:
                content, calls, reason = _chat_answer("".join(held[i]) + ev.text, ev, constraint)
                for chunk in _tool_chunks(i, content, calls):
                    yield _sse(ChatCompletionChunk(**head, choices=[chunk]))
            elif ev.text:
                yield _sse(ChatCompletionChunk(
                    **head, choices=[ChatChunkChoice(index=i, delta=ChatDelta(content=ev.text), finish_reason=None)]
                ))
            yield _sse(ChatCompletionChunk(
                **head, choices=[ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=reason)]
            ))
        elif isinstance(ev, ErrorEvent):
            yield _sse(_error_body(ev))
            break
    else:
        if include_usage:
            yield _sse(ChatCompletionChunk(**head, choices=[], usage=_usage(prompt_tokens, completion)))
    yield "data: [DONE]\n\n"


def _tool_chunks(i: int, content: str | None, calls: list[ToolCall] | None) -> list[ChatChunkChoice]:
    if not calls:
        return [ChatChunkChoice(index=i, delta=ChatDelta(content=content or ""), finish_reason=None)] if content else []
    out = []
    for k, c in enumerate(calls):
        out.append(ChatChunkChoice(index=i, finish_reason=None, delta=ChatDelta(tool_calls=[ToolCallDelta(
            index=k, id=c.id, type="function", function={"name": c.function.name, "arguments": ""})])))
        out.append(ChatChunkChoice(index=i, finish_reason=None, delta=ChatDelta(tool_calls=[ToolCallDelta(
            index=k, function={"arguments": c.function.arguments})])))
    return out


async def _stream_completion(
    engine: Engine, streams: list[RequestStream], body: CompletionRequest, rid: str, created: int, prompt_tokens: int
) -> AsyncIterator[str]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
    want_lp = body.logprobs is not None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    completion = 0
    async for i, ev in _merged(streams):
        if isinstance(ev, TokenEvent):
            if ev.text or (want_lp and ev.logprob is not None):
                choice = CompletionChoice(index=i, text=ev.text, finish_reason=None)
                if want_lp:
                    choice.logprobs = _completion_logprobs(engine, [ev], as_ids=body.return_tokens_as_token_ids)
                yield _sse(CompletionChunk(**head, choices=[choice]))
        elif isinstance(ev, FinishEvent):
            completion += ev.completion_tokens
            yield _sse(CompletionChunk(**head, choices=[CompletionChoice(index=i, text=ev.text, finish_reason=_reason(ev))]))
        elif isinstance(ev, ErrorEvent):
            yield _sse(_error_body(ev))
            break
    else:
        if include_usage:
            yield _sse(CompletionChunk(**head, choices=[], usage=_usage(prompt_tokens, completion)))
    yield "data: [DONE]\n\n"


def _error_body(ev: ErrorEvent) -> dict:
    err = ev.error if isinstance(ev.error, StanceServeError) else StanceServeError(str(ev.error))
    return err.to_body()


# ---------------------------------------------------------------------------- routes
@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=sse_response(ChatCompletionChunk))
async def chat_completions(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, catalog: CatalogDep, settings: SettingsDep
):
    """Chat completion in the stance named by ``model`` (or the blend in ``stances``)."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    streams, prompt_tokens, constraint = await _open(engine, catalog, body, settings, rid)
    if body.stream:
        gen = _stream_chat(engine, streams, body, rid, created, prompt_tokens, constraint)
        return StreamingResponse(gen, media_type="text/event-stream")
    choices = await _collect(request, streams)
    answers = [_chat_answer("".join(c.parts), c.finish, constraint) for c in choices]
    return ChatCompletionResponse(
        id=rid,
        created=created,
        model=body.model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatCompletionMessage(content=content, tool_calls=calls),
                logprobs=_chat_logprobs(engine, c.tokens, body.return_tokens_as_token_ids) if body.logprobs else None,
                finish_reason=reason,
            )
            for i, (c, (content, calls, reason)) in enumerate(zip(choices, answers))
        ],
        usage=_usage(prompt_tokens, sum(c.finish.completion_tokens for c in choices)),
        stances=body.stances,
    )


@router.post("/completions", response_model=CompletionResponse, responses=sse_response(CompletionChunk))
async def completions(
    body: CompletionRequest, request: Request, engine: EngineDep, catalog: CatalogDep, settings: SettingsDep
):
    """Text completion of ``prompt`` (no chat template) in the chosen stance."""
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    streams, prompt_tokens, _ = await _open(engine, catalog, body, settings, rid)
    if body.stream:
        gen = _stream_completion(engine, streams, body, rid, created, prompt_tokens)
        return StreamingResponse(gen, media_type="text/event-stream")
    choices = await _collect(request, streams)
    prefix = body.prompt_text() if body.echo else ""
    return CompletionResponse(
        id=rid,
        created=created,
        model=body.model,
        choices=[
            CompletionChoice(
                index=i,
                text=prefix + "".join(c.parts),
                logprobs=(_completion_logprobs(engine, c.tokens, len(prefix), body.return_tokens_as_token_ids)
                          if body.logprobs is not None else None),
                finish_reason=_reason(c.finish),
            )
            for i, c in enumerate(choices)
        ],
        usage=_usage(prompt_tokens, sum(c.finish.completion_tokens for c in choices)),
        stances=body.stances,
    )


@router.get("/models", response_model=ModelList)
async def list_models(engine: EngineDep, catalog: CatalogDep, settings: SettingsDep) -> ModelList:
    """The base model, every registered adapter, then every named blend with its recipe (``stances``);
    adapters and blends name the base as ``parent``."""
    now, served = int(time.time()), engine.served
    cards = [ModelCard(id=engine.model_name, created=now, root=settings.model, max_model_len=engine.max_model_len,
                       **served)]
    for rec in catalog.list():
        cards.append(ModelCard(id=rec.name, created=int(rec.created), root=rec.name, parent=engine.model_name,
                               **served))
    for blend in catalog.list_blends():
        cards.append(ModelCard(id=blend.name, created=int(blend.created), root=blend.name, parent=engine.model_name,
                               stances=dict(blend.stances), **served))
    return ModelList(data=cards)
