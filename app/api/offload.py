"""Keep request bodies off the event loop: JSON is parsed in a worker thread.

FastAPI parses a JSON body with ``json.loads`` on the event loop; a body of
megabytes then stalls every other request (``/health``, other streams) for as
long as the parse takes. :class:`OffloadedJSONRoute` is an ``APIRoute`` whose
request parses JSON in the threadpool instead, and turns a body nested too deep
for Python's parser into a 400 that says so instead of a ``RecursionError``. A body that is
not JSON at all (or not UTF-8) is a 400 too, whose message says where parsing stopped, as
OpenAI answers it (FastAPI's own answer is a 422 with ``param: "1"``). Body size is
bounded elsewhere (:mod:`app.api.limits`); validation into the pydantic model
stays FastAPI's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

#: The end of every invalid-JSON message: what the API expects.
_EXPECTS = "the API expects a JSON object, sent with Content-Type: application/json"


def _loads(body: bytes) -> Any:
    """``json.loads(body)``; an HTTP 400 with a clear message when ``body`` is not JSON.

    Raises:
        HTTPException: 400 for invalid JSON (the message names the line and column), text that is not UTF-8, or
            nesting too deep for Python's parser.
    """
    try:
        return json.loads(body)
    except RecursionError as e:  # FastAPI turns anything but an HTTPException here into a vague 400
        raise HTTPException(400, "the JSON body is nested too deeply to parse") from e
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"could not parse the JSON body of the request: {e.msg} (line {e.lineno}, column "
                                 f"{e.colno}); {_EXPECTS}") from e
    except UnicodeDecodeError as e:
        raise HTTPException(400, f"could not parse the JSON body of the request: it is not UTF-8 text "
                                 f"(byte {e.start}); {_EXPECTS}") from e


class _OffloadedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await run_in_threadpool(_loads, await self.body())
        return self._json


class OffloadedJSONRoute(APIRoute):
    """A route whose JSON body is parsed in a worker thread (see the module docstring)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(_OffloadedJSONRequest(request.scope, request.receive))

        return route_handler
