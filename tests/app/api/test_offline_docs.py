"""/docs and /redoc load every asset from the server itself: nothing from a CDN, so they work offline."""

from __future__ import annotations

import re

import pytest

from tests.factories import make_client, wait_ready


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with make_client(tmp_path_factory.mktemp("store")) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(("page", "must_load"), [
    ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}),
    ("/redoc", {"redoc.standalone.js"}),
])
def test_docs_pages_load_only_local_assets(client, page, must_load):
    r = client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", r.text) + re.findall(r"url: '([^']+)'", r.text)
    assert urls and not [u for u in urls if "//" in u], urls  # no http(s):// nor protocol-relative URL
    assert "cdn" not in r.text.lower() and "fonts.googleapis" not in r.text
    assert {u.rsplit("/", 1)[-1] for u in urls} >= must_load
    for u in urls:
        asset = client.get(u)
        assert asset.status_code == 200 and len(asset.content) > 100, u


def test_the_swagger_ui_renders_openapi_3_1(client):
    """FastAPI's schema is OpenAPI 3.1, which Swagger UI reads from version 5 on."""
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get("/docs-static/swagger-ui-bundle.js").text
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.\d+\.\d+"', bundle)
    assert version and int(version.group(1)) >= 5 and "isOAS31" in bundle
