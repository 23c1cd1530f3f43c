"""Capacity: how many concurrent streams the paged KV cache serves, against the same engine capped at 16 rows.

:func:`capacity` runs one engine whose KV budget is what 16 rows of ``max_model_len`` tokens took before the
cache was paged, and alternates, run by run, its scheduler's row cap between 16 (the former default) and the
service's ``max_batch_size`` default, at 16, 64 and 128 concurrent streams of random prompts, for the base model
and one adapter; then 64 streams of chat prompts (:func:`chat_prompts`: short questions under the model's chat
template, which share its system prompt, as the requests of a chat service do). Then a mixed-length load in the
same budget: 4 requests of 1,500 prompt tokens and 60 short ones at once. For each run it reports what
:meth:`~bench.scenarios.EngineBench.run` does (tok/s, TTFT, peak RSS, prefill tok/s) plus the peak KV bytes the
sequences held (the block pool's peak), the most rows one decode step ran, the preemptions, and the TTFT p50
floor: the time prefill compute alone needs for half the prompts at the run's own prefill rate (:func:`ttft_floor`),
which no scheduling beats when every request arrives at once and shares no prefix (random prompts only: chat
prompts share blocks through the prefix cache). Nothing here asserts a target; ``stanceserve bench --scenarios
capacity`` prints it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from app.engine import EngineConfig, Stance
from app.engine.kv_cache import token_bytes
from bench.http_load import PROMPTS
from bench.scenarios import EngineBench, sampled_peak, stance

#: the row cap the service had before the KV cache was paged
FORMER_ROWS = 16


@contextmanager
def kv_peak(bench: EngineBench) -> Iterator[dict[str, int]]:
    """Peak KV bytes in use (the block pool's own peak) and peak decoding rows (sampled every 10 ms) inside the block."""
    sch, pool = bench.engine.scheduler, bench.engine.kv_cache.pool
    out: dict[str, int] = {}
    pool.reset_peak()
    with sampled_peak(lambda: len(sch._batch), 0.01) as rows:
        yield out
    out["kv_bytes_peak"] = pool.peak_in_use * bench.engine.kv_cache.block_bytes
    out["decode_rows_peak"] = rows[0]


def ttft_floor(prompt_tokens: list[int], prefill_tok_per_s: float | None, q: float = 0.5) -> float | None:
    """The TTFT quantile ``q`` that prefill compute alone allows when every request arrives at once, in seconds.

    The ``ceil(q * n)``-th first token cannot come before that many prompts are prefilled, shortest first, at the
    run's own prefill rate (prompt tokens per second of prefill forward passes): a bound no scheduling can beat on
    the machine, whatever it does between prefills.
    """
    if not prefill_tok_per_s or not prompt_tokens:
        return None
    k = max(1, math.ceil(q * len(prompt_tokens)))
    return round(sum(sorted(prompt_tokens)[:k]) / prefill_tok_per_s, 3)


def chat_prompts(bench: EngineBench, n: int) -> list[list[int]]:
    """``n`` chat requests' prompt ids: the load test's short questions (:data:`bench.http_load.PROMPTS`), cycled,
    each one user message under the model's chat template with the assistant turn opened, through the engine's own
    :meth:`~app.engine.Engine.chat_prompt_ids` (what ``/v1/chat/completions`` prefills). With SmolLM2 that is 36-39
    tokens, of which the template's default system prompt and turn markers (the first 24) are the same in every
    prompt, and each question comes back every ``len(PROMPTS)`` (8) requests."""
    return [bench.engine.chat_prompt_ids([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(n)]


def _run(bench: EngineBench, stances: list[Stance], cap: int, prompts: list[list[int]] | None = None, *,
         floor: bool = True) -> dict:
    sch = bench.engine.scheduler
    sch.max_batch_size = cap
    before = sch.preemptions
    with kv_peak(bench) as kv:
        r = bench.run(stances, prompts=prompts)
    r.update(kv)
    r["preemptions"] = sch.preemptions - before
    r["max_batch_size"] = cap
    lengths = [len(p) for p in prompts] if prompts else [bench.prompt_len] * len(stances)
    r["ttft_s_p50_floor"] = ttft_floor(lengths, r.get("prefill_tok_per_s")) if floor else None
    return r


def capacity(bm: Any, adapter: Any, *, streams: tuple[int, ...] = (16, 64, 128), prompt_len: int = 80,
             max_tokens: int = 32, repeats: int = 1, max_model_len: int = 2048, long_prompts: int = 4,
             long_len: int = 1500, short_requests: int = 60, chat_streams: tuple[int, ...] = (64,),
             prefill_chunk_tokens: int | None = None) -> dict[str, Any]:
    """The capacity runs (see the module docstring).

    Args:
        bm: the model; adapter: the one adapter (:class:`~app.registry.adapter.AdapterWeights`).
        streams: concurrent requests per run of random prompts; chat_streams: the same, of chat prompts.
        repeats: rounds; each round runs every (streams, mix) pair at both caps, alternating, and the median
            round is reported per cap.

    Returns:
        ``kv_budget_bytes`` (16 rows of ``max_model_len``), ``kv_bytes_per_token``, per ``{mix}_{streams}``
        (random prompts) and ``chat_{mix}_{streams}`` the ``rows16`` and ``paged`` medians, their tok/s ratio,
        ``prompts`` (``"random"`` or ``"chat"``), ``stance`` and ``streams``; and ``mixed_lengths``.
    """

    default_rows = EngineConfig().max_batch_size
    dec_cfg = bm.model.config
    heads = dec_cfg.num_attention_heads
    head_dim = getattr(dec_cfg, "head_dim", None) or dec_cfg.hidden_size // heads
    per_token = token_bytes(dec_cfg.num_hidden_layers, getattr(dec_cfg, "num_key_value_heads", None) or heads,
                            head_dim, bm.dtype)
    budget = FORMER_ROWS * max_model_len * per_token
    kw = {} if prefill_chunk_tokens is None else {"prefill_chunk_tokens": prefill_chunk_tokens}
    bench = EngineBench(bm, prompt_len=prompt_len, max_tokens=max_tokens, max_batch_size=default_rows,
                        max_model_len=max_model_len, kv_cache_memory_bytes=budget, **kw)
    out: dict[str, Any] = {"kv_budget_bytes": budget, "kv_bytes_per_token": per_token,
                           "prompt_tokens": prompt_len, "max_tokens": max_tokens, "default_max_batch_size": default_rows}
    try:
        mixes = {"base": Stance.base(), "one_adapter": stance(adapter)}
        for st in mixes.values():  # warm-up: the adapter's slot, kernels at both caps
            _run(bench, [st] * 8, FORMER_ROWS)
        chat = chat_prompts(bench, max(chat_streams, default=0))
        workloads = [("random", "", n, None) for n in streams] + [("chat", "chat_", n, chat[:n]) for n in chat_streams]
        runs: dict[tuple[str, str, str], list[dict]] = {}
        for _ in range(repeats):
            for kind, prefix, n, prompts in workloads:
                for name, st in mixes.items():
                    for cap_name, cap in (("rows16", FORMER_ROWS), ("paged", default_rows)):
                        runs.setdefault((f"{prefix}{name}_{n}", kind, cap_name), []).append(
                            _run(bench, [st] * n, cap, prompts, floor=kind == "random"))
        for kind, prefix, n, _ in workloads:
            for name in mixes:
                key = f"{prefix}{name}_{n}"
                row: dict[str, Any] = {"prompts": kind, "stance": name, "streams": n}
                for cap_name in ("rows16", "paged"):
                    rs = sorted(runs[(key, kind, cap_name)], key=lambda r: r["output_tok_per_s"])
                    row[cap_name] = dict(rs[len(rs) // 2], output_tok_per_s_all=[r["output_tok_per_s"] for r in rs])
                row["tok_per_s_ratio"] = round(row["paged"]["output_tok_per_s"] / row["rows16"]["output_tok_per_s"], 3)
                out[key] = row
        if chat:
            out["chat_prompt_tokens"] = sorted({len(p) for p in chat})
        rng = bench._rng
        hi = min(bm.vocab_size, 30000)
        prompts = [[rng.randrange(100, hi) for _ in range(long_len)] for _ in range(long_prompts)]
        prompts += [bench.prompt() for _ in range(short_requests)]
        mixed = _run(bench, [Stance.base()] * len(prompts), default_rows, prompts)
        mixed.update({"long_requests": long_prompts, "long_prompt_tokens": long_len, "short_requests": short_requests,
                      "kv_budget_fraction_peak": round(mixed["kv_bytes_peak"] / budget, 3)})
        out["mixed_lengths"] = mixed
        out["summary"] = {
            k: {"tok_per_s_ratio": v["tok_per_s_ratio"], "ttft_s_p50_paged": v["paged"]["ttft_s_p50"],
                "ttft_s_p50_rows16": v["rows16"]["ttft_s_p50"], "peak_rss_paged": v["paged"].get("peak_memory_bytes"),
                "peak_rss_rows16": v["rows16"].get("peak_memory_bytes"),
                "ttft_s_p50_floor_paged": v["paged"]["ttft_s_p50_floor"]}
            for k, v in out.items() if isinstance(v, dict) and "tok_per_s_ratio" in v
        }
        out["summary"]["mixed_lengths_ran_together"] = mixed["decode_rows_peak"] >= long_prompts + short_requests // 2
        ratios = [v["tok_per_s_ratio"] for v in out["summary"].values() if isinstance(v, dict)]
        if ratios:
            out["summary"]["ratio_median"] = round(statistics.median(ratios), 3)
    finally:
        bench.close()
    return out
