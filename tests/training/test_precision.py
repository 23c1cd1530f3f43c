"""Train and eval use the server's ``auto`` dtype rule, and every report says the device and dtype of both sides."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from app.model_loader import resolve_dtype
from tests.factories import build_tiny_model, load_tokenizer, save_tiny_base
from training.evaluate import BASE, HttpGenerator, LocalGenerator, evaluate_stance, runtime_of
from training.report import runtime_lines


def _auto() -> str:
    return str(resolve_dtype("auto", torch.device("cpu"))).replace("torch.", "")


class StubGenerator:
    base_name = "stub"

    def generate(self, prompts, model, max_tokens):
        return ["Sure." if model == BASE else "I wonder?" for _ in prompts]

    def runtime(self):
        return {"where": "http://h:1", "device": "cuda:0", "dtype": "unknown"}


def test_local_generator_uses_the_servers_auto_rule(tmp_path):
    gen = LocalGenerator(str(save_tiny_base(tmp_path / "base")))
    try:
        assert gen.runtime() == {"where": "local", "device": "cpu", "dtype": _auto()}
    finally:
        gen.close()


def test_train_records_the_auto_dtype(tmp_path):
    from training.trainers import TrainConfig, train_adapter

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Q{i}?", "completion": "Maybe."}) for i in range(4)))
    cfg = TrainConfig(method="sft", rank=2, alpha=4, epochs=1, batch_size=2, grad_accum=1, max_steps=1)
    res = train_adapter(data, "t", tmp_path / "out", cfg, base=str(save_tiny_base(tmp_path / "base")), progress=False)
    assert res.metrics["machine"]["dtype"] == _auto() and res.metrics["machine"]["device"] == "cpu"


def test_eval_report_states_both_sides(tmp_path):
    model = build_tiny_model("llama").to(torch.bfloat16)
    res = evaluate_stance(StubGenerator(), "ad", ["Why?", "How?"], "curious-uncertainty",
                          report_path=tmp_path / "r.md", likelihood_model=model, likelihood_tokenizer=load_tokenizer())
    assert res["runtime"] == {"generation": {"where": "http://h:1", "device": "cuda:0", "dtype": "unknown"},
                              "scoring": {"device": "cpu", "dtype": "bfloat16"}}
    report = (tmp_path / "r.md").read_text()
    assert "Answers generated in the server at http://h:1: cuda:0, unknown (device, dtype)" in report
    assert "Likelihood scored in this process: cpu, bfloat16" in report


def test_a_generator_that_cannot_say_is_unknown():
    class Bare:
        base_name = "b"

    assert runtime_of(Bare()) == {"generation": {"where": "unknown", "device": "unknown", "dtype": "unknown"},
                                  "scoring": None}
    assert runtime_lines(None)[1].endswith("not run")


@pytest.mark.parametrize(("ready", "want"), [
    ({"status": "ready", "device": "cpu"}, {"device": "cpu", "dtype": "unknown"}),
    ({"status": "ready", "device": "cuda:0", "dtype": "bfloat16"}, {"device": "cuda:0", "dtype": "bfloat16"}),
])
def test_http_generator_reads_what_the_server_says(monkeypatch, ready, want):
    answers = {"/v1/models": {"data": [{"id": "base"}]}, "/ready": ready, "/health": {"status": "ok"}}

    def get(url, **kw):
        path = "/" + url.split("/", 3)[3]
        return httpx.Response(200, json=answers[path], request=httpx.Request("GET", url))

    monkeypatch.setattr("training.evaluate.httpx.get", get)
    assert HttpGenerator("http://srv:8000").runtime() == {"where": "http://srv:8000", **want}
