"""Static-shape decode steps (:mod:`app.engine.graphs`): buckets, padding rows, LoRA versions, and the capture check.

On CPU the static step runs eagerly (``capture=False``): the tests check that padding rows, context buckets,
padded block tables and padded LoRA terms give the logits of the plain decode step (and peft's), that padding
writes only the null block (never a sequence's blocks), and that a capture which replays wrongly or fails turns graphs off. On a CUDA machine the same tests
capture real CUDA graphs.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from app.engine.forward import ForwardPass
from app.engine.graphs import DecodeGraphs, bucket_of, buckets
from app.engine.lora import LoRABatch, MultiLoRA
from app.engine.plan import Plan
from app.engine.sampling import SamplingParams
from tests.factories import (
    FakeStore,
    collect,
    make_engine,
    peft_logits,
    read_adapter,
    reference_greedy,
    write_peft_adapter,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def test_buckets():
    assert buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(16) == [1, 2, 4, 8, 16]
    assert buckets(2048, 128) == [128, 256, 512, 1024, 2048]
    assert buckets(100, 128) == [100]
    assert bucket_of(5, [1, 2, 4, 8]) == 8 and bucket_of(9, [1, 2, 4, 8]) is None


@pytest.fixture
def adapters(tiny_model, arch, tmp_path):
    return (write_peft_adapter(tmp_path / "a1", arch, model=tiny_model, rank=4, alpha=8, seed=1),
            write_peft_adapter(tmp_path / "a2", arch, model=tiny_model, rank=8, alpha=4, seed=2))


def setup(model, adapters, device, *, max_len=160, rows=8, max_terms=4):
    dec = ForwardPass(copy.deepcopy(model).to(device), prepack=4 if device == "cpu" else None)
    lora = MultiLoRA(dec.linears, max_slots=4)
    for slot, (d, name) in enumerate(zip(adapters, ("a1", "a2"))):
        lora.write_slot(slot, read_adapter(d, name))  # copied into the slot tensors on the model's device
    cache, tables = dec.row_cache(rows, max_len)
    return dec, lora, cache, tables, DecodeGraphs(dec, cache, lora, max_rows=rows, max_terms=max_terms, max_len=max_len)


@pytest.mark.parametrize("device", DEVICES)
def test_static_steps_match_the_decode_step_and_peft_and_spare_other_rows(tiny_model, arch, adapters, device):
    """Three rows (adapter, blend, base) padded to the 4-row bucket, decoded across the 128-token context bucket
    on block tables handed out round-robin, next to a fourth sequence mid-prefill: every step's logits equal the
    plain decode step's on a second cache, the adapter row equals peft, the fourth sequence keeps its KV, and the
    padding row wrote only the null block."""
    dec, lora, cache, T, graphs = setup(tiny_model, adapters, device)
    ref_cache, RT = dec.row_cache(8, 160)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (125, 60, 3)]
    routes = [[(0, 1.0)], [(0, 0.5), (1, -0.75)], []]
    for c, tables in ((cache, T), (ref_cache, RT)):
        plan = Plan.build([(tables[i], p, 0) for i, p in enumerate(prompts)], dec.device)
        dec.forward(plan, c, LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype, segments=plan.segments))
    dec.forward(Plan.build([(T[3], list(range(5, 15)), 0)], dec.device), cache, None)  # a 4th sequence: 10 tokens
    row3 = [(k[:, T[3]].clone(), v[:, T[3]].clone()) for k, v in zip(cache.k, cache.v)]
    routing = LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype)
    seqs = [list(p) for p in prompts]
    keys = []
    for step in range(5):
        plan = Plan.build([(T[i], [7 + step], len(s)) for i, s in enumerate(seqs)], dec.device)
        keys.append(graphs.key(plan, routing))
        got = graphs.run(plan, routing)
        want = dec.forward(Plan.build([(RT[i], [7 + step], len(s)) for i, s in enumerate(seqs)], dec.device), ref_cache, routing)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for s in seqs:
            s.append(7 + step)
    assert keys[0] == (4, 128, 2, lora.version) and keys[-1] == (4, 160, 2, lora.version)  # crossed a context bucket
    ref = peft_logits(tiny_model, adapters[0], torch.tensor([seqs[0]]))[0, -1]
    torch.testing.assert_close(got[0].cpu(), ref, atol=1e-4, rtol=1e-4)
    for (k, v), (k0, v0) in zip(zip(cache.k, cache.v), row3):
        assert torch.equal(k[:, T[3]], k0) and torch.equal(v[:, T[3]], v0)
        assert k0.flatten(1, 2)[:, :10].any() and not k0.flatten(1, 2)[:, 10:].any()
        assert not k[:, [b for t in T[4:] for b in t]].any()  # no other block was written
        assert torch.isfinite(k[:, 0]).all()  # (the padding row's writes go to the null block)
    assert graphs.stats["replays"] == 5


def test_steps_without_a_bucket_run_eagerly(tiny_model, arch, adapters):
    dec, lora, cache, T, graphs = setup(tiny_model, adapters, "cpu", max_terms=2)
    three = LoRABatch.from_rows([[(0, 0.2), (1, 0.3), (0, 0.1)]], device=dec.device, dtype=dec.dtype)
    one = LoRABatch.from_rows([[(0, 1.0)]], device=dec.device, dtype=dec.dtype)
    assert graphs.key(Plan.build([(T[0], [5], 4)], dec.device), three) is None  # 3 terms > max_terms 2
    assert graphs.key(Plan.build([(T[0], [5, 6], 4)], dec.device), one) is None  # prefill
    assert graphs.key(Plan.build([(T[0], [5], 4)], dec.device), None) == (1, 128, 0, -1)
    assert graphs.key(Plan.build([(T[5], [5], 4), (T[2], [5], 9)], dec.device), one) == (2, 128, 1, lora.version)  # any blocks
    assert graphs.run(Plan.build([(T[2], [5], 4)], dec.device), three) is None and graphs.stats["replays"] == 0


def test_lora_version_changes_only_with_new_slot_tensors(tiny_model, arch, adapters):
    dec, lora, cache, T, graphs = setup(tiny_model, adapters, "cpu")
    one = LoRABatch.from_rows([[(0, 1.0)]], device=dec.device, dtype=dec.dtype)
    plan = lambda: Plan.build([(T[0], [5], 4)], dec.device)  # noqa: E731
    graphs.run(plan(), one)
    v = lora.version
    lora.write_slot(1, read_adapter(adapters[0], "a1"))  # same rank, enabled layers: copies into the same tensors
    assert lora.version == v
    lora.ensure_capacity(4, 16)  # a larger rank: new slot tensors
    assert lora.version == v + 1
    graphs.run(plan(), one)
    assert [k[3] for k in graphs._steps if k[2]] == [v + 1]  # the old version's step is gone


@pytest.mark.parametrize("fake", ["wrong", "raises", "faithful"])
def test_the_capture_check_turns_graphs_off_when_a_replay_differs(tiny_model, arch, adapters, fake, caplog):
    """A stand-in for the CUDA recorder: a replay that is off by one, one that fails, and a faithful one."""
    dec, lora, cache, T, graphs = setup(tiny_model, adapters, "cpu")
    graphs.capture = True

    def record(run):
        if fake == "raises":
            raise RuntimeError("operation not permitted when stream is capturing")
        return (lambda: run() + 1.0) if fake == "wrong" else run

    graphs._record = record
    routing = LoRABatch.from_rows([[(0, 1.0)], [(1, 1.0)]], device=dec.device, dtype=dec.dtype)
    plan = Plan.build([(T[0], [5], 0), (T[1], [6], 0)], dec.device)
    got = graphs.run(plan, routing)
    if fake == "faithful":
        assert got is not None and graphs.disabled is None and graphs.stats["captured"] == 1
        return
    assert got is None and graphs.disabled is not None and "CUDA graphs are off" in caplog.text
    assert graphs.key(plan, routing) is None and graphs.warm_up() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_the_engine_decodes_through_graphs_token_for_token(tiny_model, tokenizer, arch, tmp_path, device):
    """Mixed stances and a blend, greedy, through the scheduler with static-shape steps warmed up at start:
    the tokens of peft (or the base model) run alone, and every decode step went through a bucket."""
    a1 = write_peft_adapter(tmp_path / "a1", arch, model=tiny_model, rank=4, seed=1)
    prompts = [[1, 45, 80, 99], [1, 300, 12], [1, 7, 8, 9, 10, 11]]
    stances = ["a1", "tiny", "a1"]
    n = 10
    refs = [reference_greedy(tiny_model, p, n, a1 if s == "a1" else None) for p, s in zip(prompts, stances)]
    if device == "cpu":  # the engine makes graphs on CUDA only: give it the eager static steps
        from app.engine.engine import Engine

        eng = Engine(copy.deepcopy(tiny_model), tokenizer, "tiny", {10_000}, store=FakeStore({"a1": a1}), max_loras=4,
                     max_model_len=256)
        eng.graphs = eng.scheduler.graphs = DecodeGraphs(eng.forward_pass, eng.kv_cache, eng.lora, max_rows=16, max_terms=8,
                                                         max_len=256)
        eng.start()
    else:
        eng = make_engine(tiny_model.to(device), tokenizer, FakeStore({"a1": a1}), max_model_len=256)

    async def run():
        return await asyncio.gather(*[
            collect(eng, p, SamplingParams(max_tokens=n, temperature=0), eng.resolve_stance(s))
            for p, s in zip(prompts, stances)
        ])

    try:
        outs = asyncio.run(run())
    finally:
        eng.stop()
    assert [toks for toks, _, _ in outs] == refs
    graphs = eng.graphs
    assert graphs.disabled is None
    assert {(r, length) for r, length, t, _ in graphs._steps if t == 0} >= {(16, 256), (1, 128)}  # warmed up
    assert graphs.stats["replays"] == eng.scheduler.timings["decode_steps"] > 0
