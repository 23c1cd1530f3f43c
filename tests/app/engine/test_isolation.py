"""Fault isolation in the engine: a row that fails at any stage ends alone; its neighbours are untouched.

Each test runs good rows (base, adapters, a blend) alone first, then together with a bad row that fails
at a chosen stage (fault injection through ``Scheduler.fault_hook``, or a real fault: non-finite logits,
an out-of-range seed, an adapter that cannot load into a slot). The good rows must produce exactly the
greedy tokens they produce alone, the bad row exactly one error, and no slot may stay pinned nor KV block held.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from app.engine.request import ErrorEvent, FinishEvent, Stance, TokenEvent
from app.engine.sampling import SamplingParams
from app.errors import GenerationError, InternalError, NotReadyError, StanceServeError
from app.registry.adapter import AdapterVersion, AdapterWeights, LoRAModuleWeights
from tests.factories import FakeStore, build_tiny_model, make_engine, write_peft_adapter

STAGES = ["admission", "prefill", "decode", "sampling", "detokenize"]
GOOD = [([1, 45, 80, 99], "a1"), ([1, 300, 12], "a2"), ([1, 7, 8, 9, 10, 11], "tiny"), ([1, 200], "blend")]
N = 10


class Injected(RuntimeError):
    """The fault a test injects."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    model = build_tiny_model("llama")
    root = tmp_path_factory.mktemp("iso")
    dirs = {
        "a1": write_peft_adapter(root / "a1", "llama", model=model, rank=4, seed=1, scale=0.5),
        "a2": write_peft_adapter(root / "a2", "llama", model=model, rank=8, alpha=16, seed=2, scale=0.5),
    }
    return model, tokenizer, FakeStore(dirs)


async def run_all(eng, jobs):
    """Run (prompt, params, stance) jobs together; each gives (tokens, finish or None, errors)."""

    async def one(prompt, params, stance):
        toks, fin, errs = [], None, []
        stream = eng.open(prompt, params, stance)
        async for ev in stream:
            if isinstance(ev, TokenEvent):
                toks.append(ev.token_id)
            elif isinstance(ev, FinishEvent):
                fin = ev
            elif isinstance(ev, ErrorEvent):
                errs.append(ev.error)
        return toks, fin, errs

    return await asyncio.gather(*(one(*j) for j in jobs))


def stance_of(eng, name):
    return eng.resolve_stance("tiny", {"a1": 0.6, "a2": -0.8}) if name == "blend" else eng.resolve_stance(name)


def assert_clean(eng):
    """No row left running or waiting, no slot pinned, no KV block held (the engine thread retires rows just after
    their last event)."""
    sched = eng.scheduler
    for _ in range(200):
        if sched.num_running == 0 and sched.num_waiting == 0:
            break
        time.sleep(0.01)
    assert sched.num_running == 0 and sched.num_waiting == 0
    assert all(n == 0 for n in eng.slots._refs.values()), eng.slots._refs
    pool = eng.kv_cache.pool
    pool.check()
    assert pool.in_use == 0 and pool.free == pool.capacity  # a failed row's blocks came back too


def alone_outputs(eng):
    outs = []
    for prompt, name in GOOD:
        [(toks, fin, errs)] = asyncio.run(run_all(eng, [(prompt, SamplingParams(max_tokens=N, temperature=0),
                                                         stance_of(eng, name))]))
        assert not errs and fin.reason == "length"
        outs.append(toks)
    assert len({tuple(t) for t in outs}) == len(outs)  # the stances really differ
    return outs


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("after", [0, 3])
def test_a_row_failing_at_any_stage_fails_alone(setup, stage, after):
    """The bad row (adapter a1, in the middle of the batch) fails at ``stage`` after ``after`` calls."""
    model, tok, store = setup
    if stage in ("admission", "prefill") and after:
        pytest.skip("admission and prefill happen once per request")
    eng = make_engine(model, tok, store, prefill_chunk_tokens=512)
    try:
        ref = alone_outputs(eng)
        calls = {"n": 0}
        bad_params = SamplingParams(max_tokens=N, temperature=0)

        def hook(st, req):
            if st == stage and req.params is bad_params:
                calls["n"] += 1
                if calls["n"] > after:
                    raise Injected(f"injected at {st}")

        eng.scheduler.fault_hook = hook
        jobs = [(p, SamplingParams(max_tokens=N, temperature=0), stance_of(eng, n)) for p, n in GOOD]
        jobs.insert(2, ([1, 45, 80, 99, 5], bad_params, stance_of(eng, "a1")))
        outs = asyncio.run(run_all(eng, jobs))
        bad = outs.pop(2)
        assert bad[1] is None and len(bad[2]) == 1  # exactly one error, no finish
        err = bad[2][0]
        assert isinstance(err, InternalError) and "request id" in err.message
        # a failed batched forward is retried row by row to find the faulty row: the hook runs again then
        assert calls["n"] == after + 1 if stage not in ("prefill", "decode") else calls["n"] >= after + 1
        for (toks, fin, errs), want in zip(outs, ref):
            assert not errs and fin.reason == "length"
            assert toks == want
        assert_clean(eng)
    finally:
        eng.stop()


def test_non_finite_logits_fail_only_their_row(setup):
    """A blend weight of 1e30 (past the API's bound) overflows to non-finite logits: that row alone fails."""
    model, tok, store = setup
    eng = make_engine(model, tok, store)
    try:
        ref = alone_outputs(eng)
        a1 = stance_of(eng, "a1").terms[0][0]
        huge = Stance.blend({a1: 1e30})
        jobs = [(p, SamplingParams(max_tokens=N, temperature=0), stance_of(eng, n)) for p, n in GOOD]
        jobs.append(([1, 9, 9], SamplingParams(max_tokens=N, temperature=1.0, seed=3), huge))
        outs = asyncio.run(run_all(eng, jobs))
        toks, fin, errs = outs.pop()
        assert fin is None and len(errs) == 1 and isinstance(errs[0], GenerationError)
        assert [o[0] for o in outs] == ref
        assert_clean(eng)
    finally:
        eng.stop()


def test_bad_seed_and_unloadable_adapter_release_their_slot(setup):
    """With ONE slot: a seed torch refuses, then an adapter whose weights cannot go into a slot, each fail
    alone at admission, and the slot is free again for the next request."""
    model, tok, store = setup
    eng = make_engine(model, tok, store, max_loras=1)
    try:
        a1 = stance_of(eng, "a1")
        [(toks, fin, errs)] = asyncio.run(run_all(eng, [([1, 5], SamplingParams(max_tokens=4, seed=2**70), a1)]))
        assert len(errs) == 1 and fin is None
        broken = AdapterWeights(AdapterVersion("broken", "0" * 64), {"model.layers.0.no_such_proj": LoRAModuleWeights(
            torch.zeros(2, 64), torch.zeros(64, 2), 1.0)})
        [(toks, fin, errs)] = asyncio.run(run_all(eng, [([1, 5], SamplingParams(max_tokens=4), Stance.single(broken))]))
        assert len(errs) == 1 and fin is None
        [(toks, fin, errs)] = asyncio.run(run_all(eng, [([1, 5], SamplingParams(max_tokens=4, temperature=0), a1)]))
        assert not errs and fin.completion_tokens == 4
        assert_clean(eng)
    finally:
        eng.stop()


def test_stream_never_hangs_when_the_engine_dies(setup, monkeypatch):
    """If the engine thread is gone, a waiting stream ends with not_ready within its poll interval."""
    model, tok, store = setup
    eng = make_engine(model, tok, store)
    from app.engine.engine import RequestStream

    monkeypatch.setattr(RequestStream, "poll_s", 0.05)

    async def run():
        stream = eng.open([1, 5, 6], SamplingParams(max_tokens=10_000, ignore_eos=True), stance_of(eng, "a1"))
        eng.scheduler._stop = True  # the thread leaves its loop and fails the rows: simulate a silent death
        with eng.scheduler._cv:
            eng.scheduler._waiting.clear()
        events = []
        async for ev in stream:
            events.append(ev)
        return events

    try:
        events = asyncio.run(asyncio.wait_for(run(), 10))
    finally:
        eng.stop()
    assert isinstance(events[-1], ErrorEvent)
    assert isinstance(events[-1].error, (NotReadyError, StanceServeError))
