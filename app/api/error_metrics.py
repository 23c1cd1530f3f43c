"""Counting every error response by HTTP status and error code: ``stanceserve_http_errors_total{status, code}``.

A pure ASGI middleware, outermost, so it also sees the 413s that :mod:`app.api.limits` sends before the app
runs, the framework's own 404/405s and every domain error :mod:`app.errors` maps; an exception that escapes the
app is counted as 500 ``internal_error``, the answer :mod:`app.errors` gives it. For a response with status
>= 400 it reads ``error.code`` from the JSON body (the service's one error contract; at most
:data:`MAX_ERROR_BODY` bytes are looked at) and calls :meth:`app.metrics.Metrics.count_error`; a body without one
counts as ``http_<status>``. It changes no response. It does not count errors that end a stream after its
200 (those are ``stanceserve_requests_total{status="error"}``), nor the start-up warm-up request, nor anything before the lifespan made the metrics.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: ASGI scope extension that marks the start-up warm-up request (:func:`app.main._warm_routes`): not counted.
WARM_UP_EXTENSION = "stanceserve.warm_up"

#: Largest error body parsed for its code, in bytes (error bodies are a few hundred bytes).
MAX_ERROR_BODY = 64 * 1024


def error_code(body: bytes, status: int) -> str:
    """``error.code`` of a JSON error body, or ``http_<status>`` when the body has none (or is not such JSON)."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    return code if isinstance(code, str) and code else f"http_{status}"


class ErrorMetricsMiddleware:
    """Count each response with status >= 400 in the app's :class:`~app.metrics.Metrics` (``app.state.service``).

    Args:
        app: the ASGI app it wraps.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or WARM_UP_EXTENSION in scope.get("extensions", {}):
            await self.app(scope, receive, send)
            return
        status = 0
        body = bytearray()
        counted = False

        async def watch(message: Message) -> None:
            nonlocal status, counted
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and status >= 400 and not counted:
                room = MAX_ERROR_BODY - len(body)
                body.extend(message.get("body", b"")[: max(room, 0)])
                if not message.get("more_body", False) or len(body) >= MAX_ERROR_BODY:
                    counted = True
                    _count(scope, status, error_code(bytes(body), status))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:  # Starlette's outermost ServerErrorMiddleware answers it: 500 internal_error (app.errors)
            if not counted:
                _count(scope, 500, "internal_error")
            raise


def _count(scope: Scope, status: int, code: str) -> None:
    service: Any = getattr(getattr(scope.get("app"), "state", None), "service", None)
    metrics = getattr(service, "metrics", None)
    if metrics is not None:
        metrics.count_error(status, code)
