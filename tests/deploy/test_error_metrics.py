"""The metrics the dashboard needs beyond the engine's: error responses by status and code, process memory."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app.api.error_metrics import MAX_ERROR_BODY, ErrorMetricsMiddleware, error_code
from app.metrics import Metrics
from tests.factories import chat, make_client, metric, wait_ready


def test_error_responses_are_counted_by_status_and_code(tmp_path):
    with make_client(tmp_path, max_request_bytes=4096) as c:
        wait_ready(c)
        assert chat(c, "no-such-stance").status_code == 404
        assert chat(c, "no-such-stance").status_code == 404
        assert chat(c, "base", max_tokens=-1).status_code == 422
        assert c.post("/v1/chat/completions", content=b"x" * 10_000,
                      headers={"content-type": "application/json"}).status_code == 413  # refused by the limit middleware
        assert c.get("/no/such/route").status_code == 404
        assert c.get("/health").status_code == 200
        text = c.get("/metrics").text
    assert metric(text, "stanceserve_http_errors_total", status="404", code="adapter_not_found") == 2
    assert metric(text, "stanceserve_http_errors_total", status="422", code="invalid_request") == 1
    assert metric(text, "stanceserve_http_errors_total", status="413", code="request_too_large") == 1
    assert metric(text, "stanceserve_http_errors_total", status="404", code="not_found") == 1
    not_ready = metric(text, "stanceserve_http_errors_total", status="503", code="not_ready")  # /ready while loading
    assert metric(text, "stanceserve_http_errors_total") - not_ready == 5  # nothing else: no 2xx, not the warm-up
    assert metric(text, "process_resident_memory_bytes") > 10 * 2**20  # a torch process holds well over 10 MiB


def _app(metrics: Metrics) -> Starlette:
    async def crash(request):
        raise RuntimeError("boom")

    async def teapot(request):
        return PlainTextResponse("no json here", status_code=418)

    async def big(request):
        return JSONResponse({"error": {"code": "big", "pad": "x" * (2 * MAX_ERROR_BODY)}}, status_code=400)

    app = Starlette(routes=[Route("/crash", crash), Route("/teapot", teapot), Route("/big", big)])
    app.state.service = type("S", (), {"metrics": metrics})()
    app.add_middleware(ErrorMetricsMiddleware)
    return app


def test_crashes_and_odd_bodies_are_counted_and_passed_through():
    m = Metrics()
    with TestClient(_app(m), raise_server_exceptions=False) as c:
        assert c.get("/crash").status_code == 500
        r = c.get("/teapot")
        assert (r.status_code, r.text) == (418, "no json here")  # the response is unchanged
        assert c.get("/big").status_code == 400  # the code is past the bytes looked at: counted, not parsed
    text = m.render().decode()
    assert metric(text, "stanceserve_http_errors_total", status="500", code="internal_error") == 1
    assert metric(text, "stanceserve_http_errors_total", status="418", code="http_418") == 1
    assert metric(text, "stanceserve_http_errors_total", status="400") == 1


@pytest.mark.parametrize(("body", "code"), [
    (b'{"error": {"code": "queue_full"}}', "queue_full"),
    (b'{"error": {"code": 7}}', "http_429"),
    (b'{"detail": "x"}', "http_429"),
    (b"[1, 2]", "http_429"),
    (b"\xff", "http_429"),
])
def test_error_code_of_a_body(body, code):
    assert error_code(body, 429) == code
