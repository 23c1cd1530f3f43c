"""Regression tests of the ten isolation defects, each in the form a user hit it: HTTP against the app.

The numbering follows the Isolation issue. Each test also checks that a well-formed neighbour request
still gets its normal answer where the defect used to break others.
"""

from __future__ import annotations

import json
import logging
import math
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.factories import (
    AUTH,
    adapter_files,
    build_tiny_model,
    chat,
    load_tokenizer,
    make_client,
    tiny_factory,
    wait_ready,
)


def upload(client, name, d: Path, **form):
    return client.post("/v1/adapters", data={"name": name, **form}, files=adapter_files(d), headers=AUTH)


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "code", "param"} <= set(err), err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def greedy(client, model, **extra):
    r = chat(client, model, **extra)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture
def client(tmp_path, peft_dirs):
    with make_client(tmp_path, raise_server_exceptions=False) as c:
        wait_ready(c)
        assert upload(c, "calm", peft_dirs["calm"]).status_code == 201
        assert upload(c, "bold", peft_dirs["bold"]).status_code == 201
        yield c


# 1 ------------------------------------------------------------------------------------------------
def test_1_seed_out_of_range_is_refused_and_loses_no_slot(tmp_path, peft_dirs):
    with make_client(tmp_path, raise_server_exceptions=False, max_loras=1) as c:
        wait_ready(c)
        assert upload(c, "calm", peft_dirs["calm"]).status_code == 201
        before = greedy(c, "calm")
        assert_error(chat(c, "calm", seed=2**64, temperature=1.0), 422, "invalid_request", "seed")
        assert_error(chat(c, "calm", seed=-(2**63) - 1, temperature=1.0), 422, param="seed")
        ok = chat(c, "calm", seed=2**64 - 1, temperature=1.0)  # the top of torch's range is accepted
        assert ok.status_code == 200, ok.text
        assert greedy(c, "calm") == before  # the one slot still serves the adapter


# 2 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [1e30, 1e308, -17.0])
def test_2_huge_blend_weight_is_a_json_422(client, weight):
    calm = greedy(client, "calm")
    r = chat(client, "tiny-llama", stances={"calm": weight, "bold": 0.5}, temperature=0.8, seed=1)
    assert_error(r, 422, "invalid_blend", "stances.calm")
    assert greedy(client, "calm") == calm
    ok = chat(client, "tiny-llama", stances={"calm": 16.0, "bold": -16.0})  # the documented bound itself
    assert ok.status_code == 200, ok.text


# 3 ------------------------------------------------------------------------------------------------
def test_3_huge_bodies_and_prompts_are_refused_without_tokenising(client, monkeypatch):
    big = "word " * (9 * 1024 * 1024 // 5)  # 9 MiB: over the 8 MiB request limit
    assert_error(chat(client, "calm", content=big), 413, "request_too_large")
    engine = client.app.state.service.engine
    calls = []
    real = engine.tokenizer.__class__.__call__
    monkeypatch.setattr(engine.tokenizer.__class__, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    t0 = time.perf_counter()
    r = chat(client, "calm", content="word " * (4 * 1024 * 1024 // 5))  # 4 MiB: under the body limit
    assert_error(r, 400, "context_length_exceeded", "messages")
    assert not calls, "a prompt that cannot fit must be refused before tokenising"
    assert time.perf_counter() - t0 < 5.0
    r = client.post("/v1/completions", json={"model": "calm", "prompt": "word " * 600, "max_tokens": 4})
    assert_error(r, 400, "context_length_exceeded", "prompt")  # 600+ tokens > the tiny model's 512 positions
    r = chat(client, "calm", content="hello " * 100, max_tokens=2000)  # prompt + max_tokens > context
    assert_error(r, 400, "context_length_exceeded", "max_tokens")
    many = [{"role": "user", "content": "hi"}] * 257
    r = client.post("/v1/chat/completions", json={"model": "calm", "messages": many, "max_tokens": 2})
    assert_error(r, 422, "invalid_request", "messages")


# 4 ------------------------------------------------------------------------------------------------
def test_4_deeply_nested_json_is_a_json_4xx(client, peft_dirs, tmp_path):
    deep = "[" * 5000 + "]" * 5000
    r = upload(client, "deep", peft_dirs["calm"], metadata=deep)
    assert_error(r, 422, param="metadata")
    bad = tmp_path / "deepcfg"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((peft_dirs["calm"] / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((peft_dirs["calm"] / "adapter_config.json").read_text())
    text = json.dumps(cfg)[:-1] + ', "x": ' + deep + "}"
    (bad / "adapter_config.json").write_text(text)
    assert_error(upload(client, "deep", bad), 422, param="adapter_config.json")
    body = '{"model": "calm", "messages": ' + deep + "}"
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert "nested too deeply" in assert_error(r, 400, "bad_request")["message"]
    assert client.get("/v1/adapters/deep").status_code == 404


# 5 ------------------------------------------------------------------------------------------------
def test_5_staging_lives_in_the_store_and_stale_folders_go_at_start(tmp_path, peft_dirs, monkeypatch):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    store = tmp_path / "store"
    stale = store / ".upload-0123456789abcdef0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"\0" * 1024 * 1024)
    with make_client(tmp_path, raise_server_exceptions=False) as c:
        wait_ready(c)
        assert not stale.exists()
        assert upload(c, "calm", peft_dirs["calm"]).status_code == 201
    assert not list(tmpdir.glob("stanceserve-upload-*"))
    assert not list(store.glob(".upload-*"))


# 6 ------------------------------------------------------------------------------------------------
def test_6_deleted_adapter_series_leave_metrics(client):
    greedy(client, "calm")
    greedy(client, "bold")
    text = client.get("/metrics").text
    assert 'stance="calm"' in text and 'stance="bold"' in text
    assert client.delete("/v1/adapters/calm", headers=AUTH).status_code == 200
    text = client.get("/metrics").text
    assert 'stance="calm"' not in text and 'stance="bold"' in text
    rate = client.app.state.service.metrics.token_rate
    tracemalloc.start()
    try:
        rate.add("bold", 1, now=999.0)
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):  # tokens with no scrape: the gauge's memory does not grow with them
            rate.add("bold", 1, now=1000.0 + i * 0.001)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024, grown  # was ~88 B per token: 1.7 MB


# 7 ------------------------------------------------------------------------------------------------
def test_7_every_error_has_one_shape_and_is_documented(client, monkeypatch):
    assert_error(client.get("/v1/nope"), 404, "not_found")
    assert_error(client.get("/v1/chat/completions"), 405, "method_not_allowed")
    assert_error(client.post("/v1/chat/completions", json={"model": "calm"}), 422, param="messages")
    assert_error(client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)  # as OpenAI answers
    assert_error(chat(client, "nobody"), 404, "adapter_not_found", "model")
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "nobody"}, headers=AUTH)
    assert_error(r, 404, "adapter_not_found", "lora_name")
    assert_error(client.delete("/v1/adapters/nobody", headers=AUTH), 404, param="name")

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(client.app.state.service.catalog, "list", boom)
    err = assert_error(client.get("/v1/adapters"), 500, "internal_error")
    assert "request id" in err["message"]

    spec = client.get("/openapi.json").json()
    chat_op = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "404", "413", "422", "429", "500", "503"} <= set(chat_op["responses"])
    assert chat_op["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    upload_op = spec["paths"]["/v1/adapters"]["post"]
    form = upload_op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"name", "files", "metadata", "description"} <= set(form["properties"])
    assert {"401", "403", "409", "413", "422"} <= set(upload_op["responses"])


# 8 ------------------------------------------------------------------------------------------------
def test_8_oversize_chunked_upload_is_refused_while_streaming(tmp_path):
    """A chunked 64 MiB upload (no Content-Length) to a server with a 1 MiB adapter limit: 413 JSON, nothing
    staged. (TestClient hands the app the body in one piece; that the limit trips while chunks stream in,
    before the route reads past the limit, is shown chunk by chunk in tests/app/api/test_limits.py.)"""

    def body():
        for _ in range(64):
            yield b"x" * (1024 * 1024)

    with make_client(tmp_path, raise_server_exceptions=False, max_adapter_bytes=1024 * 1024) as c:
        wait_ready(c)
        r = c.post("/v1/adapters", content=body(), headers={**AUTH, "content-type": "multipart/form-data; boundary=b"})
        assert_error(r, 413, "request_too_large")
        assert c.get("/v1/adapters").json()["data"] == []
    assert not list((tmp_path / "store").glob(".upload-*"))


# 9 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value",
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
    ],
)
def test_9_unimplemented_openai_fields_are_refused(client, field, value):
    assert_error(chat(client, "calm", **{field: value}), 400, "unsupported_parameter", field)


def test_9_accepted_off_values_and_unknown_fields_are_logged(client, caplog):
    ok = chat(client, "calm", tools=[], tool_choice="none", response_format={"type": "text"}, user="u1")
    assert ok.status_code == 200, ok.text
    with caplog.at_level(logging.WARNING, logger="app.schemas"):
        assert chat(client, "calm", frobnicate=3).status_code == 200
    assert "frobnicate" in caplog.text


def test_9_n_choices_logprobs_and_penalties(client):
    model = build_tiny_model("llama")
    tok = load_tokenizer()
    r = client.post("/v1/completions", json={
        "model": "tiny-llama", "prompt": "Once upon", "max_tokens": 3, "temperature": 0, "logprobs": 3, "n": 2,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: n identical choices
    assert body["usage"]["completion_tokens"] == 6
    lp = body["choices"][0]["logprobs"]
    ids = tok("Once upon")["input_ids"]
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    assert math.isclose(lp["token_logprobs"][0], float(ref.max()), abs_tol=1e-4)
    assert len(lp["top_logprobs"][0]) == 3 and len(lp["tokens"]) == 3

    r = chat(client, "calm", logprobs=True, top_logprobs=2, max_tokens=3)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(e["top_logprobs"]) == 2 for e in content)
    assert all(e["logprob"] <= 0 and isinstance(e["bytes"], list) for e in content)
    assert_error(chat(client, "calm", top_logprobs=2), 422, param="top_logprobs")

    # logit_bias +100 forces a token; stop_token_ids then ends the completion on it
    forced = tok.convert_tokens_to_ids("▁cat") if "▁cat" in tok.get_vocab() else 100
    r = chat(client, "calm", logit_bias={str(forced): 100}, max_tokens=4)
    assert r.json()["usage"]["completion_tokens"] == 4
    r = chat(client, "calm", logit_bias={str(forced): 100}, stop_token_ids=[forced], max_tokens=4)
    assert r.json()["usage"]["completion_tokens"] == 1 and r.json()["choices"][0]["finish_reason"] == "stop"
    assert_error(chat(client, "calm", logit_bias={"99999": 5}), 422, param="logit_bias")
    plain = greedy(client, "calm", max_tokens=12)
    penalised = greedy(client, "calm", max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0,
                       repetition_penalty=1.5)
    assert plain != penalised


# 10 -----------------------------------------------------------------------------------------------
def test_10_no_admin_key_behind_a_proxy_is_refused(tmp_path, peft_dirs):
    settings = Settings(adapters_dir=tmp_path / "store")
    app = create_app(settings, model_factory=tiny_factory)
    with TestClient(app, client=("127.0.0.1", 5000)) as c:
        wait_ready(c)
        r = c.post("/v1/adapters", data={"name": "x"}, files=adapter_files(peft_dirs["calm"]),
                   headers={"X-Forwarded-For": "203.0.113.9"})
        assert_error(r, 403, "forbidden")
        assert c.get("/v1/adapters/x").status_code == 404
        r = c.post("/v1/adapters", data={"name": "x"}, files=adapter_files(peft_dirs["calm"]))
        assert r.status_code == 201, r.text
