"""Domain errors of stanceserve, and their one mapping to HTTP.

Library code (engine, registry, training) raises these; only
:func:`install_error_handlers` knows about HTTP. Every error body has the
OpenAI-style shape ``{"error": {"message", "type", "code", "param"}}`` where
``param`` names the bad field or file when there is one.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

logger = logging.getLogger(__name__)


class StanceServeError(Exception):
    """Base of all domain errors.

    Attributes:
        status_code: HTTP status the API answers with.
        code: short machine-readable error code.
        param: the request field or uploaded file at fault, if any.
    """

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers for the response (e.g. Retry-After)."""
        return {}

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": type(self).__name__,
                "code": self.code,
                "param": self.param,
            }
        }


class InvalidRequestError(StanceServeError):
    """A request field is out of range or malformed (HTTP 422)."""

    status_code = 422
    code = "invalid_request"


class AdapterNotFoundError(StanceServeError):
    """No adapter of that name is registered (HTTP 404)."""

    status_code = 404
    code = "adapter_not_found"

    def __init__(self, name: str, *, param: str | None = "model") -> None:
        super().__init__(f"adapter {name!r} is not registered", param=param)
        self.name = name


class AdapterLookupError(StanceServeError):
    """An adapter named on the command line (a folder path or a name) is in none of the places searched.

    Raised by the training tools (:func:`training.adapter_lookup.resolve_adapter`), not by the API; its
    HTTP mapping is the not-found one (404) should it ever reach it.

    Attributes:
        name: the adapter as given.
        searched: every folder looked at, in the order tried.
    """

    status_code = 404
    code = "adapter_not_found"

    def __init__(self, name: str, searched: list[tuple[str, str]], *, note: str | None = None) -> None:
        where = "; ".join(f"{what}: {path}" for what, path in searched)
        message = f"no adapter {name!r} (a folder with adapter_config.json): looked for {where}"
        super().__init__(message + (f"; {note}" if note else ""), param="adapter")
        self.name = name
        self.searched = [Path(path) for _, path in searched]


class AdapterExistsError(StanceServeError):
    """Upload under a name already taken, without ``?replace=true`` (HTTP 409)."""

    status_code = 409
    code = "adapter_exists"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"adapter {name!r} already exists; upload with ?replace=true to replace it",
            param="name",
        )
        self.name = name


class AdapterValidationError(StanceServeError):
    """An uploaded or on-disk adapter does not fit the base model or the rules (HTTP 422).

    ``param`` names the offending file (``adapter_config.json``,
    ``adapter_model.safetensors``, the archive) or form field.
    """

    status_code = 422
    code = "invalid_adapter"


class AdapterTooLargeError(AdapterValidationError):
    """An upload exceeds ``max_adapter_bytes`` (HTTP 413)."""

    status_code = 413
    code = "adapter_too_large"


class StanceNotFoundError(StanceServeError):
    """No named blend of that name is registered (HTTP 404)."""

    status_code = 404
    code = "stance_not_found"

    def __init__(self, name: str, *, param: str | None = "name") -> None:
        super().__init__(f"named blend {name!r} is not registered", param=param)
        self.name = name


class StanceExistsError(StanceServeError):
    """A named blend's name is taken: by another named blend (without ``?replace=true``), by an
    adapter, or the other way round, an adapter upload under a named blend's name (HTTP 409)."""

    status_code = 409
    code = "stance_exists"


class BlendMemberMissingError(StanceServeError):
    """A named blend names an adapter that is not registered (HTTP 409: registering that adapter resolves it)."""

    status_code = 409
    code = "blend_member_missing"


class AdapterInUseError(StanceServeError):
    """Deleting an adapter that named blends use is refused until those blends are deleted (HTTP 409)."""

    status_code = 409
    code = "adapter_in_use"

    def __init__(self, name: str, blends: list[str], *, param: str | None = "name") -> None:
        super().__init__(
            f"adapter {name!r} is a member of the named blend(s) {', '.join(map(repr, blends))}; "
            "delete those first (DELETE /v1/stances/{name})",
            param=param,
        )
        self.name = name
        self.blends = blends


class InvalidBlendError(InvalidRequestError):
    """A ``stances`` blend names an unknown adapter, has too many terms or a non-finite weight (HTTP 422)."""

    code = "invalid_blend"


class QueueFullError(StanceServeError):
    """The waiting queue is full (HTTP 429 with Retry-After)."""

    status_code = 429
    code = "queue_full"

    def __init__(self, message: str = "server busy: request queue is full", retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class UnauthorizedError(StanceServeError):
    """Missing or wrong admin key on a mutating endpoint (HTTP 401)."""

    status_code = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(StanceServeError):
    """Mutation from a non-loopback client while no admin key is configured (HTTP 403)."""

    status_code = 403
    code = "forbidden"


class ContextLengthExceededError(StanceServeError):
    """Prompt plus ``max_tokens`` do not fit the model's context (HTTP 400, OpenAI's ``context_length_exceeded``)."""

    status_code = 400
    code = "context_length_exceeded"


class InvalidConstraintError(StanceServeError):
    """A structured-output constraint (``response_format``, ``tools``, ``tool_choice``, vLLM's ``guided_*`` or
    ``structured_outputs``) that is malformed, or that the grammar compiler refuses; ``param`` names the field."""

    status_code = 400
    code = "invalid_constraint"


class UnsupportedParameterError(StanceServeError):
    """An OpenAI request field that stanceserve does not implement was set (HTTP 400).

    Refused rather than ignored, so a client never gets an answer that silently differs from what it asked for.
    """

    status_code = 400
    code = "unsupported_parameter"


class RequestTooLargeError(StanceServeError):
    """The request body exceeds the route's byte limit (HTTP 413); raised while the body streams in."""

    status_code = 413
    code = "request_too_large"


class GenerationError(StanceServeError):
    """One request's generation failed inside the engine (HTTP 500); its neighbours in the batch go on.

    Examples: non-finite logits (a blend that overflows), a sampling failure, a detokenizer error.
    """

    status_code = 500
    code = "generation_failed"


class InternalError(StanceServeError):
    """An unexpected failure (HTTP 500). The message carries the request id that is also in the server log."""

    status_code = 500
    code = "internal_error"


class NotReadyError(StanceServeError):
    """The model is not loaded yet or the engine stopped (HTTP 503)."""

    status_code = 503
    code = "not_ready"


class ModelLoadError(StanceServeError):
    """The base model could not be fetched or loaded (fatal at start-up)."""

    status_code = 500
    code = "model_load_failed"


#: ``code`` of the error body for HTTP errors raised by the framework itself (unknown route, wrong method...).
_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    413: "request_too_large", 415: "unsupported_media_type", 429: "rate_limited", 503: "not_ready",
}


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The error contract ``{"error": {"message", "type", "code", "param"}}`` for an HTTP status."""
    return {
        "error": {"message": message, "type": _HTTP_CODES.get(status, "error"), "code": code or _HTTP_CODES.get(
            status, "http_error"), "param": param}
    }


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Any) -> str:
    """``Allow`` of a 405: every method some route serves on the request's path.

    Starlette's router names only the methods of the first route that matched the path, so ``GET`` and
    ``POST /v1/adapters`` (two routes) would answer ``Allow: GET``.
    """
    routes = request.app.router.routes
    return ", ".join(
        m for m in _METHODS if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)
    )


def install_error_handlers(app: Any) -> None:
    """Map every error to the one JSON contract: domain errors, validation errors, HTTP errors, and crashes.

    Unhandled exceptions are logged with a fresh request id (also in the response) and answered
    500 ``internal_error``; nothing but ``{"error": {...}}`` ever leaves the service.

    Args:
        app: the FastAPI application.
    """
    @app.exception_handler(StanceServeError)
    async def _domain(_: Request, exc: StanceServeError) -> JSONResponse:
        if exc.status_code == 500:
            logger.error("%s: %s", type(exc).__name__, exc.message)
        return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # a body that is not JSON: 400, as OpenAI answers it
            detail = (first.get("ctx") or {}).get("error", "invalid JSON")
            return JSONResponse(error_body(400, f"could not parse the JSON body of the request: {detail}"),
                                status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request"))
        body = InvalidRequestError(message, param=param).to_body()
        body["error"]["details"] = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in errors[:20]
        ]
        return JSONResponse(body, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        body = error_body(exc.status_code, str(exc.detail))
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            headers["Allow"] = allowed
        return JSONResponse(body, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        rid = f"err-{uuid.uuid4().hex[:16]}"
        logger.error("unhandled error in %s %s (request id %s)", request.method, request.url.path, rid, exc_info=exc)
        err = InternalError(f"internal error (request id {rid}); the server log has the details")
        return JSONResponse(err.to_body(), status_code=500, headers={"X-Request-ID": rid})
