"""End to end: the real server process on the embedded SmolLM2, driven by the official ``openai`` client.

Uploads two peft adapters, sends concurrent chat requests in different stances
and one blend, checks each greedy output against peft alone, and checks the
Prometheus counters moved by the right amounts.

The server runs ``--dtype auto``, so it serves what the host's CPU would choose: float32, or bfloat16 on a
CPU with native bf16 (``STANCESERVE_CPU_BF16=1`` forces that choice on any host). The reference is peft in the
served dtype:

- float32: the greedy texts are equal.
- bfloat16: two correct bf16 implementations round differently, so greedy answers part at near-ties and then
  diverge. Each served token is checked teacher-forced instead: under the bf16 reference, given the same
  prefix, its logit is within :data:`BF16_ULPS` bf16 spacings (at the top logit's magnitude) of the top logit.
  The budget: each side rounds both logits to bf16 once (half a spacing each, so up to one spacing per side on
  their difference: 2), and the two forward passes accumulate each layer in another order (2 more). Measured
  on SmolLM2 with these prompts and adapters: the largest gap was 1 spacing (0.25 at a top logit of 33).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
from pathlib import Path

import httpx
import pytest
import torch

from app.config import Settings
from tests.factories import APP_CLI, TARGETS, adapter_files, metric, run_server, write_peft_adapter

pytestmark = [pytest.mark.slow, pytest.mark.dtype]

KEY = "e2e-key"
#: bf16 spacings of the top logit that a served bf16 token may trail the bf16 reference's top logit by
BF16_ULPS = 4
N_TOKENS = 16
PROMPTS = [
    "What is the capital of France?",
    "Give me one tip for learning to cook.",
    "Why is the sky blue?",
    "Name a famous scientist.",
]


@pytest.fixture(scope="module")
def smol():
    from app.model_loader import load_base_model

    loaded = load_base_model(Settings(device="cpu", dtype="float32"))
    return loaded


def bf16_spacing(x: float) -> float:
    """The distance between adjacent bfloat16 values at magnitude ``x`` (8 significant bits)."""
    return 2.0 ** (torch.tensor(abs(x)).log2().floor().item() - 7)


@pytest.fixture(scope="module")
def adapters(smol, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-adapters")
    model = smol.model
    return {
        "curious": write_peft_adapter(root / "curious", "llama", model=model, rank=8, alpha=16, seed=5, scale=0.06),
        "expert": write_peft_adapter(root / "expert", "llama", model=model, rank=4, alpha=8, seed=6, scale=0.06,
                                     targets=TARGETS["llama"][:4]),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = tmp_path_factory.mktemp("e2e-store")
    env = {"STANCESERVE_ADMIN_KEY": KEY, "STANCESERVE_ADAPTERS_DIR": str(store), "HF_HUB_OFFLINE": "1"}
    with run_server([*APP_CLI, "serve", "--device", "cpu"], store.parent / "server.log", env, ready_timeout=300) as srv:
        yield srv.base


def reference(smol, adapter_dir: Path | None, dtype: torch.dtype):
    """The base model, or peft over it with ``adapter_dir``, in ``dtype``."""
    from peft import PeftModel

    model = copy.deepcopy(smol.model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.to(dtype)


def prompt_ids(smol, prompt: str) -> torch.Tensor:
    tok = smol.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def peft_greedy(model, smol, prompt: str) -> str:
    tok, ids = smol.tokenizer, prompt_ids(smol, prompt)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=sorted(smol.eos_token_ids),
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def largest_gap_in_spacings(model, smol, prompt: str, served: list[int]) -> float:
    """Teacher-forced on the served tokens: the most, over positions, that a served token's logit trails the
    reference's top logit, in bf16 spacings of that top logit."""
    ids = prompt_ids(smol, prompt)
    full = torch.cat([ids, torch.tensor([served])], dim=1)
    with torch.no_grad():
        logits = model(full).logits[0, ids.shape[1] - 1:-1].float()
    gaps = [(row.max() - row[t]).item() / bf16_spacing(row.max().item()) for row, t in zip(logits, served)]
    return max(gaps)


def test_serve_upload_stances_blend_metrics(server, smol, adapters):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    base_name = client.models.list().data[0].id
    assert base_name == "SmolLM2-135M-Instruct"

    for name, d in adapters.items():
        files = adapter_files(d, content_types=False)
        r = httpx.post(f"{server}/v1/adapters", data={"name": name, "description": f"e2e {name}"}, files=files,
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 201, r.text
    assert {m.id for m in client.models.list().data} == {base_name, "curious", "expert"}
    before = httpx.get(f"{server}/metrics").text

    jobs = [(m, p) for p in PROMPTS for m in (base_name, "curious", "expert")]
    blend = {"curious": 0.7, "expert": 0.3}

    def ask(model, prompt, stances=None):
        extra = {"stances": stances, "return_tokens_as_token_ids": True} if stances else {
            "return_tokens_as_token_ids": True}
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=N_TOKENS, temperature=0, logprobs=True, extra_body=extra)
        served_ids = [int(t.token.removeprefix("token_id:")) for t in r.choices[0].logprobs.content]
        assert len(served_ids) == r.usage.completion_tokens
        return r.choices[0].message.content, r.usage, served_ids

    with cf.ThreadPoolExecutor(8) as pool:
        futures = {pool.submit(ask, m, p): (m, p) for m, p in jobs}
        blend_future = pool.submit(ask, base_name, PROMPTS[0], blend)
        results = {futures[f]: f.result() for f in futures}
        blend_text = blend_future.result()[0]

    stances = (base_name, "curious", "expert")
    for a, b in ((0, 1), (0, 2), (1, 2)):  # every pair of stances answers differently somewhere
        assert any(results[(stances[a], p)][0] != results[(stances[b], p)][0] for p in PROMPTS), (a, b)
    served_dtype = getattr(torch, httpx.get(f"{server}/health").json()["dtype"])
    assert {m.dtype for m in client.models.list().data} == {str(served_dtype).removeprefix("torch.")}
    for m, adapter in ((base_name, None), ("curious", adapters["curious"]), ("expert", adapters["expert"])):
        ref = reference(smol, adapter, served_dtype)
        for prompt in PROMPTS:
            text, _, served_ids = results[(m, prompt)]
            if served_dtype == torch.float32:
                assert text == peft_greedy(ref, smol, prompt), (m, prompt)
            else:
                assert largest_gap_in_spacings(ref, smol, prompt, served_ids) <= BF16_ULPS, (m, prompt)
    assert blend_text not in {results[(m, PROMPTS[0])][0] for m in ("curious", "expert")}

    # streaming through the official client gives the text of the same request not streamed, each run alone: in
    # bf16 a row's rounding can depend on the rows it shares a step with (a one-adapter batch and a mixed one take
    # different LoRA kernels), so the batched answer above is held to the reference's spacings, not to these bits
    alone_text, alone_usage, _ = ask("curious", PROMPTS[1])
    stream = client.chat.completions.create(model="curious", messages=[{"role": "user", "content": PROMPTS[1]}],
                                            max_tokens=N_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == alone_text
    if served_dtype == torch.float32:
        assert alone_text == results[("curious", PROMPTS[1])][0]

    after = httpx.get(f"{server}/metrics").text
    gen = {m: sum(results[(m, p)][1].completion_tokens for p in PROMPTS) for m in (base_name, "curious", "expert")}
    for label, m in (("base", base_name), ("curious", "curious"), ("expert", "expert")):
        # the lone request and its streamed twin, each alone_usage's tokens
        extra = 2 * alone_usage.completion_tokens if label == "curious" else 0
        delta = metric(after, "stanceserve_generation_tokens_total", stance=label) - metric(before, "stanceserve_generation_tokens_total", stance=label)
        assert delta == gen[m] + extra
        n_req = metric(after, "stanceserve_requests_total", stance=label) - metric(before, "stanceserve_requests_total", stance=label)
        assert n_req == len(PROMPTS) + (2 if label == "curious" else 0)
        assert metric(after, "stanceserve_time_to_first_token_seconds_count", stance=label) >= len(PROMPTS)
    assert metric(after, "stanceserve_requests_total", stance="blend") == 1
    assert metric(after, "stanceserve_adapters_registered") == 2
    assert metric(after, "stanceserve_requests_running") == 0
