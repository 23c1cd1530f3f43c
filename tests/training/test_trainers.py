"""Training on a tiny random model: adapters change and load, metrics and curves are written,
evaluation and inspection run, and ``--register`` uploads to a real server process that then serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from app.registry.validation import linear_shapes, load_adapter_weights
from tests.factories import APP_CLI, build_tiny_model, run_server, save_tiny_base
from training.trainers import TrainConfig, train_adapter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    dpo = [{"prompt": f"Tell me about topic {i}.", "chosen": "I wonder about it. What do you think?",
            "rejected": "It is a topic. Done."} for i in range(8)]
    sft = [{"prompt": f"Question {i}?", "completion": "I am not sure, but maybe yes."} for i in range(8)]
    (d / "dpo.jsonl").write_text("\n".join(json.dumps(r) for r in dpo))
    (d / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in sft))
    (d / "probes.jsonl").write_text("\n".join(json.dumps({"prompt": f"Probe {i}?"}) for i in range(3)))
    return {"dpo": d / "dpo.jsonl", "sft": d / "sft.jsonl", "probes": d / "probes.jsonl"}


@pytest.mark.parametrize(("method", "sft_weight"), [("dpo", 0.0), ("dpo", 1.0), ("sft", 0.0)])
def test_training_changes_weights_and_writes_a_servable_adapter(tiny_base, data, method, sft_weight, tmp_path):
    cfg = TrainConfig(method=method, rank=4, alpha=8, epochs=1, batch_size=2, grad_accum=1, lr=1e-2,
                      save_dtype="float32", sft_weight=sft_weight)
    res = train_adapter(data[method], "tiny-stance", tmp_path / "out", cfg, base=str(tiny_base), progress=False,
                        command="stanceserve train ...")
    out = res.out_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "training_metrics.json", "training_curves.png"} <= {
        p.name for p in out.iterdir()}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert lora_b and any(float(t.abs().max()) > 0 for t in lora_b)  # peft starts B at zero: training moved it
    weights, cfg_json = load_adapter_weights(out, "t", linear_shapes(build_tiny_model("llama")), max_rank=64)
    assert cfg_json["r"] == 4 and len(weights.modules) == 2 * 4  # q,k,v,o in 2 layers
    m = json.loads((out / "training_metrics.json").read_text())
    assert m["method"] == method and m["dataset"]["rows"] == 8 and len(m["dataset"]["sha256"]) == 64
    assert len(m["steps"]) == 4 and all("loss" in s and s["step_time_s"] is not None for s in m["steps"])
    assert m["parameters"]["trainable"] > 0 and m["parameters"]["total"] > m["parameters"]["trainable"]
    assert m["hyperparameters"]["rank"] == 4 and m["total_time_s"] > 0 and m["command"]
    if method == "dpo":
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(m["steps"][-1])
        assert m["summary"]["final_reward_margin"] is not None
        # plain DPO starts at log(2); with the chosen-answer NLL added (RPO) the loss is far larger
        assert (m["steps"][0]["loss"] > 2.0) == (sft_weight > 0)
    assert (out / "training_curves.png").stat().st_size > 1000


def test_eval_and_inspect_run_locally(tiny_base, data, tmp_path):
    from training.evaluate import LocalGenerator, evaluate_scheduling, evaluate_stance
    from training.inspect_adapter import adapter_update_norms

    cfg = TrainConfig(method="dpo", rank=4, alpha=8, epochs=1, batch_size=2, grad_accum=1, lr=1e-2)
    out = train_adapter(data["dpo"], "curious-uncertainty", tmp_path / "ad", cfg, base=str(tiny_base), progress=False).out_dir
    gen = LocalGenerator(str(tiny_base))
    try:
        tok = gen.loaded.tokenizer
        res = evaluate_stance(gen, str(out), ["Probe 1?", "Probe 2?"], "curious-uncertainty",
                              report_path=tmp_path / "r.md", max_tokens=6,
                              likelihood_model=gen.loaded.model, likelihood_tokenizer=tok)
        sched = evaluate_scheduling(gen, str(out), n=3, seed=1, max_tokens=8)
    finally:
        gen.close()
    assert 0.0 <= res["fraction_different"] <= 1.0 and res["marker"]["n_base"] == 2
    assert "curious-uncertainty" in (tmp_path / "r.md").read_text()
    assert sched["base"]["n"] == 3 and "by_difficulty" in sched["adapter"]
    rows = adapter_update_norms(out)
    assert len(rows) == 8 and all(r["norm"] > 0 for r in rows)


@pytest.mark.slow
def test_register_uploads_to_a_running_server_and_the_key_is_written_nowhere(tiny_base, data, tmp_path):
    key = "newcomer-secret-123"
    env = {"STANCESERVE_ADMIN_KEY": key, "STANCESERVE_ADAPTERS_DIR": str(tmp_path / "store")}
    serve = [*APP_CLI, "serve", "--model", str(tiny_base), "--device", "cpu"]
    run = tmp_path / "run"
    with run_server(serve, tmp_path / "server.log", env) as server:
        url = server.base
        # the README's old form: the key itself on the command line (the env form is preferred and never recorded)
        cmd = [sys.executable, *APP_CLI, "train", "--method", "sft", "--data", str(data["sft"]), "--name",
               "fresh-stance", "--base", str(tiny_base), "--rank", "4", "--epochs", "1", "--batch-size", "4",
               "--max-steps", "1", "--grad-accum", "1", "--out", str(run), "--register", url, "--admin-key", key,
               "--quiet"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "STANCESERVE_ADMIN_KEY": ""})
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout)
        assert report["registered"]["name"] == "fresh-stance"
        assert "--admin-key on the command line is visible" in done.stderr
        info = httpx.get(f"{url}/v1/adapters/fresh-stance").json()
        assert info["metadata"]["training"]["method"] == "sft" and info["metadata"]["dataset"]["rows"] == 8
        assert "command" not in info["metadata"] and str(data["sft"]) not in json.dumps(info)  # no local paths
        r = httpx.post(f"{url}/v1/chat/completions", json={
            "model": "fresh-stance", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        answers = [httpx.get(f"{url}{p}").text for p in ("/v1/adapters", "/v1/adapters/fresh-stance", "/v1/models",
                                                            "/health", "/ready")]
    assert key not in done.stdout and key not in done.stderr and all(key not in a for a in answers)
    written = [p for p in run.rglob("*") if p.is_file()]
    assert written and all(key.encode() not in p.read_bytes() for p in written)
    recorded = json.loads((run / "training_metrics.json").read_text())["command"]
    assert "--admin-key ***" in recorded
    assert key not in (tmp_path / "server.log").read_text(errors="replace")
    stored = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert stored and all(key.encode() not in p.read_bytes() for p in stored)
