"""The playground: a web page to compare, dial and save stances, served from the package; and its live numbers.

* ``GET /`` and ``GET /playground`` redirect to ``/playground/``, the page (``app/static/playground``: plain
  HTML, CSS and JavaScript modules, no build step). Only the files shipped in that folder are served, each
  with ``Cache-Control: no-cache`` (revalidated by ETag) and, for the page, a Content-Security-Policy
  that allows nothing but this origin.
* ``GET /playground/config.json``: what the page needs to know before it asks: the base model's name,
  the blend bounds, and whether admin calls (save, export, upload) need the admin key here.
* ``GET /metrics/stances``: tokens/s and the running TTFT, token and request totals of every stance, read
  from the same registry as ``/metrics`` (:meth:`app.metrics.Metrics.stance_summary`); the page's live
  chart polls it.

The page talks to the public API only (``/v1/models``, ``/v1/chat/completions``, ``/v1/stances``,
``/v1/export-blend``, ``/v1/adapters``); nothing here generates.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from app.api.responses import OPS_ERRORS
from app.config import MAX_BLEND_ADAPTERS
from app.deps import MetricsDep, StateDep, admin_refusal

#: The page's folder, shipped as package data (pyproject's ``[tool.setuptools.package-data]``).
STATIC_DIR = Path(__file__).resolve().parents[2] / "static" / "playground"
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
#: Every file the page may load, by name; nothing else under /playground/ is served.
FILES = {p.name: p for p in sorted(STATIC_DIR.iterdir()) if p.is_file() and p.suffix in _TYPES} \
    if STATIC_DIR.is_dir() else {}
#: The page loads nothing from elsewhere and runs no inline script.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")

router = APIRouter(tags=["ops"], responses=OPS_ERRORS)


def _to_page(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{request.scope.get('root_path', '')}/playground/", status_code=307)


@router.get("/", include_in_schema=False)
async def root(request: Request) -> RedirectResponse:
    """The playground is the front page."""
    return _to_page(request)


@router.get("/playground", include_in_schema=False)
async def playground_bare(request: Request) -> RedirectResponse:
    return _to_page(request)


@router.get("/playground/config.json", include_in_schema=False)
async def playground_config(request: Request, state: StateDep) -> JSONResponse:
    """The base model's name (``null`` while it loads), the blend bounds, and the admin rule for this client."""
    s = state.settings
    key_required = bool(s.admin_key and s.admin_key.get_secret_value())
    refusal = None if key_required else admin_refusal(request, s.trusted_proxies)
    engine = state.engine
    return JSONResponse({
        "model": engine.model_name if engine is not None else None,
        "max_blend_weight": engine.max_blend_weight if engine is not None else s.max_blend_weight,
        "max_blend_adapters": MAX_BLEND_ADAPTERS,
        "default_max_tokens": s.default_max_tokens,
        "admin": {"key_required": key_required, "allowed": key_required or refusal is None, "reason": refusal},
    }, headers={"Cache-Control": "no-store"})


@router.get("/playground/", include_in_schema=False)
async def playground_index() -> FileResponse:
    return _file("index.html")


@router.get("/playground/{name}", include_in_schema=False)
async def playground_file(name: str) -> FileResponse:
    return _file(name)


def _file(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise HTTPException(404, f"no playground file {name!r}")
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if path.suffix == ".html":
        headers |= {"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"}
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=headers)


class StanceNumbers(BaseModel):
    """One stance's live numbers (the ``stance`` label of ``/metrics``)."""

    stance: str
    tokens_per_second: float
    ttft_seconds_sum: float
    ttft_count: int
    generation_tokens: int
    requests: int


class StanceNumbersList(BaseModel):
    """``GET /metrics/stances``: ``time`` in Unix seconds; ``window_s`` is the tokens/s gauge's window."""

    object: str = "list"
    time: float
    window_s: float
    data: list[StanceNumbers]


@router.get("/metrics/stances", response_model=StanceNumbersList)
async def stance_numbers(m: MetricsDep) -> StanceNumbersList:
    """Per stance: tokens/s now, and running totals (TTFT sum and count, generated tokens, finished requests)."""
    rows = [StanceNumbers(stance=k, tokens_per_second=v["tokens_per_second"], ttft_seconds_sum=v["ttft_seconds_sum"],
                          ttft_count=int(v["ttft_count"]), generation_tokens=int(v["generation_tokens"]),
                          requests=int(v["requests"]))
            for k, v in m.stance_summary().items()]
    return StanceNumbersList(time=time.time(), window_s=m.token_rate.window_s, data=rows)
