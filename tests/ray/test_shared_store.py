"""Two replicas on one adapter store, without Ray: each one's index follows the other's writes, never stale.

Two in-process apps on the tiny Llama share ``adapters_dir``; ``StoreSync.check`` is what a Ray replica runs
before serving a request (:mod:`app.ray_serve.store_sync`).
"""

from __future__ import annotations

import os

import pytest

from app.ray_serve.store_sync import StoreSync
from tests.factories import AUTH, adapter_files, chat, make_client, wait_ready, write_peft_adapter


@pytest.fixture
def pair(tmp_path):
    # one after the other: the tiny model's random init draws from torch's global generator
    with make_client(tmp_path) as a:
        wait_ready(a)
        with make_client(tmp_path) as b:
            wait_ready(b)
            yield a, b, StoreSync(b.app.state.service.catalog, interval_s=60)


def _text(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _upload(client, folder, name="fresh", replace=False):
    r = client.post("/v1/adapters", params={"replace": str(replace).lower()}, data={"name": name},
                    files=adapter_files(folder), headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()


def test_an_upload_through_one_is_served_by_the_other_after_its_per_request_check(pair, tmp_path):
    a, b, sync = pair
    _upload(a, write_peft_adapter(tmp_path / "v1", seed=11, scale=0.5))
    assert chat(b, "fresh").status_code == 404  # b has not looked yet
    sync.check(["fresh"])
    assert _text(chat(b, "fresh", max_tokens=12, temperature=0)) == _text(chat(a, "fresh", max_tokens=12, temperature=0))
    assert b.get("/v1/adapters/fresh").json()["sha256"] == a.get("/v1/adapters/fresh").json()["sha256"]


def test_a_replaced_version_is_never_served_stale(pair, tmp_path):
    a, b, sync = pair
    _upload(a, write_peft_adapter(tmp_path / "v1", seed=11, scale=0.5))
    sync.check(["fresh"])
    old = _text(chat(b, "fresh", max_tokens=12, temperature=0))  # v1 now sits in b's caches and slots
    v2 = _upload(a, write_peft_adapter(tmp_path / "v2", seed=22, scale=0.5), replace=True)
    sync.check(["fresh"])
    new_b = _text(chat(b, "fresh", max_tokens=12, temperature=0))
    assert new_b == _text(chat(a, "fresh", max_tokens=12, temperature=0))
    assert new_b != old
    assert b.get("/v1/adapters/fresh").json()["sha256"] == v2["sha256"]
    held = [v for v in b.app.state.service.engine.slots.keys() if v.name == "fresh"]
    assert len(held) == 1, f"the old version still holds a slot: {held}"


def test_a_delete_through_one_unregisters_it_in_the_other(pair, tmp_path):
    a, b, sync = pair
    _upload(a, write_peft_adapter(tmp_path / "v1", seed=11, scale=0.5))
    sync.check(["fresh"])
    assert a.delete("/v1/adapters/fresh", headers=AUTH).status_code == 200
    sync.check(["fresh"])
    r = chat(b, "fresh")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert "fresh" not in {m["id"] for m in b.get("/v1/models").json()["data"]}


def test_the_background_pass_lists_new_adapters_and_leaves_others_in_flight_folders_alone(pair, tmp_path):
    a, b, sync = pair
    store = b.app.state.service.store
    inflight = store.root / ".upload-0123abcd"  # another replica's upload being staged
    inflight.mkdir()
    hand_copied = write_peft_adapter(store.root / "byhand", seed=5)  # no stance.json: a folder copied in by hand
    _upload(a, write_peft_adapter(tmp_path / "v1", seed=11, scale=0.5))
    sync.refresh_all()
    assert {"fresh", "byhand"} <= {x["name"] for x in b.get("/v1/adapters").json()["data"]}
    assert inflight.is_dir()
    sync.refresh_all()  # a second pass changes nothing: the stamp of a folder without stance.json is stable too
    assert store.reload("byhand")[1] is False
    assert os.path.isdir(hand_copied)
