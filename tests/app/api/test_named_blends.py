"""Named blends over HTTP (``/v1/stances``) on the tiny Llama: register, serve by name, refuse with 409, persist.

A named blend must answer exactly as the same anonymous blend does, appear in ``/v1/models`` with its recipe,
get its own metrics label, survive a restart, and never lose a member silently (409 while a member is missing;
deleting a member adapter is refused while a blend uses it).
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.factories import AUTH, adapter_files, chat, make_client, metric, wait_ready

RECIPE = {"calm": 0.6, "bold": 0.4}


def _upload(client, name, folder):
    r = client.post("/v1/adapters", data={"name": name}, files=adapter_files(folder), headers=AUTH)
    assert r.status_code == 201, r.text


def _text(r):
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture
def client(tmp_path, peft_dirs):
    with make_client(tmp_path) as c:
        wait_ready(c)
        _upload(c, "calm", peft_dirs["calm"])
        _upload(c, "bold", peft_dirs["bold"])
        yield c


def test_named_blend_serves_the_live_blend_and_is_listed(client):
    r = client.post("/v1/stances", json={"name": "friendly", "stances": RECIPE, "description": "calm, a bit bold"},
                    headers=AUTH)
    assert r.status_code == 201, r.text
    assert {"object": "stance", "name": "friendly", "stances": RECIPE, "version": 1,
            "description": "calm, a bit bold"}.items() <= r.json().items()
    named = _text(chat(client, "friendly"))
    anonymous = _text(chat(client, "tiny-llama", stances=RECIPE))
    assert named == anonymous
    assert named != _text(chat(client, "tiny-llama")) and named != _text(chat(client, "calm"))
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["friendly"]["stances"] == RECIPE and cards["friendly"]["parent"] == "tiny-llama"
    assert cards["calm"]["stances"] is None
    assert [b["name"] for b in client.get("/v1/stances").json()["data"]] == ["friendly"]
    assert client.get("/v1/stances/friendly").json()["stances"] == RECIPE
    assert client.get("/v1/stances/nope").status_code == 404
    # per-stance metrics: the blend's own name; the anonymous blend keeps "blend"
    text = client.get("/metrics").text
    assert metric(text, "stanceserve_requests_total", stance="friendly", status="length") == 1
    assert metric(text, "stanceserve_requests_total", stance="blend", status="length") == 1
    # with its own stances, a request naming the blend runs that blend (anonymous)
    assert _text(chat(client, "friendly", stances={"bold": 1.0})) == _text(chat(client, "bold"))


def test_refusals(client, peft_dirs):
    post = lambda body, q="": client.post(f"/v1/stances{q}", json=body, headers=AUTH)  # noqa: E731
    r = post({"name": "x", "stances": {"calm": 0.5, "ghost": 0.5}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "blend_member_missing"
    assert r.json()["error"]["param"] == "stances.ghost"
    r = post({"name": "calm", "stances": RECIPE})
    assert r.status_code == 409 and r.json()["error"]["code"] == "stance_exists"
    r = post({"name": "tiny-llama", "stances": RECIPE})
    assert r.status_code == 409
    r = post({"name": "x", "stances": {"calm": 1e6}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stances.calm"
    r = post({"name": "blend", "stances": RECIPE})
    assert r.status_code == 422 and r.json()["error"]["param"] == "name"
    r = post({"name": "x", "stances": {}})
    assert r.status_code == 422
    assert client.post("/v1/stances", json={"name": "x", "stances": RECIPE}).status_code == 401  # no admin key
    assert post({"name": "friendly", "stances": RECIPE}).status_code == 201
    r = post({"name": "friendly", "stances": {"calm": 1.0}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "stance_exists"
    r = post({"name": "friendly", "stances": {"calm": 1.0}}, "?replace=true")
    assert r.status_code == 201 and r.json()["version"] == 2
    assert _text(chat(client, "friendly")) == _text(chat(client, "calm"))
    r = post({"name": "meta", "stances": {"friendly": 1.0}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stances.friendly"
    # an adapter cannot take a blend's name; a member adapter cannot be deleted while a blend uses it
    r = client.post("/v1/adapters", data={"name": "friendly"}, files=adapter_files(peft_dirs["calm"]), headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "stance_exists"
    r = client.delete("/v1/adapters/calm", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use" and "friendly" in r.json()["error"]["message"]
    assert _text(chat(client, "calm"))  # still served
    assert client.delete("/v1/stances/friendly", headers=AUTH).json()["name"] == "friendly"
    assert chat(client, "friendly").status_code == 404
    assert client.delete("/v1/stances/friendly", headers=AUTH).status_code == 404
    assert client.delete("/v1/adapters/calm", headers=AUTH).status_code == 200


def test_survives_restart_and_409_while_a_member_is_missing(tmp_path, peft_dirs):
    with make_client(tmp_path) as c:
        wait_ready(c)
        _upload(c, "calm", peft_dirs["calm"])
        _upload(c, "bold", peft_dirs["bold"])
        assert c.post("/v1/stances", json={"name": "friendly", "stances": RECIPE}, headers=AUTH).status_code == 201
        assert c.post("/v1/stances?replace=true", json={"name": "friendly", "stances": RECIPE},
                      headers=AUTH).json()["version"] == 2
        before = _text(chat(c, "friendly"))
    stored = json.loads((tmp_path / "store" / ".stances.json").read_text())
    assert stored["blends"]["friendly"]["stances"] == RECIPE and stored["last_versions"] == {"friendly": 2}
    with make_client(tmp_path) as c:  # restart on the same store
        wait_ready(c)
        assert c.get("/v1/stances/friendly").json()["version"] == 2
        assert _text(chat(c, "friendly")) == before
    shutil.rmtree(tmp_path / "store" / "bold")  # a member's folder removed while the server was down
    with make_client(tmp_path) as c:
        wait_ready(c)
        r = chat(c, "friendly")
        assert r.status_code == 409 and r.json()["error"]["code"] == "blend_member_missing"
        assert "'bold'" in r.json()["error"]["message"] and r.json()["error"]["param"] == "model"
        _upload(c, "bold", peft_dirs["bold"])  # registering the member again resolves it
        assert _text(chat(c, "friendly")) == before
