"""Request body size limits: a pure ASGI middleware that answers HTTP 413 before an oversize body is stored.

:class:`BodySizeLimitMiddleware` gives every HTTP route a byte limit (a default, and
per-path overrides such as the adapter upload). A request whose ``Content-Length``
exceeds it gets the 413 at once, without the app running or the body being read. A
body without ``Content-Length`` (chunked transfer) is counted as it streams in: the
message that would cross the limit is never handed to the app, the app's read fails,
and the client gets the 413 — so no more than the limit is ever buffered, parsed or
spooled to disk (a multipart parse that fails this way closes its temporary files).

The 413 body is the service's JSON error contract
(``RequestTooLargeError(...).to_body()``: ``{"error": {"message", "type", "code",
"param"}}``, code ``request_too_large``, ``param`` null). Whatever the app does with
the failed read (FastAPI turns a body-parsing exception into a 400, a handler may
catch it), the response it then sends is dropped and the 413 is sent instead, unless
the app had already started its response before the limit tripped; then the
exception is re-raised so the server aborts the connection.

It does not limit anything but HTTP request bodies (not WebSocket messages, headers
or response sizes), and it does not rate-limit. Per-path limits match the exact
ASGI ``scope["path"]`` (no templates, no ``root_path`` stripping).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from app.errors import RequestTooLargeError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from app.config import Settings

#: Room for multipart framing (boundaries, part headers, text fields) on top of ``max_adapter_bytes``, in bytes.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024

#: The adapter upload route, the one route whose limit is ``max_adapter_bytes`` (+ overhead), not ``max_request_bytes``.
UPLOAD_PATH = "/v1/adapters"

LimitFor = Callable[[str], int | None]


def route_limits(settings: Settings) -> dict[str, int]:
    """The per-path limits of the service, in bytes: the adapter upload gets ``max_adapter_bytes`` + 1 MiB."""
    return {UPLOAD_PATH: settings.max_adapter_bytes + MULTIPART_OVERHEAD_BYTES}


class _BodyTooLarge(Exception):
    """Raised from the wrapped ``receive`` once the streamed body passes the limit (private to this module)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")
        self.limit = limit


def too_large_body(limit: int, content_length: int | None = None) -> bytes:
    """The 413 JSON body for ``limit`` (bytes), naming the declared ``content_length`` (bytes) when known."""
    size = f" of {content_length} bytes" if content_length is not None else ""
    err = RequestTooLargeError(f"request body{size} exceeds the limit of {limit} bytes")
    return json.dumps(err.to_body()).encode()


class BodySizeLimitMiddleware:
    """Refuse request bodies larger than the route's limit with HTTP 413, without storing them.

    Args:
        app: the ASGI app to wrap.
        default_limit: the limit of every path not in ``limits``, in bytes (>= 0).
        limits: per-path limits in bytes, either a mapping from the exact request path
            (``scope["path"]``) or a callable ``path -> bytes`` that returns ``None`` for
            "use the default".

    Raises:
        ValueError: a negative ``default_limit``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        default_limit: int,
        limits: Mapping[str, int] | LimitFor | None = None,
    ) -> None:
        if default_limit < 0:
            raise ValueError(f"default_limit must be >= 0 bytes, got {default_limit}")
        self.app = app
        self.default_limit = default_limit
        self.limits = limits

    def limit_for(self, path: str) -> int:
        """The body limit of ``path``, in bytes."""
        if self.limits is None:
            return self.default_limit
        limit = self.limits.get(path) if isinstance(self.limits, Mapping) else self.limits(path)
        return self.default_limit if limit is None else limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(send, limit, declared)
            return

        received = 0
        tripped = False
        started = False  # a response start reached the client

        async def limited_receive() -> Message:
            nonlocal received, tripped
            if tripped:
                raise _BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = True
                    raise _BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if tripped:
                return  # the app's answer to the failed read (400, 500...) is replaced by the 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not tripped or started:
                raise
        if tripped:
            if started:
                raise _BodyTooLarge(limit)
            await _send_413(send, limit, None)


def _content_length(scope: Scope) -> int | None:
    """The request's ``Content-Length`` in bytes, or ``None`` if absent or not a plain decimal number."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            v = value.strip()
            return int(v) if v.isdigit() else None
    return None


async def _send_413(send: Send, limit: int, content_length: int | None) -> None:
    body = too_large_body(limit, content_length)
    await send(
        {
            "type": "http.response.start",
            "status": RequestTooLargeError.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
