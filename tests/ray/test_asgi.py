"""Driving an ASGI app with a forwarded request: streamed chunks come one by one, an early close disconnects."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from app.ray_serve.asgi import ForwardedRequest, ResponseHead, call_asgi


def make_app(seen: dict) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"body": (await request.body()).decode(), "client": request.client.host, "q": request.url.query}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def gen():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                seen["closed"] = True

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


async def test_a_request_is_answered_with_its_head_then_its_body():
    req = ForwardedRequest("POST", "/echo", b"a=1", ((b"content-type", b"text/plain"),), b"hello", ("10.1.2.3", 5))
    items = [x async for x in call_asgi(make_app({}), req)]
    assert isinstance(items[0], ResponseHead) and items[0].status == 200
    assert items[0].header("Content-Type") == "application/json"
    assert b"".join(items[1:]) == b'{"body":"hello","client":"10.1.2.3","q":"a=1"}'


async def test_a_stream_comes_chunk_by_chunk_and_closing_it_early_disconnects_the_app():
    seen: dict = {}
    it = call_asgi(make_app(seen), ForwardedRequest("GET", "/stream", client=("127.0.0.1", 1)))
    head = await anext(it)
    assert head.header("content-type").startswith("text/event-stream")
    assert [await anext(it) for _ in range(3)] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    await it.aclose()
    assert seen.get("closed"), "the app's stream was not ended after the consumer went away"


def test_with_header_adds_one():
    head = ResponseHead(200, ((b"a", b"1"),)).with_header("X-Replica", "r1")
    assert head.header("x-replica") == "r1" and head.header("a") == "1"
