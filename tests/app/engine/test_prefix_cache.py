"""Prefix reuse per stance: shared KV blocks give the logits of a cold prefill, and never cross stances.

The forward-level tests key a prefilled sequence's full blocks, share them at the head of a second sequence's
block table (no copy) and prefill only the rest of its prompt, then compare with a cold prefill of the whole
prompt; the engine-level tests check what requests see: ``cached_tokens`` in the finish event (the admission
event carries it to metrics too), the same greedy tokens as without the cache, and no reuse across adapters,
blend weights or a replaced adapter's new content.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest
import torch

from app.engine.forward import ForwardPass
from app.engine.kv_cache import BLOCK_SIZE, blocks_for
from app.engine.lora import LoRABatch, MultiLoRA
from app.engine.plan import Plan
from app.engine.prefix_cache import PrefixCache, stance_key
from app.engine.request import Stance
from app.engine.sampling import SamplingParams
from tests.factories import FakeStore, collect, drain, make_engine, read_adapter, write_peft_adapter


def prompt(n, seed):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def cached_and_tokens(eng, model, ask, max_tokens):
    """``(cached_tokens, token ids)`` of one greedy request on stance ``model``."""
    toks, _, fin = await collect(eng, ask, SamplingParams(max_tokens=max_tokens, temperature=0.0), eng.resolve_stance(model))
    return fin.cached_tokens, toks


def run(dec, cache, table, tokens, start, routes):
    plan = Plan.build([(table, tokens[start:], start)], dec.device)
    routing = LoRABatch.from_rows([routes], device=dec.device, dtype=dec.dtype, segments=plan.segments)
    return dec.forward(plan, cache, routing)[0]


@pytest.mark.parametrize("routes", [[], [(0, 1.0)], [(0, 0.6), (1, -0.4)]], ids=["base", "adapter", "blend"])
def test_shared_blocks_give_the_logits_of_a_cold_prefill(tiny_model, arch, tmp_path, routes):
    dec = ForwardPass(copy.deepcopy(tiny_model))
    lora = MultiLoRA(dec.linears, max_slots=2)
    for slot in (0, 1):
        lora.write_slot(slot, read_adapter(write_peft_adapter(tmp_path / f"a{slot}", arch, model=tiny_model, seed=slot), f"a{slot}"))
    cache = dec.new_cache(32, max_cached=32)
    pc = PrefixCache(cache)
    system = prompt(3 * BLOCK_SIZE + 5, 0)
    first, second = system + prompt(7, 1), system + prompt(9, 2)
    key = b"stance-under-test"
    t1 = cache.allocate(blocks_for(len(first)))
    run(dec, cache, t1, first, 0, routes)
    assert pc.store(key, first, t1) == len(first) // BLOCK_SIZE
    hit = pc.match(key, second)
    assert hit.tokens(BLOCK_SIZE) == 3 * BLOCK_SIZE and hit.blocks == t1[:3]  # the shared whole blocks, no copy
    t2 = pc.take(hit, second)
    t2 += cache.allocate(blocks_for(len(second)) - len(t2))
    assert [cache.pool.refs[b] for b in t1[:3]] == [2, 2, 2]
    warm = run(dec, cache, t2, second, 3 * BLOCK_SIZE, routes)
    t3 = cache.allocate(blocks_for(len(second)))
    cold = run(dec, cache, t3, second, 0, routes)
    torch.testing.assert_close(warm, cold, atol=1e-5, rtol=1e-5)
    assert pc.match(b"another stance", second).blocks == []  # keys are per stance
    assert pc.match(key, first[: 2 * BLOCK_SIZE]).tokens(BLOCK_SIZE) == BLOCK_SIZE  # at least one token is left to prefill
    for t in (t1, t2, t3):
        cache.release(t)
    cache.pool.check()
    assert cache.pool.free == cache.pool.capacity and cache.pool.cached == 3  # keyed blocks stay, evictable
    assert pc.match(key, second).blocks == t1[:3]


def test_keyed_blocks_are_reused_least_recently_used_first(tiny_model):
    """Unreferenced keyed blocks are handed out only when no plain free block is left, least recently used first;
    the index holds at most max_cached keys; a zero max_cached turns the cache off."""
    dec = ForwardPass(copy.deepcopy(tiny_model))
    cache = dec.new_cache(5, max_cached=3)  # 4 usable blocks
    pc = PrefixCache(cache)
    a, b = prompt(BLOCK_SIZE + 1, 3), prompt(BLOCK_SIZE + 1, 4)
    for p in (a, b):
        t = cache.allocate(2)
        pc.store(b"s", p, t)
        cache.release(t)
    assert cache.pool.cached == 2 and cache.pool.free == 4
    hit = pc.match(b"s", a)
    pc.take(hit, a)  # touches a: b is now the least recently used
    cache.release(hit.blocks)
    got = cache.allocate(3)  # two plain free blocks, then b's block
    assert pc.match(b"s", b).blocks == [] and pc.match(b"s", a).tokens(BLOCK_SIZE) == BLOCK_SIZE
    cache.release(got)
    for i in range(3):  # three more keys: past max_cached the oldest (a) goes
        t = cache.allocate(1)
        pc.store(b"s", prompt(BLOCK_SIZE, 10 + i), t)
        cache.release(t)
    assert cache.pool.cached == 3 and pc.match(b"s", a).blocks == []
    cache.pool.check()
    off = PrefixCache(dec.new_cache(5))
    assert not off.enabled and off.store(b"s", a, [1, 2]) == 0 and off.match(b"s", a).blocks == []


def test_stance_key_names_adapter_content_and_weights(tiny_model, tmp_path):
    a = read_adapter(write_peft_adapter(tmp_path / "a", "llama", model=tiny_model, seed=1), "a")
    b = read_adapter(write_peft_adapter(tmp_path / "b", "llama", model=tiny_model, seed=2), "a")  # same name, new content
    keys = {stance_key(s) for s in (Stance.base(), Stance.single(a), Stance.single(b), Stance.blend({a: 0.5}),
                                    Stance.blend({a: 0.25}))}
    assert len(keys) == 5


@pytest.mark.parametrize("arch", ["llama"])
def test_engine_reuses_a_shared_system_prompt_per_stance(tiny_model, tokenizer, arch, tmp_path):
    dirs = {n: write_peft_adapter(tmp_path / n, arch, model=tiny_model, seed=i) for i, n in enumerate(("a1", "a2"))}
    system = prompt(4 * BLOCK_SIZE, 7)
    asks = [system + prompt(5, 10 + i) for i in range(3)]

    def serve(prefix_bytes):
        eng = make_engine(tiny_model, tokenizer, FakeStore(dirs), prefix_cache_memory_bytes=prefix_bytes)
        try:
            return [asyncio.run(cached_and_tokens(eng, m, a, 6)) for m, a in (("a1", asks[0]), ("a1", asks[1]), ("a2", asks[2]), ("tiny", asks[0]))]
        finally:
            eng.stop()

    warm, cold = serve(1 << 20), serve(0)
    assert [c for c, _ in warm] == [0, 4 * BLOCK_SIZE, 0, 0]  # a hit only for the same stance
    assert [c for c, _ in cold] == [0, 0, 0, 0]
    assert [t for _, t in warm] == [t for _, t in cold]  # and the same greedy tokens


def test_admission_counts_only_the_prompt_tokens_the_prefix_cache_leaves(tiny_model, tokenizer):
    """Three requests sharing a cached 64-token system prompt, 5 tokens of their own each, with a 16-token
    prefill chunk: one group and one prefill step for all three (counting whole 69-token prompts made a group
    of each), and the same greedy tokens as with the cache off."""
    system = prompt(4 * BLOCK_SIZE, 7)
    asks = [system + prompt(5, 20 + i) for i in range(3)]

    def serve(prefix_bytes):
        eng = make_engine(tiny_model, tokenizer, FakeStore({}), prefill_chunk_tokens=16,
                          prefix_cache_memory_bytes=prefix_bytes)
        try:
            asyncio.run(cached_and_tokens(eng, "tiny", system + prompt(5, 19), 4))  # a first user of the system prompt fills the cache
            before = eng.scheduler.timings["prefill_steps"]
            hold = threading.Thread(target=eng.scheduler.call, args=(lambda: time.sleep(0.5),))
            hold.start()  # the engine thread sleeps while the three requests arrive, so they wait together

            async def together():
                return await asyncio.gather(*(cached_and_tokens(eng, "tiny", a, 4) for a in asks))

            out = asyncio.run(together())
            hold.join()
            return out, eng.scheduler.timings["prefill_steps"] - before
        finally:
            eng.stop()

    (warm, warm_steps), (cold, cold_steps) = serve(1 << 20), serve(0)
    assert [c for c, _ in warm] == [4 * BLOCK_SIZE] * 3 and warm_steps == 1
    assert cold_steps >= 3 * 5  # 69 tokens each in chunks of 16, one request per group
    assert [t for _, t in warm] == [t for _, t in cold]


@pytest.mark.parametrize("stance", ["tiny", "a1"])
def test_a_next_turn_shares_the_blocks_of_the_answer(tiny_model, tokenizer, arch, tmp_path, stance):
    """A row that decoded to its end keys its full blocks, generated tokens included: a second turn sending the
    conversation so far (the first prompt, the answer, a new message) prefills only past them, with the greedy
    tokens of a cold prefill. Only the same stance shares them."""
    dirs = {"a1": write_peft_adapter(tmp_path / "a1", arch, model=tiny_model, seed=1)}
    first = prompt(BLOCK_SIZE + 4, 30)
    answer_len = 3 * BLOCK_SIZE

    def serve(prefix_bytes):
        eng = make_engine(tiny_model, tokenizer, FakeStore(dirs), prefix_cache_memory_bytes=prefix_bytes)
        try:
            _, answer = asyncio.run(cached_and_tokens(eng, stance, first, answer_len))
            second = first + answer + prompt(5, 31)
            cached, toks = asyncio.run(cached_and_tokens(eng, stance, second, 8))
            other = "a1" if stance == "tiny" else "tiny"
            cached_other, _ = asyncio.run(cached_and_tokens(eng, other, second, 2))
            return answer, cached, toks, cached_other
        finally:
            eng.stop()

    warm, cold = serve(1 << 20), serve(0)
    assert warm[0] == cold[0] and len(warm[0]) == answer_len
    # the first turn wrote KV for its prompt and every answer token but the last: 67 tokens, 4 full blocks
    assert warm[1] == (len(first) + answer_len - 1) // BLOCK_SIZE * BLOCK_SIZE == 4 * BLOCK_SIZE
    assert warm[1] > len(first) // BLOCK_SIZE * BLOCK_SIZE  # more than the prompt's own blocks
    assert cold[1] == 0 and warm[3] == 0  # no cache, or another stance: nothing shared
    assert warm[2] == cold[2]  # the same greedy tokens as a cold prefill


def test_a_failed_row_keys_none_of_its_generated_blocks(tiny_model, tokenizer):
    first = prompt(BLOCK_SIZE + 4, 40)
    eng = make_engine(tiny_model, tokenizer, FakeStore({}), prefix_cache_memory_bytes=1 << 20)
    try:
        seen = []

        def hook(stage, req):
            if stage == "sampling" and req.prompt_ids == first:
                seen.append(1)
                if len(seen) == 2 * BLOCK_SIZE:
                    raise RuntimeError("injected")

        eng.scheduler.fault_hook = hook
        toks, _, _, errs = asyncio.run(drain(eng, first, SamplingParams(max_tokens=3 * BLOCK_SIZE, temperature=0.0),
                                             eng.resolve_stance("tiny")))
        assert len(errs) == 1 and len(toks) == 2 * BLOCK_SIZE - 1
        eng.scheduler.fault_hook = None
        cached, _ = asyncio.run(cached_and_tokens(eng, "tiny", first + toks + prompt(3, 41), 1))
        assert cached == len(first) // BLOCK_SIZE * BLOCK_SIZE  # the prompt's blocks (keyed at prefill) only
    finally:
        eng.stop()
