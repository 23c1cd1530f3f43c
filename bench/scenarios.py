"""Benchmark scenarios: the stanceserve engine under mixed-stance load, and the naive peft ways.

Each scenario returns a dict of numbers: aggregate output tokens/s, TTFT and
inter-token latency p50/p99 (seconds), decode step time (seconds), and peak
memory (bytes: CUDA allocator peak on GPU, process RSS sampled every 20 ms on
CPU). Requests generate a fixed number of tokens (``ignore_eos``), greedy.
The baselines are what a transformers + peft user does today: ``set_adapter``
between requests served one by one, and one ``generate`` over a batch with
peft's ``adapter_names`` (its mixed-batch inference, which loops over the
distinct adapters in every layer). Nothing here asserts targets: the CLI
prints the numbers.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from app.engine import Engine, EngineConfig, FinishEvent, SamplingParams, Stance, TokenEvent
from app.registry.adapter import AdapterWeights
from app.registry.store import AdapterStore
from app.registry.validation import linear_shapes
from bench.models import BenchModel, random_adapter, save_peft_folder

logger = logging.getLogger(__name__)

#: the service's engine defaults (declared in app.config.Settings)
_DEFAULTS = EngineConfig()
#: context room, in tokens, beyond each prompt: for the shared-prefix scenario's 500-token system prompt
SHARED_PREFIX_ROOM = 512


def pct(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``xs``, or ``None`` if empty."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@contextmanager
def sampled_peak(read: Callable[[], int], interval_s: float) -> Iterator[list[int]]:
    """The largest value ``read()`` returns inside the block, sampled every ``interval_s`` seconds on a thread;
    yields a one-element list that holds it once the block ends."""
    stop, peak = threading.Event(), [0]

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], read())
            stop.wait(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        stop.set()
        t.join()


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int]]:
    """Measure peak memory inside the block: ``{"peak_memory_bytes": ...}``."""
    out: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        return
    import psutil  # [bench] extra, optional: peak RSS only where it is installed

    proc = psutil.Process(os.getpid())
    with sampled_peak(lambda: proc.memory_info().rss, 0.02) as peak:
        yield out
    out["peak_memory_bytes"] = peak[0]


class EngineBench:
    """Runs request mixes through one :class:`Engine` and measures them.

    Args:
        bm: the model to serve.
        prompt_len: tokens per prompt (random ids).
        max_tokens: tokens generated per request.
        max_model_len, kv_cache_memory_bytes: the engine's (default: room for the prompts, the shared-prefix
            scenario's system prompt and the tokens; the service's KV budget).
    """

    def __init__(self, bm: BenchModel, *, prompt_len: int, max_tokens: int, max_loras: int = _DEFAULTS.max_loras,
                 max_batch_size: int = _DEFAULTS.max_batch_size, store: Any = None,
                 max_cpu_loras: int | None = None, prefill_chunk_tokens: int = _DEFAULTS.prefill_chunk_tokens,
                 max_model_len: int | None = None, kv_cache_memory_bytes: int | None = None) -> None:
        self.bm = bm
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        config = EngineConfig(
            max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_batch_size=max_batch_size, max_waiting=10_000,
            prefill_chunk_tokens=prefill_chunk_tokens,
            max_model_len=max_model_len or prompt_len + max_tokens + 16 + SHARED_PREFIX_ROOM,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
        )
        # the peft baselines, adapter shapes and later engines still read the model's dense weights
        self.engine = Engine(bm.model, bm.tokenizer, bm.name, bm.eos_token_ids, config=config, store=store,
                             keep_model_callable=True)
        self.engine.start()
        self._rng = random.Random(0)

    def close(self) -> None:
        self.engine.stop()

    def prompt(self) -> list[int]:
        hi = min(self.bm.vocab_size, 30000)
        return [self._rng.randrange(100, hi) for _ in range(self.prompt_len)]

    async def _one(self, stance: Stance, max_tokens: int | None = None, prompt: list[int] | None = None) -> dict:
        p = SamplingParams(max_tokens=max_tokens or self.max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        times: list[float] = []
        async for ev in self.engine.generate(prompt or self.prompt(), p, stance):
            if isinstance(ev, TokenEvent):
                times.append(time.perf_counter())
            elif isinstance(ev, FinishEvent):
                break
            else:
                raise RuntimeError(f"request failed: {ev}")
        return {"ttft": times[0] - t0, "itl": [b - a for a, b in zip(times, times[1:])], "n": len(times), "t_submit": t0}

    def run(self, stances: list[Stance | str], *, concurrency: int | None = None,
            prompts: list[list[int]] | None = None) -> dict[str, Any]:
        """Send one request per stance (at most ``concurrency`` in flight; ``prompts[i]`` for request ``i``, default
        random prompts of ``prompt_len`` tokens) and measure.

        A stance given as an adapter name is resolved when its request starts (as the API does),
        so reading a cold adapter from disk counts in that request's TTFT.
        """
        conc = concurrency or len(stances)
        sch = self.engine.scheduler

        async def main() -> list[dict]:
            sem = asyncio.Semaphore(conc)

            async def guarded(st: Stance | str, prompt: list[int] | None) -> dict:
                async with sem:
                    t0 = time.perf_counter()
                    if isinstance(st, str):
                        st = await asyncio.to_thread(self.engine.resolve_stance, st)
                    r = await self._one(st, prompt=prompt)
                    r["ttft"] += r.pop("t_submit") - t0  # include the wait for the stance to resolve
                    return r

            return await asyncio.gather(*(guarded(s, prompts[i] if prompts else None) for i, s in enumerate(stances)))

        before = dict(sch.timings)
        with peak_memory(self.bm.device) as mem:
            t0 = time.perf_counter()
            res = asyncio.run(main())
            wall = time.perf_counter() - t0
        after = sch.timings
        steps = after["decode_steps"] - before["decode_steps"]
        ptok, psec = after["prefill_tokens"] - before["prefill_tokens"], after["prefill_s"] - before["prefill_s"]
        tokens = sum(r["n"] for r in res)
        ttft = [r["ttft"] for r in res]
        itl = [x for r in res for x in r["itl"]]
        return {
            "requests": len(stances), "concurrency": conc, "output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tok_per_s": round(tokens / wall, 2),
            "ttft_s_p50": _r(pct(ttft, 0.5)), "ttft_s_p99": _r(pct(ttft, 0.99)),
            "itl_s_p50": _r(pct(itl, 0.5)), "itl_s_p99": _r(pct(itl, 0.99)),
            "decode_step_s": _r((after["decode_s"] - before["decode_s"]) / steps if steps else None),
            "prefill_tok_per_s": round(ptok / psec, 1) if psec else None,
            "decode_rows_per_step": round((after["decode_rows"] - before["decode_rows"]) / steps, 2) if steps else None,
            **mem,
        }

    def busy_ttft(self, probes: int = 5, background: int = 15) -> dict[str, Any]:
        """TTFT of a probe on an idle engine vs while ``background`` other requests decode."""
        base = Stance.base()
        idle = [asyncio.run(self._one(base, max_tokens=2))["ttft"] for _ in range(probes)]

        async def loaded() -> list[float]:
            bg = [asyncio.create_task(self._one(base, max_tokens=100_000)) for _ in range(background)]
            sch = self.engine.scheduler
            while sch.num_running < background or sch._group is not None:  # all decoding
                await asyncio.sleep(0.01)
            out = []
            for _ in range(probes):
                await asyncio.sleep(0.05 * self._rng.random())
                out.append((await self._one(base, max_tokens=2))["ttft"])
            for t in bg:
                t.cancel()
            await asyncio.gather(*bg, return_exceptions=True)
            return out

        self.engine.max_model_len = 1 << 30  # background requests run until cancelled
        busy = asyncio.run(loaded())
        while self.engine.scheduler.num_running:
            time.sleep(0.01)
        return {
            "probe_prompt_tokens": self.prompt_len, "background_requests": background,
            "idle_ttft_s_p50": _r(statistics.median(idle)), "busy_ttft_s_p50": _r(statistics.median(busy)),
            "busy_ttft_s_max": _r(max(busy)),
            "ratio_p50": round(statistics.median(busy) / statistics.median(idle), 3),
        }

    def soak(self, stances: list[Stance], *, requests: int = 1000, max_tokens: int = 4,
             checkpoints: int = 10) -> dict[str, Any]:
        """Memory over ``requests`` short requests (cycling ``stances``, ``len(stances)`` in flight).

        Returns the process RSS (CPU) or the allocator's bytes in use (CUDA) after each ``requests /
        checkpoints`` requests, in bytes, and ``growth_after_warmup_bytes``: the last checkpoint minus the
        first (the first wave warms allocator pools and caches).
        """
        def used() -> int:
            if self.bm.device.type == "cuda":
                torch.cuda.synchronize(self.bm.device)
                return int(torch.cuda.memory_allocated(self.bm.device))
            import psutil  # [bench] extra, optional: peak RSS only where it is installed

            return int(psutil.Process(os.getpid()).memory_info().rss)

        conc = len(stances)
        per = max(conc, requests // checkpoints)
        samples: list[int] = []
        done = 0
        t0 = time.perf_counter()

        async def wave(n: int) -> None:
            sem = asyncio.Semaphore(conc)

            async def one(i: int) -> None:
                async with sem:
                    await self._one(stances[i % conc], max_tokens=max_tokens)

            await asyncio.gather(*(one(i) for i in range(n)))

        while done < requests:
            n = min(per, requests - done)
            asyncio.run(wave(n))
            done += n
            gc.collect()
            samples.append(used())
        return {
            "requests": done, "concurrency": conc, "max_tokens": max_tokens, "wall_s": round(time.perf_counter() - t0, 1),
            "memory_bytes_at_checkpoints": samples, "growth_after_warmup_bytes": samples[-1] - samples[0],
            "growth_after_warmup_fraction": round((samples[-1] - samples[0]) / samples[0], 4),
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 5)


def stance(adapter: AdapterWeights) -> Stance:
    return Stance.single(adapter)


def blend(adapters: list[AdapterWeights]) -> Stance:
    """Equal weights over ``adapters`` (an adapter listed twice gets twice the weight)."""
    terms: dict[AdapterWeights, float] = {}
    for a in adapters:
        terms[a] = terms.get(a, 0.0) + 1.0 / len(adapters)
    return Stance.blend(terms)


# --------------------------------------------------------------------------- baselines (peft)
def peft_model(bm: BenchModel, adapters: list[AdapterWeights], workdir: Path, rank: int, alpha: float) -> Any:
    """A peft model over a copy of the base with every adapter loaded under its name (``a0``, ``a1``...)."""
    dirs = [save_peft_folder(a, workdir / f"peft-{i}", rank=rank, alpha=alpha, dtype=torch.float32)
            for i, a in enumerate(adapters)]
    base = copy.deepcopy(bm.model)
    pm = PeftModel.from_pretrained(base, dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], start=1):
        pm.load_adapter(d, adapter_name=f"a{i}")
    return pm.eval()


def _generate(pm: Any, bm: BenchModel, ids: torch.Tensor, mask: torch.Tensor, n: int, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None, **kw)


def baseline_serial_set_adapter(pm: Any, bm: BenchModel, prompts: list[list[int]], names: list[str], n: int) -> dict:
    """One request at a time, ``set_adapter`` before each (the per-request switching way)."""
    t0 = time.perf_counter()
    for p, name in zip(prompts, names):
        pm.set_adapter(name)
        ids = torch.tensor([p], device=bm.device)
        _generate(pm, bm, ids, torch.ones_like(ids), n)
    wall = time.perf_counter() - t0
    return {"requests": len(prompts), "output_tok_per_s": round(len(prompts) * n / wall, 2), "wall_s": round(wall, 3)}


def baseline_peft_mixed_batch(pm: Any, bm: BenchModel, prompts: list[list[int]], names: list[str], n: int) -> dict:
    """All requests in one ``generate`` with peft's ``adapter_names`` (mixed-adapter batch)."""
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    t0 = time.perf_counter()
    _generate(pm, bm, ids.to(bm.device), mask.to(bm.device), n, adapter_names=names)
    wall = time.perf_counter() - t0
    return {"requests": len(prompts), "output_tok_per_s": round(len(prompts) * n / wall, 2), "wall_s": round(wall, 3)}


# --------------------------------------------------------------------------- adapter loading
def cold_load(bench: EngineBench, bm: BenchModel, workdir: Path, *, n: int, rank: int, alpha: float) -> dict:
    """Register ``n`` new adapters one after another through a real store, and time each step.

    Measures, per adapter: ``store_add`` (validate + atomic write of an upload already received),
    ``slot_load`` (copy into a free device slot), and ``upload_to_first_token`` (store add, then a
    request on it until its first token).
    """
    store = AdapterStore(workdir / "cold-store", linear_shapes(bm.model), max_rank=64, max_bytes=1 << 31)
    staged = []
    for i in range(n):
        a = random_adapter(bm.model, bm.arch, f"cold{i}", rank=rank, alpha=alpha, seed=10_000 + i)
        staged.append(save_peft_folder(a, workdir / f"cold-upload-{i}", rank=rank, alpha=alpha))
    eng = bench.engine
    add_s, first_s, slot_s = [], [], []
    for i, folder in enumerate(staged):
        t0 = time.perf_counter()
        rec, weights = store.add(f"cold{i}", folder)
        eng.preload(weights)
        t1 = time.perf_counter()
        r = asyncio.run(bench._one(Stance.single(weights), max_tokens=1))
        add_s.append(t1 - t0)
        first_s.append(t1 - t0 + r["ttft"])
        slot_s.append(eng.slots.stats.last_load_seconds)  # this request's own load
        eng.scheduler.call(lambda v=weights.id: eng.slots.drop(v))  # free the slot again: every load is cold
    return {
        "adapters": n, "rank": rank,
        "slot_load_s_p50": _r(pct(slot_s, 0.5)), "slot_load_s_p99": _r(pct(slot_s, 0.99)),
        "store_add_s_p50": _r(pct(add_s, 0.5)), "store_add_s_p99": _r(pct(add_s, 0.99)),
        "upload_to_first_token_s_p50": _r(pct(first_s, 0.5)), "upload_to_first_token_s_p99": _r(pct(first_s, 0.99)),
    }


def many_adapters(bm: BenchModel, workdir: Path, *, n_adapters: int, slots: int, requests: int, concurrency: int,
                  prompt_len: int, max_tokens: int, rank: int, max_cpu_loras: int) -> dict:
    """``n_adapters`` registered on disk, ``slots`` on the device, a random stance per request."""
    root = workdir / "many-store"
    targets = ["q_proj", "v_proj"]
    t0 = time.perf_counter()
    for i in range(n_adapters):
        a = random_adapter(bm.model, bm.arch, f"s{i}", rank=rank, alpha=2.0 * rank, seed=i, targets=targets)
        save_peft_folder(a, root / f"s{i:04d}", rank=rank, alpha=2.0 * rank)
    store = AdapterStore(root, linear_shapes(bm.model), max_rank=64, max_bytes=1 << 31)
    store.scan()
    setup = time.perf_counter() - t0
    bench = EngineBench(bm, prompt_len=prompt_len, max_tokens=max_tokens, max_loras=slots, store=store,
                        max_cpu_loras=max_cpu_loras)
    try:
        rng = random.Random(1)
        names: list[Stance | str] = [f"s{rng.randrange(n_adapters):04d}" for _ in range(requests)]
        stats0 = copy.copy(bench.engine.slots.stats)
        res = bench.run(names, concurrency=concurrency)
        st = bench.engine.slots.stats
        res.update({
            "registered_adapters": n_adapters, "device_slots": slots, "cpu_cached_adapters": max_cpu_loras,
            "adapter_rank": rank, "adapter_targets": targets, "store_setup_s": round(setup, 1),
            "slot_hits": st.hits - stats0.hits, "slot_misses": st.misses - stats0.misses,
            "slot_evictions": st.evictions - stats0.evictions,
            "cpu_cache_hits": bench.engine.weights.hits, "cpu_cache_misses": bench.engine.weights.misses,
        })
        return res
    finally:
        bench.close()
