"""Drive an ASGI app in-process with one forwarded HTTP request, yielding its response as it is sent.

The ingress ships a request to a replica as a :class:`ForwardedRequest` (plain data Ray can pickle); the
replica runs it through its own FastAPI app with :func:`call_asgi`, which yields a :class:`ResponseHead` and
then the body chunks as the app sends them (SSE chunks one by one), and :func:`asgi_lifespan` runs the app's
lifespan. httpx's ASGI transport buffers whole responses, and streaming is the point here, hence this module.

Closing the iterator early (the client went away) tells the app ``http.disconnect``, which cancels the
engine request as a dropped connection would. It does not parse or check anything itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class ForwardedRequest:
    """One HTTP request as the ingress received it.

    Attributes:
        method, path: as sent (``path`` without the query string).
        query_string: the raw query (bytes, no ``?``).
        headers: raw ``(name, value)`` pairs, names lowercase (bytes).
        body: the whole body (bytes; the ingress bounded its size).
        client: the client's ``(host, port)`` as the ingress saw it, so the replica's admin rule (loopback or
            trusted proxy, :func:`app.deps.admin_refusal`) judges the real client, not the ingress.
        adapters: the names the request references (:class:`app.ray_serve.routing.Route`).
    """

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None
    adapters: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResponseHead:
    """Status and headers of a response (raw ``(name, value)`` byte pairs, as ASGI sends them)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = field(default_factory=tuple)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), decoded as latin-1, or ``None``."""
        key = name.lower().encode("latin-1")
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == key), None)

    def with_header(self, name: str, value: str) -> ResponseHead:
        """A copy with ``name: value`` added."""
        return replace(self, headers=(*self.headers, (name.lower().encode("latin-1"), value.encode("latin-1"))))


def _scope(req: ForwardedRequest) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode("utf-8"),
        "root_path": "", "query_string": req.query_string, "headers": list(req.headers),
        "client": req.client, "server": ("127.0.0.1", 0),
    }


async def call_asgi(app: Any, req: ForwardedRequest, *, drain_s: float = 5.0) -> AsyncIterator[ResponseHead | bytes]:
    """Run ``req`` through the ASGI ``app``; yield its :class:`ResponseHead`, then each non-empty body chunk.

    Args:
        drain_s: after an early close, seconds the app gets to finish (cancel its work) before it is cancelled.

    Raises:
        whatever the app raises before it starts its response (after that, the app's error ends the stream).
    """
    sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(_scope(req), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await sent.get()
            if message is None:  # the app returned (or raised) without finishing a response
                await asyncio.wait({task})
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()
                break
            if message["type"] == "http.response.start":
                yield ResponseHead(int(message["status"]), tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ())))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    break
    finally:
        disconnected.set()
        if not task.done():
            done, _ = await asyncio.wait({task}, timeout=drain_s)
            if not done:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


@contextlib.asynccontextmanager
async def asgi_lifespan(app: Any) -> AsyncIterator[None]:
    """Run the lifespan of a FastAPI/Starlette ``app`` (start-up on enter, shut-down on exit)."""
    async with app.router.lifespan_context(app):
        yield
