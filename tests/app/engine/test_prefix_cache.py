"""Prefix reuse per stance: reused KV gives the logits of a cold prefill, and never crosses stances.

The forward-level tests copy cached blocks into a fresh KV row and prefill only the rest of the prompt,
then compare with a cold prefill of the whole prompt; the engine-level tests check what requests see:
``cached_tokens`` in the finish event (the admission event carries it to metrics too), the same greedy tokens as without the cache, and no reuse across
adapters, blend weights or a replaced adapter's new content.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest
import torch

from app.engine.forward import Decoder, Plan
from app.engine.lora import LoRABatch, MultiLoRA
from app.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, stance_key
from app.engine.request import Stance
from app.engine.sampling import SamplingParams
from tests.app.engine.test_engine import collect
from tests.factories import FakeStore, make_engine, read_adapter, write_peft_adapter


def prompt(n, seed):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def cached_and_tokens(eng, model, ask, max_tokens):
    """``(cached_tokens, token ids)`` of one greedy request on stance ``model``."""
    toks, _, fin = await collect(eng, ask, SamplingParams(max_tokens=max_tokens, temperature=0.0), eng.resolve_stance(model))
    return fin.cached_tokens, toks


def run(dec, cache, row, tokens, start, routes):
    plan = Plan.build([(row, tokens[start:], start)], dec.device)
    routing = LoRABatch.from_rows([routes], device=dec.device, dtype=dec.dtype, segments=plan.segments)
    return dec.forward(plan, cache, routing)[0]


@pytest.mark.parametrize("routes", [[], [(0, 1.0)], [(0, 0.6), (1, -0.4)]], ids=["base", "adapter", "blend"])
def test_reused_kv_gives_the_logits_of_a_cold_prefill(tiny_model, arch, tmp_path, routes):
    dec = Decoder(copy.deepcopy(tiny_model))
    lora = MultiLoRA(dec.linears, max_slots=2)
    for slot in (0, 1):
        lora.write_slot(slot, read_adapter(write_peft_adapter(tmp_path / f"a{slot}", arch, model=tiny_model, seed=slot), f"a{slot}"))
    cache = dec.new_cache(3, 128)
    pc = PrefixCache(cache, 1 << 20)
    system = prompt(3 * BLOCK_TOKENS + 5, 0)
    first, second = system + prompt(7, 1), system + prompt(9, 2)
    key = b"stance-under-test"
    run(dec, cache, 0, first, 0, routes)
    assert pc.store(key, first, 0) == len(first) // BLOCK_TOKENS
    hit = pc.load(key, second, 1)
    assert hit == 3 * BLOCK_TOKENS  # the shared whole blocks
    warm = run(dec, cache, 1, second, hit, routes)
    cold = run(dec, cache, 2, second, 0, routes)
    assert not torch.equal(cache.k[0][1, :, hit:], torch.zeros_like(cache.k[0][1, :, hit:]))
    torch.testing.assert_close(warm, cold, atol=1e-5, rtol=1e-5)
    assert pc.load(b"another stance", second, 2) == 0  # keys are per stance
    assert pc.load(key, first[: 2 * BLOCK_TOKENS], 2) == BLOCK_TOKENS  # at least one token is left to prefill


def test_pool_evicts_least_recently_used_blocks(tiny_model):
    dec = Decoder(copy.deepcopy(tiny_model))
    cache = dec.new_cache(1, 64)
    pc = PrefixCache(cache, 2 * PrefixCache(cache, 1 << 20).block_bytes)  # room for two blocks
    assert pc.blocks == 2
    a, b = prompt(BLOCK_TOKENS + 1, 3), prompt(BLOCK_TOKENS + 1, 4)
    pc.store(b"s", a, 0)
    pc.store(b"s", b, 0)
    assert pc.load(b"s", a, 0) == BLOCK_TOKENS  # touches a: b is now the oldest
    pc.store(b"s", prompt(BLOCK_TOKENS + 1, 5), 0)
    assert pc.load(b"s", b, 0) == 0 and pc.load(b"s", a, 0) == BLOCK_TOKENS
    assert PrefixCache(cache, 0).load(b"s", a, 0) == 0  # a zero budget turns it off


def test_stance_key_names_adapter_content_and_weights(tiny_model, tmp_path):
    a = read_adapter(write_peft_adapter(tmp_path / "a", "llama", model=tiny_model, seed=1), "a")
    b = read_adapter(write_peft_adapter(tmp_path / "b", "llama", model=tiny_model, seed=2), "a")  # same name, new content
    keys = {stance_key(s) for s in (Stance.base(), Stance.single(a), Stance.single(b), Stance.blend({a: 0.5}),
                                    Stance.blend({a: 0.25}))}
    assert len(keys) == 5


@pytest.mark.parametrize("arch", ["llama"])
def test_engine_reuses_a_shared_system_prompt_per_stance(tiny_model, tokenizer, arch, tmp_path):
    dirs = {n: write_peft_adapter(tmp_path / n, arch, model=tiny_model, seed=i) for i, n in enumerate(("a1", "a2"))}
    system = prompt(4 * BLOCK_TOKENS, 7)
    asks = [system + prompt(5, 10 + i) for i in range(3)]

    def serve(prefix_bytes):
        eng = make_engine(tiny_model, tokenizer, FakeStore(dirs), prefix_cache_memory_bytes=prefix_bytes)
        try:
            return [asyncio.run(cached_and_tokens(eng, m, a, 6)) for m, a in (("a1", asks[0]), ("a1", asks[1]), ("a2", asks[2]), ("tiny", asks[0]))]
        finally:
            eng.stop()

    warm, cold = serve(1 << 20), serve(0)
    assert [c for c, _ in warm] == [0, 4 * BLOCK_TOKENS, 0, 0]  # a hit only for the same stance
    assert [c for c, _ in cold] == [0, 0, 0, 0]
    assert [t for _, t in warm] == [t for _, t in cold]  # and the same greedy tokens


def test_admission_counts_only_the_prompt_tokens_the_prefix_cache_leaves(tiny_model, tokenizer):
    """Three requests sharing a cached 64-token system prompt, 5 tokens of their own each, with a 16-token
    prefill chunk: one group and one prefill step for all three (counting whole 69-token prompts made a group
    of each), and the same greedy tokens as with the cache off."""
    system = prompt(4 * BLOCK_TOKENS, 7)
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
    assert [c for c, _ in warm] == [4 * BLOCK_TOKENS] * 3 and warm_steps == 1
    assert cold_steps >= 3 * 5  # 69 tokens each in chunks of 16, one request per group
    assert [t for _, t in warm] == [t for _, t in cold]
