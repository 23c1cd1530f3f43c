"""The HTTP API in-process (TestClient) on a tiny random Llama: routes, errors, auth, upload, metrics."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.errors import QueueFullError
from app.main import create_app
from tests.factories import AUTH, KEY, adapter_files, chat, make_client, tiny_factory, wait_ready, zip_folder


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        wait_ready(c)
        yield c


def test_health_ready_models(client):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny-llama", "device": "cpu", "dtype": "float32"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["model"] == "tiny-llama"
    assert ready["device"] == "cpu" and ready["dtype"] == "float32"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-llama"]
    assert models["data"][0]["dtype"] == "float32" and models["data"][0]["device"] == "cpu"


def bf16_factory(settings):
    """The tiny Llama served in bfloat16 (what ``--dtype auto`` picks on a CPU with native bf16)."""
    loaded = tiny_factory(settings)
    loaded.model.to(torch.bfloat16)
    loaded.dtype = torch.bfloat16
    return loaded


@pytest.mark.dtype
def test_served_dtype_is_visible_everywhere(tmp_path, peft_dirs):
    """/health, /v1/models (base, adapters, blends) and the info metric all name the dtype the engine runs."""
    with make_client(tmp_path, model_factory=bf16_factory) as c:
        wait_ready(c)
        assert c.get("/health").json()["dtype"] == "bfloat16"
        assert c.post("/v1/adapters", data={"name": "calm"}, files=adapter_files(peft_dirs["calm"]),
                      headers=AUTH).status_code == 201
        cards = c.get("/v1/models").json()["data"]
        assert [(m["id"], m["dtype"], m["device"]) for m in cards] == [
            ("tiny-llama", "bfloat16", "cpu"), ("calm", "bfloat16", "cpu")]
        families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
        (sample,) = families["stanceserve_model_info"].samples
        assert sample.name == "stanceserve_model_info" and sample.value == 1
        assert {"model": "tiny-llama", "device": "cpu", "dtype": "bfloat16"}.items() <= sample.labels.items()
        assert sample.labels["cpu_native_bf16"] in ("true", "false")


def test_upload_then_serve_without_restart(client, peft_dirs):
    base = chat(client, "tiny-llama").json()
    r = client.post("/v1/adapters", data={"name": "calm", "description": "d1", "metadata": '{"method": "sft"}'},
                    files=adapter_files(peft_dirs["calm"]), headers=AUTH)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "calm" and info["rank"] == 4 and info["version"] == 1
    assert info["description"] == "d1" and info["metadata"] == {"method": "sft"}
    assert set(info["target_modules"]) >= {"q_proj", "down_proj"} and len(info["sha256"]) == 64 and info["size_bytes"] > 0

    out = chat(client, "calm").json()
    assert out["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert out["usage"]["completion_tokens"] == 8
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + 8

    models = client.get("/v1/models").json()["data"]
    assert {"id": "calm", "parent": "tiny-llama"}.items() <= models[1].items()
    assert client.get("/v1/adapters/calm").json()["sha256"] == info["sha256"]
    assert [a["name"] for a in client.get("/v1/adapters").json()["data"]] == ["calm"]


def test_zip_upload_replace_and_delete(client, peft_dirs):
    files = [("file", ("bold.zip", zip_folder(peft_dirs["bold"], "bold/"), "application/zip"))]
    assert client.post("/v1/adapters", data={"name": "bold"}, files=files, headers=AUTH).status_code == 201
    dup = client.post("/v1/adapters", data={"name": "bold"}, files=files, headers=AUTH)
    assert dup.status_code == 409 and dup.json()["error"]["param"] == "name"
    first = chat(client, "bold").json()["choices"][0]["message"]["content"]
    # replace with a different adapter: new version, new outputs
    r = client.post("/v1/adapters?replace=true", data={"name": "bold"}, files=adapter_files(peft_dirs["calm"]), headers=AUTH)
    assert r.status_code == 201 and r.json()["version"] == 2
    calm_like = chat(client, "bold").json()["choices"][0]["message"]["content"]
    assert calm_like != first
    assert client.delete("/v1/adapters/bold", headers=AUTH).status_code == 200
    gone = chat(client, "bold")
    assert gone.status_code == 404 and "bold" in gone.json()["error"]["message"]


def test_bad_uploads_name_the_problem_and_change_nothing(client, peft_dirs, tmp_path):
    d = peft_dirs["calm"]
    pickle = [("files", ("adapter_config.json", (d / "adapter_config.json").read_bytes())),
              ("files", ("adapter_model.bin", b"\x80\x04fake pickle"))]
    r = client.post("/v1/adapters", data={"name": "x"}, files=pickle, headers=AUTH)
    assert r.status_code == 422 and "adapter_model.bin" in r.json()["error"]["param"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 999
    bad = [("files", ("adapter_config.json", json.dumps(cfg).encode())),
           ("files", ("adapter_model.safetensors", (d / "adapter_model.safetensors").read_bytes()))]
    r = client.post("/v1/adapters", data={"name": "x"}, files=bad, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["param"] == "adapter_config.json"
    r = client.post("/v1/adapters", data={"name": "../evil"}, files=adapter_files(d), headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["param"] == "name"
    r = client.post("/v1/adapters", data={"name": "tiny-llama"}, files=adapter_files(d), headers=AUTH)
    assert r.status_code == 422
    assert client.get("/v1/adapters").json()["data"] == []
    assert chat(client, "tiny-llama").status_code == 200  # still serving


def test_errors_404_422_and_blend(client, peft_dirs):
    r = chat(client, "no-such-stance")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and "no-such-stance" in r.json()["error"]["message"]
    for name in ("calm", "bold"):
        client.post("/v1/adapters", data={"name": name}, files=adapter_files(peft_dirs[name]), headers=AUTH)
    r = chat(client, "tiny-llama", stances={"calm": 0.5, "ghost": 0.5})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stances.ghost"
    r = chat(client, "tiny-llama", stances={f"s{i}": 0.1 for i in range(9)})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stances"
    r = client.post("/v1/chat/completions", content=b'{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"stances":{"calm":NaN}}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = chat(client, "tiny-llama", temperature=5)
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
    blend = chat(client, "tiny-llama", stances={"calm": 0.7, "bold": 0.3})
    assert blend.status_code == 200 and blend.json()["stances"] == {"calm": 0.7, "bold": 0.3}
    texts = {chat(client, m).json()["choices"][0]["message"]["content"] for m in ("calm", "bold")}
    assert blend.json()["choices"][0]["message"]["content"] not in texts


def test_streaming_sse_and_completions(client):
    with client.stream("POST", "/v1/chat/completions", json={
        "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 5 and chunks[-1]["choices"] == []
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    full = chat(client, "tiny-llama", content="hi", max_tokens=5).json()["choices"][0]["message"]["content"]
    assert streamed == full
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "Once", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["object"] == "text_completion" and r.json()["usage"]["completion_tokens"] == 4


def test_auth(tmp_path, peft_dirs):
    files = adapter_files(peft_dirs["calm"])
    with TestClient(create_app(Settings(adapters_dir=tmp_path / "a", admin_key=KEY), model_factory=tiny_factory)) as c:
        wait_ready(c)
        assert c.post("/v1/adapters", data={"name": "calm"}, files=files).status_code == 401
        assert c.post("/v1/adapters", data={"name": "calm"}, files=files, headers={"Authorization": "Bearer no"}).status_code == 401
        assert c.delete("/v1/adapters/calm").status_code == 401
    # no key configured: only loopback clients may mutate (TestClient's client host is not loopback)
    with TestClient(create_app(Settings(adapters_dir=tmp_path / "b"), model_factory=tiny_factory)) as c:
        wait_ready(c)
        r = c.post("/v1/adapters", data={"name": "calm"}, files=files)
        assert r.status_code == 403 and "STANCESERVE_ADMIN_KEY" in r.json()["error"]["message"]
    with TestClient(create_app(Settings(adapters_dir=tmp_path / "b"), model_factory=tiny_factory), client=("127.0.0.1", 5000)) as c:
        wait_ready(c)
        assert c.post("/v1/adapters", data={"name": "calm"}, files=files).status_code == 201


def test_persistence_and_vllm_endpoints(tmp_path, peft_dirs):
    settings = Settings(adapters_dir=tmp_path / "store", admin_key=KEY)
    with TestClient(create_app(settings, model_factory=tiny_factory)) as c:
        wait_ready(c)
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "calm", "lora_path": str(peft_dirs["calm"])}, headers=AUTH)
        assert r.status_code == 200 and "calm" in r.text
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "nope")}, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["param"] == "lora_path"  # the request's field
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "calm", "lora_path": str(peft_dirs["bold"])}, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["param"] == "lora_name"
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "adapter_config.json").write_text("{}")
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(tmp_path / "broken")}, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["param"] == "lora_path"
        before = chat(c, "calm").json()["choices"][0]["message"]["content"]
    with TestClient(create_app(settings, model_factory=tiny_factory)) as c:  # restart: registered again
        assert wait_ready(c)["adapters"] == 1
        assert chat(c, "calm").json()["choices"][0]["message"]["content"] == before
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "calm"}, headers=AUTH).status_code == 200
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "calm"}, headers=AUTH).status_code == 404


def test_queue_full_is_429_with_retry_after(client, monkeypatch):
    engine = client.app.state.service.engine

    def full(*a, **k):
        raise QueueFullError(retry_after_s=3)

    monkeypatch.setattr(engine, "open", full)
    r = chat(client, "tiny-llama")
    assert r.status_code == 429 and r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "queue_full"


def test_metrics_move(client, peft_dirs):
    client.post("/v1/adapters", data={"name": "calm"}, files=adapter_files(peft_dirs["calm"]), headers=AUTH)
    for model in ("calm", "calm", "tiny-llama"):
        assert chat(client, model, max_tokens=6).status_code == 200
    fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}

    def value(fam, sample, **labels):
        return sum(s.value for s in fams[fam].samples if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("stanceserve_generation_tokens", "stanceserve_generation_tokens_total", stance="calm") == 12
    assert value("stanceserve_generation_tokens", "stanceserve_generation_tokens_total", stance="base") == 6
    assert value("stanceserve_requests", "stanceserve_requests_total", stance="calm", status="length") == 2
    assert value("stanceserve_time_to_first_token_seconds", "stanceserve_time_to_first_token_seconds_count", stance="calm") == 2
    assert value("stanceserve_inter_token_latency_seconds", "stanceserve_inter_token_latency_seconds_count", stance="calm") == 10
    assert value("stanceserve_adapters_registered", "stanceserve_adapters_registered") == 1
    assert value("stanceserve_adapters_loaded", "stanceserve_adapters_loaded") == 1
    assert value("stanceserve_adapter_load_seconds", "stanceserve_adapter_load_seconds_count") == 1
    assert value("stanceserve_generation_tokens_per_second", "stanceserve_generation_tokens_per_second", stance="calm") > 0
    prompt = value("stanceserve_prompt_tokens", "stanceserve_prompt_tokens_total", stance="base")
    assert prompt == len(client.app.state.service.engine.chat_prompt_ids([{"role": "user", "content": "Once upon a time"}]))
    assert value("stanceserve_adapter_cache", "stanceserve_adapter_cache_total", result="miss") == 1
    assert value("stanceserve_adapter_cache", "stanceserve_adapter_cache_total", result="hit") == 1
