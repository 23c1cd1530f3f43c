"""A body that is not valid JSON gets HTTP 400 with a clear message (as OpenAI answers), not a 422 with param "1"."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app.errors import install_error_handlers
from tests.factories import AUTH, make_client, wait_ready


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with make_client(tmp_path_factory.mktemp("store")) as c:
        wait_ready(c)
        yield c


@pytest.mark.parametrize(("path", "body", "where"), [
    ("/v1/chat/completions", b'{"model": "tiny-llama", "messages": [}', "line 1, column 38"),
    ("/v1/completions", b"not json", "line 1, column 1"),
    ("/v1/stances", b'{"name": "x",\n "stances": {"a": 1}', "line 2, column 21"),
    ("/v1/load_lora_adapter", b"{'lora_name': 'x'}", "line 1, column 2"),
])
def test_invalid_json_is_a_400_that_says_where(client, path, body, where):
    r = client.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"].startswith("could not parse the JSON body of the request: ") and where in err["message"]
    assert "Content-Type: application/json" in err["message"] and err["param"] is None


def test_a_body_that_is_not_utf8_is_a_400(client):
    r = client.post("/v1/chat/completions", content=b'{"model": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "could not parse the JSON body" in r.json()["error"]["message"]


def test_valid_json_of_the_wrong_shape_is_still_a_422_naming_the_field(client):
    r = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": "hi"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"


class Body(BaseModel):
    a: int


def test_routes_without_the_offloaded_parser_answer_the_same():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/x")
    async def x(body: Body) -> dict:
        return {"a": body.a}

    client = TestClient(app)
    assert client.post("/x", json={"a": 1}).json() == {"a": 1}
    r = client.post("/x", content=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("could not parse the JSON body")
