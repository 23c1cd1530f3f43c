"""The interactive API docs (``/docs``: Swagger UI, ``/redoc``: ReDoc), served without any network access.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so they stay blank on an offline host. Following
FastAPI's "self-hosting JavaScript and CSS for docs" recipe, :func:`install_offline_docs` serves the pages
itself, with the JavaScript, CSS and favicon from the ``fastapi-offline`` package (Swagger UI 5 and ReDoc 2,
MIT) mounted at :data:`STATIC_URL`. The app must be created with ``docs_url=None, redoc_url=None``.

Only the pages and their assets: the OpenAPI schema itself (``/openapi.json``) is FastAPI's.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: Where the assets are served.
STATIC_URL = "/docs-static"


def assets_dir() -> Path:
    """The folder of the packaged assets: ``swagger-ui-bundle.js``, ``swagger-ui.css``, ``redoc.standalone.js``,
    ``favicon.png``."""
    return Path(fastapi_offline.__file__).resolve().parent / "static"


def install_offline_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add ``docs_url`` (Swagger UI), its OAuth2 redirect page, ``redoc_url`` (ReDoc) and the asset mount to ``app``.

    Every URL the pages load is on this server (prefixed with the request's ``root_path`` behind a proxy).
    """
    app.mount(STATIC_URL, StaticFiles(directory=assets_dir()), name="docs-static")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = app.swagger_ui_oauth2_redirect_url

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{redirect_url}" if redirect_url else None,
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    if redirect_url:
        @app.get(redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png", with_google_fonts=False,
        )
