"""The error responses each route documents in the OpenAPI schema.

Every non-2xx answer of the service has the one body :class:`~app.schemas.ErrorResponse`
(``{"error": {"message", "type", "code", "param"}}``, see :mod:`app.errors`); these
tables tell generated clients and schema-driven testers which statuses each router's
routes can return. Not here: producing the errors.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.schemas import ErrorResponse

_WHY = {
    400: "Bad request: a field out of range, an unsupported OpenAI parameter, or a prompt over the context.",
    401: "Missing or wrong admin key.",
    403: "Admin route called from a client that may not (no admin key configured, not on loopback).",
    404: "Unknown model, adapter, named blend or route.",
    405: "Method not allowed on this route.",
    409: "The name is taken (send ?replace=true), a named blend's member adapter is missing, or an adapter that a "
         "named blend uses cannot be deleted.",
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

#: Routes whose 200 is plain text. They keep the default ``response_class`` media type out of it (pass
#: ``response_class=Response``): FastAPI documents a route's error responses in its ``response_class``'s media type,
#: so ``PlainTextResponse`` there would document the JSON error bodies as ``text/plain``.
TEXT_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Plain text."}
}


def _inlined(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` put in place (embedded in the document, they would not resolve)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def sub(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: sub(v) for k, v in node.items() if k != "$ref"}
            return {**sub(defs[node["$ref"].rsplit("/", 1)[-1]]), **out} if "$ref" in node else out
        return [sub(v) for v in node] if isinstance(node, list) else node

    return sub(schema)


def sse_response(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a route that streams with ``"stream": true``: server-sent events, each one's ``data`` a
    ``chunk`` or an error body as JSON, and ``[DONE]`` last.

    Each event is described by ``itemSchema`` (OpenAPI 3.2's keyword for the items of a sequential media type, as
    FastAPI documents its own event streams); the JSON answer comes from the route's ``response_model``.
    """
    data = {
        "type": "string",
        "anyOf": [
            {"const": "[DONE]"},
            {"contentMediaType": "application/json",
             "contentSchema": {"anyOf": [_inlined(chunk), _inlined(ErrorResponse)]}},
        ],
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    sse = {"text/event-stream": {"itemSchema": event}}
    return {200: {"content": sse, "description": "JSON, or SSE when streaming."}}
