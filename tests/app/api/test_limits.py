"""BodySizeLimitMiddleware: 413 on Content-Length at once, and on streamed (chunked) bodies before the app gets
more than the limit; JSON routes, raw streaming routes and multipart uploads (whose spooled files are closed).

Content-Length cases use TestClient; chunked cases use httpx.AsyncClient over ASGITransport, which hands the
app one ``http.request`` message per chunk (TestClient joins a generator body into one message).
"""

from __future__ import annotations

import json

import httpx
import pytest
import starlette.formparsers
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.testclient import TestClient

from app.api.limits import MULTIPART_OVERHEAD_BYTES, UPLOAD_PATH, BodySizeLimitMiddleware, route_limits
from app.config import Settings
from app.errors import install_error_handlers

LIMIT = 2048
UPLOAD_LIMIT = 8192
CHUNK = 512


def make_app(seen: dict) -> FastAPI:
    """An app with a JSON route, a raw streaming route, and two multipart routes; ``seen`` records what ran."""
    app = FastAPI()
    install_error_handlers(app)
    seen.update(json_calls=0, raw_bytes=0, raw_done=0, upload_calls=0, file_calls=0)

    @app.post("/json")
    async def json_route(body: dict) -> dict:
        seen["json_calls"] += 1
        return {"keys": len(body)}

    @app.post("/raw")
    async def raw_route(request: Request) -> dict:
        async for chunk in request.stream():  # counts what the handler was actually given
            seen["raw_bytes"] += len(chunk)
        seen["raw_done"] += 1
        return {"n": seen["raw_bytes"]}

    @app.post("/raw-swallow")
    async def raw_swallow(request: Request) -> dict:
        try:
            async for chunk in request.stream():
                seen["raw_bytes"] += len(chunk)
        except Exception:  # a handler that hides the failed read must not turn the 413 into a 200
            pass
        return {"n": seen["raw_bytes"]}

    @app.post("/upload")
    async def upload(request: Request) -> dict:  # like app.api.routes.adapters.upload_adapter
        form = await request.form()
        try:
            seen["upload_calls"] += 1
            return {"fields": len(form)}
        finally:
            await form.close()

    @app.post("/file")
    async def file_param(f: UploadFile = File(...)) -> dict:  # FastAPI parses the form before the handler
        seen["file_calls"] += 1
        return {"size": len(await f.read())}

    app.add_middleware(BodySizeLimitMiddleware, default_limit=LIMIT, limits={"/upload": UPLOAD_LIMIT})
    return app


@pytest.fixture
def seen() -> dict:
    return {}


@pytest.fixture
def client(seen):
    with TestClient(make_app(seen)) as c:
        yield c


def async_client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


class Chunks:
    """An async body of ``n`` chunks of ``size`` bytes that counts how many the server pulled."""

    def __init__(self, n: int, size: int = CHUNK, data: bytes | None = None) -> None:
        self.data = data if data is not None else b"x" * (n * size)
        self.size = size
        self.pulled = 0

    async def __aiter__(self):
        for i in range(0, len(self.data), self.size):
            self.pulled += 1
            yield self.data[i : i + self.size]


def assert_413(r: httpx.Response, limit: int) -> None:
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "RequestTooLargeError",
            "code": "request_too_large",
            "param": None,
        }
    }
    assert f"limit of {limit} bytes" in r.json()["error"]["message"]


def multipart(file_bytes: int, boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\ncalm\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.bin\"\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b"y" * file_bytes + f"\r\n--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


# --- small bodies pass ---------------------------------------------------------------


def test_small_bodies_pass(client, seen):
    assert client.post("/json", json={"a": 1, "b": "x" * 100}).json() == {"keys": 2}
    assert client.post("/raw", content=b"z" * LIMIT).json() == {"n": LIMIT}  # exactly the limit is fine
    body, headers = multipart(UPLOAD_LIMIT // 2)
    assert client.post("/upload", content=body, headers=headers).json() == {"fields": 2}
    assert client.post("/file", files={"f": ("a.bin", b"q" * 100)}).json() == {"size": 100}
    assert client.get("/openapi.json").status_code == 200
    assert seen["json_calls"] == 1 and seen["upload_calls"] == 1 and seen["file_calls"] == 1


async def test_small_chunked_bodies_pass(seen):
    app = make_app(seen)
    async with async_client(app) as c:
        r = await c.post("/raw", content=Chunks(4))
        assert r.json() == {"n": 4 * CHUNK}
        r = await c.post("/json", content=Chunks(1, data=json.dumps({"k": "v"}).encode()),
                         headers={"content-type": "application/json"})
        assert r.json() == {"keys": 1}


# --- Content-Length over the limit: 413 before the app runs -----------------------


def test_content_length_over_limit(client, seen):
    data = json.dumps({"a": "x" * LIMIT}).encode()
    r = client.post("/json", content=data, headers={"content-type": "application/json"})
    assert_413(r, LIMIT)
    assert f"of {len(data)} bytes" in r.json()["error"]["message"]  # the declared size is named
    assert r.headers["connection"] == "close"
    assert seen["json_calls"] == 0


async def test_content_length_over_limit_reads_no_body(seen):
    app = make_app(seen)
    body = Chunks(10)
    headers = {"content-length": str(len(body.data))}  # declared: the middleware must not pull a single chunk
    async with async_client(app) as c:
        r = await c.post("/raw", content=body, headers=headers)
    assert_413(r, LIMIT)
    assert body.pulled == 0 and seen["raw_bytes"] == 0 and seen["raw_done"] == 0


def test_per_path_limit(client, seen):
    body, headers = multipart(LIMIT * 2)  # over the default, under the /upload limit
    assert client.post("/upload", content=body, headers=headers).status_code == 200
    assert_413(client.post("/file", content=body, headers=headers), LIMIT)
    body, headers = multipart(UPLOAD_LIMIT)
    assert_413(client.post("/upload", content=body, headers=headers), UPLOAD_LIMIT)
    assert seen["upload_calls"] == 1 and seen["file_calls"] == 0


# --- streamed (chunked) bodies over the limit --------------------------------------


async def test_chunked_over_limit_raw_route(seen):
    app = make_app(seen)
    body = Chunks(40)  # 20 KiB, limit 2 KiB
    async with async_client(app) as c:
        r = await c.post("/raw", content=body)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_413(r, LIMIT)
    assert seen["raw_bytes"] <= LIMIT and seen["raw_done"] == 0
    # the middleware stopped pulling at the chunk that crossed the limit
    assert body.pulled == LIMIT // CHUNK + 1


async def test_chunked_over_limit_when_handler_swallows_the_error(seen):
    app = make_app(seen)
    async with async_client(app) as c:
        r = await c.post("/raw-swallow", content=Chunks(40))
    assert_413(r, LIMIT)
    assert seen["raw_bytes"] <= LIMIT


async def test_chunked_over_limit_json_route(seen):
    # FastAPI reads a JSON body before the handler and turns a read error into a 400; the client must get the 413
    app = make_app(seen)
    data = json.dumps({"a": "x" * (LIMIT * 4)}).encode()
    async with async_client(app) as c:
        r = await c.post("/json", content=Chunks(0, data=data), headers={"content-type": "application/json"})
    assert_413(r, LIMIT)
    assert seen["json_calls"] == 0


@pytest.fixture
def spooled(monkeypatch) -> list:
    """Every SpooledTemporaryFile the multipart parser creates; ``.written`` counts the bytes stored in each."""
    made = []

    class Tracked(starlette.formparsers.SpooledTemporaryFile):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.written = 0
            made.append(self)

        def write(self, s):
            self.written += len(s)
            return super().write(s)

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Tracked)
    return made


@pytest.mark.parametrize(
    ("path", "limit", "calls"), [("/upload", UPLOAD_LIMIT, "upload_calls"), ("/file", LIMIT, "file_calls")]
)
async def test_chunked_multipart_over_limit_closes_spooled_files(seen, spooled, path, limit, calls):
    app = make_app(seen)
    data, headers = multipart(limit * 3)
    body = Chunks(0, data=data)
    async with async_client(app) as c:
        r = await c.post(path, content=body, headers=headers)
    assert_413(r, limit)
    assert seen[calls] == 0
    assert body.pulled == limit // CHUNK + 1
    assert spooled, "the parser had started spooling the file part"
    assert all(f.closed for f in spooled)
    assert sum(f.written for f in spooled) <= limit  # nothing past the limit was stored


def test_multipart_content_length_over_limit(client, seen):
    assert_413(client.post("/file", files={"f": ("a.bin", b"q" * (LIMIT + 1))}), LIMIT)
    assert seen["file_calls"] == 0


# --- configuration -------------------------------------------------------------------


def test_limit_for_mapping_callable_and_default():
    mw = BodySizeLimitMiddleware(None, default_limit=10, limits={"/a": 5})
    assert (mw.limit_for("/a"), mw.limit_for("/b")) == (5, 10)
    mw = BodySizeLimitMiddleware(None, default_limit=10, limits=lambda p: 99 if p.startswith("/up") else None)
    assert (mw.limit_for("/upload"), mw.limit_for("/x")) == (99, 10)
    with pytest.raises(ValueError):
        BodySizeLimitMiddleware(None, default_limit=-1)


def test_route_limits_from_settings():
    s = Settings(max_adapter_bytes=4096)
    assert route_limits(s) == {UPLOAD_PATH: 4096 + MULTIPART_OVERHEAD_BYTES}
    assert Settings().max_request_bytes == 8 * 1024 * 1024
    with pytest.raises(ValueError):
        Settings(max_request_bytes=10)


async def test_non_http_scopes_pass_through():
    calls = []

    async def inner(scope, receive, send):
        calls.append(scope["type"])

    mw = BodySizeLimitMiddleware(inner, default_limit=0)
    await mw({"type": "lifespan"}, None, None)
    await mw({"type": "websocket", "path": "/ws", "headers": []}, None, None)
    assert calls == ["lifespan", "websocket"]


async def test_trip_after_response_started_aborts():
    # an app that answers before reading its body cannot get a 413: the error propagates so the server drops it
    async def early(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.body", "body": b"done"})

    app = BodySizeLimitMiddleware(early, default_limit=LIMIT)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        with pytest.raises(Exception, match=f"limit of {LIMIT} bytes"):
            await c.post("/", content=Chunks(40))


def test_service_app_with_the_middleware():
    # wired as app.main would: the limit answers before any route or dependency (the model is not even loaded)
    from app.main import create_app

    def no_model(_settings):
        raise RuntimeError("no model in this test")

    settings = Settings(max_request_bytes=4096, max_adapter_bytes=4096)
    app = create_app(settings, model_factory=no_model)
    app.add_middleware(BodySizeLimitMiddleware, default_limit=settings.max_request_bytes, limits=route_limits(settings))
    with TestClient(app) as c:
        big = b"{" + b" " * 5000 + b"}"
        r = c.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert_413(r, 4096)
        body, headers = multipart(8192)  # over max_request_bytes, under the upload limit: reaches the route (auth)
        assert c.post(UPLOAD_PATH, content=body, headers=headers).status_code == 403  # TestClient's peer: not loopback
        body, headers = multipart(4096 + MULTIPART_OVERHEAD_BYTES)
        assert_413(c.post(UPLOAD_PATH, content=body, headers=headers), 4096 + MULTIPART_OVERHEAD_BYTES)
