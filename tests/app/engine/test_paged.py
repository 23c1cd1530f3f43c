"""The paged KV cache: block bookkeeping under random traffic, and greedy tokens under preemption and prefix hits.

* A hypothesis state machine drives a :class:`~app.engine.kv_cache.BlockPool` and its
  :class:`~app.engine.prefix_cache.PrefixCache` through the scheduler's block operations (admit with a prefix
  hit, grow by a block, finish, preempt the newest) and checks after every step that no block leaks, no block is
  written by two sequences (or written while shared), a block is never handed out while a sequence reads it (each
  block's content is tracked), and the free count adds up.
* Engines with a KV budget far below their traffic preempt sequences and resume them by recomputing their KV;
  every request's greedy tokens still equal transformers' (and peft's), with the prefix cache on and off, every
  block comes back, and ``/metrics`` counts the preemptions.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from hypothesis import event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from app.engine.kv_cache import BLOCK_SIZE, BlockPool, PagedKVCache, blocks_for, default_budget, token_bytes
from app.engine.prefix_cache import PrefixCache, block_keys
from app.engine.sampling import SamplingParams
from app.metrics import Metrics
from tests.factories import FakeStore, block_bytes, collect, make_engine, metric, reference_greedy, write_peft_adapter

B = BLOCK_SIZE


class BlockTraffic(RuleBasedStateMachine):
    """Sequences taking, sharing and giving back blocks as the scheduler does (see the module docstring).

    The model of the KV contents: ``content[b]`` is what block ``b`` holds, ``(stance, tokens of the block)`` once
    written, ``None`` when taken (zeroed). A sequence expects its blocks to hold its own tokens.
    """

    STANCES = (b"s0", b"s1")
    SYSTEMS = (list(range(100, 100 + 2 * B)), list(range(300, 300 + 3 * B + 5)))

    def __init__(self) -> None:
        super().__init__()
        self.cache = PagedKVCache(1, 1, 1, 13, torch.float32, "cpu", max_cached=8)  # 12 usable blocks
        self.pool: BlockPool = self.cache.pool
        self.prefix = PrefixCache(self.cache)
        self.seqs: list[dict] = []  # live sequences: stance, tokens (fed so far), table, cached, order
        self.content: dict[int, tuple | None] = {}
        self.order = 0
        self.preempted = 0

    # ------------------------------------------------------------------ helpers
    def _write(self, seq: dict, start: int, end: int) -> None:
        """Sequence ``seq`` writes positions ``start .. end - 1``: only blocks it alone holds and no key names."""
        for p in range(start, end):
            b = seq["table"][p // B]
            assert self.pool.refs[b] == 1, f"block {b} written while shared"
            assert b not in self.pool._key_of, f"cached block {b} written"
            assert not any(b in o["table"] for o in self.seqs if o is not seq), f"block {b} has two writers"
        for i in range(start // B, blocks_for(end)):
            self.content[seq["table"][i]] = (seq["stance"], tuple(seq["tokens"][i * B : (i + 1) * B]))

    def _admit(self, stance: bytes, tokens: list[int]) -> bool:
        hit = self.prefix.match(stance, tokens)
        if hit.blocks:
            event("prefix hit")
        need = blocks_for(len(tokens)) - len(hit.blocks)
        if need > self.pool.available(hit.blocks):
            return False
        shared = self.prefix.take(hit, tokens)
        new = self.cache.allocate(need)
        assert new is not None
        for b in new:
            self.content[b] = None
        seq = {"stance": stance, "tokens": list(tokens), "table": shared + new, "cached": len(shared) * B,
               "order": self.order}
        self.order += 1
        self.seqs.append(seq)
        self._write(seq, seq["cached"], len(tokens))  # prefill
        self.prefix.store(stance, tokens, seq["table"])  # its prompt's full blocks, as at the end of a prefill
        return True

    def _release(self, seq: dict) -> None:
        self.seqs.remove(seq)
        self.cache.release(seq["table"])

    # ------------------------------------------------------------------ rules
    @rule(stance=st.sampled_from(STANCES), system=st.sampled_from((None, 0, 1)), n=st.integers(1, 3 * B + 3),
          seed=st.integers(0, 3))
    def admit(self, stance, system, n, seed):
        """A new prompt, often after a shared system prompt (a prefix hit when its blocks are cached)."""
        head = [] if system is None else self.SYSTEMS[system]
        self._admit(stance, head + [1000 + 7 * seed + i for i in range(n)])

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 100), steps=st.integers(1, 2 * B))
    def grow(self, i, steps):
        """Decode ``steps`` tokens; a missing block preempts the newest sequence (possibly this one)."""
        seq = self.seqs[i % len(self.seqs)]
        for _ in range(steps):
            if seq not in self.seqs:
                return
            pos = len(seq["tokens"])
            if blocks_for(pos + 1) > len(seq["table"]):
                if not self.pool._free:
                    event("an evictable block reused" if self.pool._evictable else "no block left")
                got = self.cache.allocate(1)
                if got is None:
                    self.preempt_newest()
                    continue
                self.content[got[0]] = None
                seq["table"] += got
            seq["tokens"].append(2000 + pos)
            self._write(seq, pos, pos + 1)

    @precondition(lambda self: self.seqs)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        self._release(self.seqs[i % len(self.seqs)])

    @precondition(lambda self: self.seqs)
    @rule()
    def preempt_newest(self):
        """Key its full blocks, give them back, and resume it at once if blocks allow (a prefix hit on its own)."""
        seq = max(self.seqs, key=lambda s: s["order"])
        self.prefix.store(seq["stance"], seq["tokens"], seq["table"])
        self._release(seq)
        self.preempted += 1
        event("preempted")
        self._admit(seq["stance"], seq["tokens"])

    # ------------------------------------------------------------------ invariants
    @invariant()
    def bookkeeping_adds_up(self):
        self.pool.check()  # free + evictable + in use == capacity, each block in one state, the index consistent
        held = {}
        for s in self.seqs:
            for b in s["table"]:
                held[b] = held.get(b, 0) + 1
        assert all(self.pool.refs[b] == held.get(b, 0) for b in range(1, self.pool.num_blocks)), "a reference leaks"
        assert self.pool.in_use == len(held)

    @invariant()
    def readers_see_their_tokens(self):
        """No block is handed to another sequence (or zeroed) while a sequence reads it; cached keys name contents."""
        for s in self.seqs:
            for i, b in enumerate(s["table"][: len(s["tokens"]) // B]):
                assert self.content[b] == (s["stance"], tuple(s["tokens"][i * B : (i + 1) * B])), f"block {b} changed"
        for key, b in self.pool._block_of.items():
            stance, toks = self.content[b]
            assert len(toks) == B

    def teardown(self):
        for s in list(self.seqs):
            self._release(s)
        self.pool.check()
        assert self.pool.in_use == 0 and self.pool.free == self.pool.capacity  # nothing leaked


TestBlockTraffic = BlockTraffic.TestCase
TestBlockTraffic.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_block_keys_chain_the_stance_and_every_earlier_block():
    a, b = list(range(2 * B)), list(range(B)) + list(range(50, 50 + B))
    ka, kb = block_keys(b"s", a, 2), block_keys(b"s", b, 2)
    assert ka[0] == kb[0] and ka[1] != kb[1]
    assert block_keys(b"t", a, 1) != ka[:1]


def test_a_budget_below_one_sequence_is_refused():
    per_block = token_bytes(2, 2, 8, torch.float32) * B
    cache = PagedKVCache.budgeted(2, 2, 8, torch.float32, "cpu", budget_bytes=5 * per_block, max_len=64)
    assert cache.num_blocks == 5 and cache.pool.capacity == 4
    with pytest.raises(ValueError, match="one sequence of 65 tokens needs"):
        PagedKVCache.budgeted(2, 2, 8, torch.float32, "cpu", budget_bytes=5 * per_block, max_len=65)


def prompt(n, seed):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("prefix_bytes", [1 << 20, 0], ids=["prefix-cache", "no-prefix-cache"])
def test_greedy_tokens_under_preemption_and_prefix_hits_equal_transformers(tiny_model, tokenizer, arch, tmp_path,
                                                                           prefix_bytes):
    """Five requests (base and an adapter, two sharing a cached 2-block system prompt) decode 20 tokens each across
    block boundaries in a cache of 10 blocks, where they need 19: the newest are preempted and resumed, and every
    request's tokens equal transformers' (peft's for the adapter) run alone; all blocks come back."""
    a1 = write_peft_adapter(tmp_path / "a1", arch, model=tiny_model, rank=4, seed=1)
    system = prompt(2 * B, 7)
    asks = [(system + prompt(3, 1), "tiny"), (system + prompt(14, 2), "tiny"), (prompt(17, 3), "a1"),
            (prompt(30, 4), "tiny"), (prompt(9, 5), "a1")]
    n = 20
    refs = [reference_greedy(tiny_model, p, n, a1 if s == "a1" else None) for p, s in asks]
    metrics = Metrics()
    eng = make_engine(tiny_model, tokenizer, FakeStore({"a1": a1}), metrics=metrics, max_model_len=96,
                      kv_cache_memory_bytes=11 * block_bytes(tiny_model), prefix_cache_memory_bytes=prefix_bytes)
    try:
        sch = eng.scheduler
        assert eng.kv_cache.pool.capacity == 10
        params = lambda: SamplingParams(max_tokens=n, temperature=0)  # noqa: E731
        asyncio.run(collect(eng, system + prompt(2, 9), SamplingParams(max_tokens=1), eng.resolve_stance("tiny")))
        hold = threading.Thread(target=sch.call, args=(lambda: time.sleep(0.5),))
        hold.start()  # the engine thread sleeps while the requests arrive, so they are admitted together

        async def together():
            return await asyncio.gather(*(collect(eng, p, params(), eng.resolve_stance(s)) for p, s in asks))

        outs = asyncio.run(together())
        hold.join()
        assert [toks for toks, _, _ in outs] == refs
        assert sch.preemptions > 0
        text = metrics.render().decode()
        per_stance = [metric(text, "stanceserve_preemptions_total", stance=s) for s in ("base", "a1")]
        assert sum(per_stance) == metric(text, "stanceserve_preemptions_total") == sch.preemptions
        cached = [fin.cached_tokens for _, _, fin in outs]
        assert cached[:2] == ([2 * B, 2 * B] if prefix_bytes else [0, 0])
        for _ in range(200):
            if sch.num_running == 0:
                break
            time.sleep(0.01)
        eng.kv_cache.pool.check()
        assert eng.kv_cache.pool.in_use == 0
    finally:
        eng.stop()


def test_default_budget_follows_free_memory_and_the_row_cap(tiny_model, tokenizer):
    """Unset kv_cache_memory_bytes: a quarter of the host's free memory on CPU, at most max_batch_size sequences of
    max_model_len tokens (the tiny model's blocks are small, so the cap decides)."""
    assert 0 < default_budget(torch.device("cpu"), max_tokens=1 << 40, per_token=1) <= 1 << 40
    assert default_budget(torch.device("cpu"), max_tokens=10, per_token=3) == 30
    eng = make_engine(tiny_model, tokenizer, FakeStore({}), max_batch_size=8, max_model_len=64)
    try:
        assert eng.kv_cache.num_blocks == blocks_for(8 * 64 + B)  # 8 rows of 4 blocks, and the null block
    finally:
        eng.stop()
