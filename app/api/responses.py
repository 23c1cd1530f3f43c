"""The error responses each route documents in the OpenAPI schema.

Every non-2xx answer of the service has the one body :class:`~app.schemas.ErrorResponse`
(``{"error": {"message", "type", "code", "param"}}``, see :mod:`app.errors`); these
tables tell generated clients and schema-driven testers which statuses each router's
routes can return. Not here: producing the errors.
"""

from __future__ import annotations

from typing import Any

from app.schemas import ErrorResponse

_WHY = {
    400: "Bad request: a field out of range, an unsupported OpenAI parameter, or a prompt over the context.",
    401: "Missing or wrong admin key.",
    403: "Admin route called from a client that may not (no admin key configured, not on loopback).",
    404: "Unknown model, adapter or route.",
    405: "Method not allowed on this route.",
    409: "An adapter of that name exists (upload with ?replace=true).",
    413: "Request body (or upload) over the size limit.",
    422: "Request validation failed; `param` names the field.",
    429: "The request queue is full; retry after Retry-After seconds.",
    500: "Internal error; the message carries a request id that is also in the server log.",
    503: "The model is still loading, or the engine stopped.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI ``responses`` table of ``statuses``, each with the error body."""
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}


INFERENCE_ERRORS = errors(400, 404, 405, 413, 422, 429, 500, 503)
ADMIN_ERRORS = errors(400, 401, 403, 404, 405, 409, 413, 422, 500, 503)
OPS_ERRORS = errors(405, 500)

#: Streaming responses (``"stream": true``) are server-sent events.
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "JSON, or SSE when streaming."}
}
