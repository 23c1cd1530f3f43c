"""Keep request bodies off the event loop: JSON is parsed in a worker thread.

FastAPI parses a JSON body with ``json.loads`` on the event loop; a body of
megabytes then stalls every other request (``/health``, other streams) for as
long as the parse takes. :class:`OffloadedJSONRoute` is an ``APIRoute`` whose
request parses JSON in the threadpool instead, and turns a body nested too deep
for Python's parser into a 400 that says so instead of a ``RecursionError``. Body size is
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


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError as e:  # FastAPI turns anything but an HTTPException here into a vague 400
        raise HTTPException(400, "the JSON body is nested too deeply to parse") from e


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
