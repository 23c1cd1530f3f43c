"""The server never stores nor serves its admin key in adapter metadata or descriptions (public, unauthenticated)."""

from __future__ import annotations

import json
import logging

from tests.factories import AUTH, KEY, adapter_files, make_client, wait_ready


def test_upload_whose_metadata_holds_the_admin_key_does_not_echo_it(tmp_path, peft_dirs, caplog):
    meta = {"command": f"stanceserve train --name calm --register http://h --admin-key {KEY} --quiet",
            "note": f"key={KEY}", "training": {"method": "sft"}}
    caplog.set_level(logging.INFO)
    with make_client(tmp_path) as client:
        wait_ready(client)
        r = client.post("/v1/adapters", data={"name": "calm", "description": f"made with {KEY}",
                                              "metadata": json.dumps(meta)},
                        files=adapter_files(peft_dirs["calm"]), headers=AUTH)
        assert r.status_code == 201, r.text
        answers = [r.text, client.get("/v1/adapters").text, client.get("/v1/adapters/calm").text]
        info = r.json()
        stored = (tmp_path / "store" / "calm" / "stance.json").read_text()
        answers.append(client.delete("/v1/adapters/calm", headers=AUTH).text)
    assert all(KEY not in a for a in answers)
    assert info["metadata"]["training"] == {"method": "sft"}  # the rest is kept
    assert info["metadata"]["command"].endswith("--admin-key *** --quiet") and info["description"] == "made with ***"
    assert KEY not in stored and "made with ***" in stored  # stored redacted, not only served so
    assert KEY not in caplog.text and "held the server's admin key" in caplog.text


def test_stored_metadata_with_a_key_is_redacted_when_served(tmp_path, peft_dirs):
    """A record written before redaction existed (planted stance.json) is redacted on the way out."""
    with make_client(tmp_path) as client:
        wait_ready(client)
        r = client.post("/v1/adapters", data={"name": "calm", "metadata": '{"m": 1}'},
                        files=adapter_files(peft_dirs["calm"]), headers=AUTH)
        assert r.status_code == 201
    stance = tmp_path / "store" / "calm" / "stance.json"
    record = json.loads(stance.read_text())
    record["metadata"] = {"command": f"x --admin-key {KEY}", "secret_note": KEY}
    stance.write_text(json.dumps(record))
    with make_client(tmp_path) as client:
        wait_ready(client)
        listed, one = client.get("/v1/adapters").text, client.get("/v1/adapters/calm")
    assert one.status_code == 200 and KEY not in listed and KEY not in one.text
    assert one.json()["metadata"]["command"] == "x --admin-key ***"
