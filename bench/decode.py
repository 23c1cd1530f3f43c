"""Where a decode step's time goes: the step alone, the roofline of its matmuls, a per-op profile; and prefix reuse.

* :func:`decode_step` runs the engine's own forward pass for ``rows`` sequences of ``context`` tokens,
  one token each, on the calling thread (no scheduler, no sampling), and times it: the same
  :class:`~app.engine.forward.Plan` and LoRA routing the scheduler builds; on CUDA also replayed from
  its CUDA graph (:mod:`app.engine.graphs`).
* :func:`alternating_steps` times decode steps of several mixes (and LoRA decode kernels: ``embedding_bag``
  and BGMV, :mod:`app.engine.lora_kernels`) interleaved step by step, for ratios a drifting machine does not skew.
* :func:`step_vs_roofline` times the base step and, in alternating rounds, only its matmuls (the
  roofline): the same fused (q/k/v, o, gate/up, down, lm_head) weights, prepacked when the engine packs
  them, at the same batch: what the step cannot beat here.
* :func:`weight_bytes` counts the bytes of weights one decode step must read, base and LoRA, so the bench
  can say how close to base speed an adapter mix can come on a step bound by reading weights.
* :func:`profile_step` gives the per-op split of one step (``torch.profiler``, self CPU/CUDA time per
  op, averaged over steps), so the bench shows where each remaining millisecond goes.
* :func:`attention_kernels` times one layer's decode attention through the C++ CPU kernel
  (:mod:`app.engine.cpu_kernels`), the batched-matmul path and SDPA; :func:`kernel_steps` times whole decode
  steps with the kernel on and off, interleaved.
* :func:`shared_prefix` is the TTFT of concurrent requests sharing a long stance system prompt, with
  the prefix cache and without it.

Nothing here asserts a target; ``stanceserve bench`` prints the numbers.
"""

from __future__ import annotations

import asyncio
import copy
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from app.engine.forward import ForwardPass
from app.engine.graphs import DecodeGraphs
from app.engine.lora import LoRABatch
from app.engine.plan import DecodeGroup, Plan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _step(engine: Any, rows: int, context: int, routes: list[list[tuple[int, float]]], graphs: bool = False):
    """A prefilled KV cache of ``rows`` x ``context`` tokens and the closure running one decode step on it
    (with ``graphs``, through :class:`~app.engine.graphs.DecodeGraphs`: CUDA graphs on CUDA)."""
    dec = engine.forward_pass
    cache, tables = dec.row_cache(rows, context + 2)
    g = torch.Generator().manual_seed(0)
    vocab = dec.lm_head.out_features
    prompts = torch.randint(min(100, vocab // 2), min(1000, vocab), (rows, context), generator=g).tolist()
    plan = Plan.build([(tables[i], p, 0) for i, p in enumerate(prompts)], dec.device)
    dec.forward(plan, cache, LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype, segments=plan.segments))
    step = Plan.build([(tables[i], [7], context) for i in range(rows)], dec.device)
    routing = LoRABatch.from_rows(routes, device=dec.device, dtype=dec.dtype)
    if not graphs:
        return lambda: dec.forward(step, cache, routing)
    static = DecodeGraphs(dec, cache, engine.lora, max_rows=rows, max_terms=max(len(r) for r in routes) or 1,
                          max_len=context + 2)
    if static.run(step, routing) is None:
        raise RuntimeError(f"no decode graph for this step: {static.disabled or 'no bucket'}")
    return lambda: static.run(step, routing)


def decode_step(engine: Any, routes: list[list[tuple[int, float]]], *, context: int, repeats: int = 10,
                graphs: bool = False) -> float:
    """Median seconds of one decode step of ``len(routes)`` rows at ``context`` tokens each, routed by ``routes``
    (with ``graphs``: replayed from its CUDA graph, inputs copied in and logits out as the scheduler does).

    Raises:
        RuntimeError: with ``graphs``, the step could not be captured (the message says why).
    """
    return _timed(_step(engine, len(routes), context, routes, graphs), engine.forward_pass.device, repeats)


def attention_kernels(engine: Any, rows: int, context: int, *, repeats: int = 20) -> dict[str, Any]:
    """Median seconds of one layer's decode attention for ``rows`` rows of ``context`` positions (random keys and
    values on blocks handed out round-robin, one query token per row, ``repeats`` calls per path interleaved),
    through each path of :meth:`~app.engine.forward.ForwardPass._decode_attention`: ``kernel`` (the C++ kernel reading the blocks in
    place; ``None`` where it did not build), ``matmul`` (gather + two batched matmuls, fp32 scores) and ``sdpa``
    (gather + ``scaled_dot_product_attention``). The pass's own settings are restored afterwards.

    Returns:
        ``rows``, ``context_tokens``, ``{path}_s`` (seconds) and ``kernel_speedup_vs_matmul``.
    """
    dec = engine.forward_pass
    cache, tables = dec.row_cache(rows, context)
    g = torch.Generator().manual_seed(0)
    for t in (cache.k[0], cache.v[0]):
        t.copy_(torch.randn(t.shape, generator=g))
    tab = torch.tensor(tables, device=dec.device)
    group = DecodeGroup(None, tab, torch.full((rows,), context - 1, device=dec.device), cache.block_size)
    q = torch.randn(rows, dec.num_heads, dec.head_dim, generator=g).to(dec.dtype).to(dec.device)
    own = (dec.attention_kernel, dec.matmul_decode_attention)
    out: dict[str, Any] = {"rows": rows, "context_tokens": context}
    paths = {"kernel": (True, True), "matmul": (False, True), "sdpa": (False, False)}
    try:
        dec.attention_kernel = True
        if dec.kernels() is None:
            out["kernel_s"] = None
            del paths["kernel"]
        times: dict[str, list[float]] = {name: [] for name in paths}
        for rnd in range(repeats + 1):  # the paths interleaved call by call (a shared machine's speed drifts)
            for name, (kern, matmul) in paths.items():
                dec.attention_kernel, dec.matmul_decode_attention = kern, matmul
                _sync(dec.device)
                t0 = time.perf_counter()
                dec._decode_attention(q, group, 0, cache, dec.kernels())
                _sync(dec.device)
                if rnd:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    finally:
        dec.attention_kernel, dec.matmul_decode_attention = own
    out.update({f"{name}_s": round(statistics.median(t), 7) for name, t in times.items()})
    if out["kernel_s"]:
        out["kernel_speedup_vs_matmul"] = round(out["matmul_s"] / out["kernel_s"], 2)
    return out


def kernel_steps(engine: Any, rows: int, context: int, *, rounds: int = 10) -> dict[str, Any]:
    """Median seconds of a base decode step of ``rows`` rows at ``context`` tokens with the C++ attention kernel on
    and off (``ForwardPass.attention_kernel``), the two interleaved step by step; the pass's setting is restored.

    Returns:
        ``rows``, ``context_tokens``, ``kernel_on_step_s``, ``kernel_off_step_s`` and ``speedup``.
    """
    dec = engine.forward_pass
    fn = _step(engine, rows, context, [[] for _ in range(rows)])
    own = dec.attention_kernel
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for on in (True, False):  # warm-up
            dec.attention_kernel = on
            fn()
        for _ in range(rounds):
            for on in (True, False):
                dec.attention_kernel = on
                _sync(dec.device)
                t0 = time.perf_counter()
                fn()
                _sync(dec.device)
                times[on].append(time.perf_counter() - t0)
    finally:
        dec.attention_kernel = own
    on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
    return {"rows": rows, "context_tokens": context, "kernel_on_step_s": round(on_s, 5),
            "kernel_off_step_s": round(off_s, 5), "speedup": round(off_s / on_s, 3)}


def alternating_steps(engine: Any, variants: dict[str, tuple[list[list[tuple[int, float]]], str | None]], *,
                      context: int, rounds: int = 20) -> dict[str, float]:
    """Median seconds of one decode step per variant, the variants' steps interleaved one by one (a busy machine's
    speed drifts within seconds: each variant's samples then come from the same moments).

    Args:
        variants: name -> ``(routes, kernel)``; ``kernel`` a decode kernel name of
            :data:`app.engine.lora_kernels.KERNELS` set on every layer for that variant's steps, or ``None`` for
            each layer's own. The layers' own kernels are restored afterwards.
        rounds: steps timed per variant (one per round, every variant in each round).

    Returns:
        name -> median seconds over its ``rounds`` steps.
    """
    dec = engine.forward_pass
    layers = list(dec.linears.values())
    own = [f.decode_kernel for f in layers]
    fns = {name: _step(engine, len(routes), context, routes) for name, (routes, _) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}

    def use(kernel: str | None) -> None:
        for f, k in zip(layers, own):
            f.decode_kernel = kernel or k

    try:
        for name, (_, kernel) in variants.items():  # warm-up
            use(kernel)
            fns[name]()
        for _ in range(rounds):
            for name, (_, kernel) in variants.items():
                use(kernel)
                _sync(dec.device)
                t0 = time.perf_counter()
                fns[name]()
                _sync(dec.device)
                times[name].append(time.perf_counter() - t0)
    finally:
        use(None)
    return {name: round(statistics.median(t), 6) for name, t in times.items()}


def _matmuls(engine: Any, rows: int):
    """A closure running only the matmuls of one decode step: every fused weight of the model at ``rows`` rows
    (the prepacked weight when the engine packed it)."""
    dec = engine.forward_pass
    layers = list(dec.linears.values())
    xs = {f.in_features: torch.randn(rows, f.in_features, dtype=dec.dtype, device=dec.device) for f in layers}

    def run() -> None:
        for f in layers:
            f.base(xs[f.in_features])

    return run


def step_vs_roofline(engine: Any, rows: int, *, context: int, rounds: int = 5, repeats: int = 5) -> dict[str, float]:
    """The base decode step and its matmul roofline timed in alternating rounds, so that both medians come from the
    same minutes of a machine whose speed drifts (a shared machine can drift 2x within an hour).

    Returns:
        ``step_s`` and ``roofline_s`` (medians over ``rounds`` rounds of ``repeats``-run medians, seconds) and
        ``ratio`` (``step_s / roofline_s``).
    """
    dec = engine.forward_pass
    step = _step(engine, rows, context, [[] for _ in range(rows)])
    matmuls = _matmuls(engine, rows)
    steps, roofs = [], []
    for _ in range(rounds):
        steps.append(_timed(step, dec.device, repeats))
        roofs.append(_timed(matmuls, dec.device, repeats))
    s, r = statistics.median(steps), statistics.median(roofs)
    return {"step_s": round(s, 6), "roofline_s": round(r, 6), "ratio": round(s / r, 3)}


def weight_bytes(engine: Any, routes: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """Bytes of weights one decode step routed by ``routes`` reads: the base model's and the LoRA slots'.

    Every fused base weight is read once per step. Each distinct slot the rows use is read once too
    (``A`` and ``B`` of every enabled layer, at the slots' padded rank), whatever the number of rows
    using it: gathers of one slot by several rows hit the cache.

    Returns:
        ``base_bytes``, ``lora_bytes``, ``slots_read`` and ``bytes_bound_ratio``: ``base / (base + lora)``,
        the highest tok/s ratio to the base model a step bound by reading weights can reach with this mix.
    """
    dec, lora = engine.forward_pass, engine.lora
    base = sum(f.out_features * f.in_features for f in dec.linears.values()) * dec.dtype.itemsize
    slots = {s for r in routes for s, w in r if w != 0.0}
    per_slot = lora.slot_bytes() // max(lora.slots, 1)
    lora_b = len(slots) * per_slot
    return {"base_bytes": base, "lora_bytes": lora_b, "slots_read": len(slots),
            "bytes_bound_ratio": round(base / (base + lora_b), 3)}


def profile_step(engine: Any, routes: list[list[tuple[int, float]]], *, context: int, steps: int = 5,
                 top: int = 12) -> list[dict[str, Any]]:
    """The ``top`` ops of one decode step by self time (ms per step), from ``torch.profiler`` over ``steps`` steps."""
    dec = engine.forward_pass
    fn = _step(engine, len(routes), context, routes)
    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dec.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        _sync(dec.device)
    cuda = dec.device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps  # ms per step
        rows.append({"op": e.key, "ms_per_step": round(t, 3), "calls_per_step": round(e.count / steps, 1)})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    out = rows[:top]
    out.append({"op": "(all ops)", "ms_per_step": round(total, 3), "calls_per_step": None})
    return out


def compiled_step(bm: Any, *, rows: int, context: int, repeats: int = 8) -> dict[str, Any]:
    """Whether ``torch.compile`` pays off for a base decode step: eager (dense, prepacked) vs inductor.

    Each variant runs on its own copy of the model: eager over dense weights, eager over oneDNN-prepacked
    weights (what the engine runs on CPU), and ``torch.compile(dynamic=False)`` of the dense forward with
    inductor's weight freezing (which prepacks for oneDNN itself on CPU; on CUDA the default mode).

    Returns:
        ``{variant}_step_s`` (median seconds), ``compile_s`` (the first compiled call, seconds), and
        ``compiled_vs_engine`` (compiled step / the engine's own eager step).
    """
    import torch._inductor.config as inductor_config  # torch.compile's inductor: only for the compiled-step scenario

    out: dict[str, Any] = {"rows": rows, "context_tokens": context}
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, min(1000, bm.vocab_size), (rows, context), generator=g).tolist()
    for name in ("eager_dense", "eager_prepacked", "compiled"):
        dec = ForwardPass(copy.deepcopy(bm.model), prepack=rows if name == "eager_prepacked" else None)
        cache, tables = dec.row_cache(rows, context + 2)
        dec.forward(Plan.build([(tables[i], p, 0) for i, p in enumerate(prompts)], dec.device), cache, None)
        step = Plan.build([(tables[i], [7], context) for i in range(rows)], dec.device)
        fwd = dec.forward
        if name == "compiled":
            inductor_config.freezing = dec.device.type == "cpu"
            fwd = torch.compile(dec.forward, dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                fwd(step, cache, None)
            _sync(dec.device)
            out["compile_s"] = round(time.perf_counter() - t0, 1)
        with torch.no_grad():
            out[f"{name}_step_s"] = round(_timed(lambda f=fwd, s=step, c=cache: f(s, c, None), dec.device, repeats), 5)
        del dec, cache
    engine = out["eager_prepacked_step_s"] if bm.device.type == "cpu" else out["eager_dense_step_s"]
    out["compiled_vs_engine"] = round(out["compiled_step_s"] / engine, 3)
    return out


def shared_prefix(eb: Any, stance: Any, *, system_tokens: int = 500, requests: int = 16) -> dict[str, Any]:
    """TTFT of ``requests`` concurrent requests sharing a ``system_tokens`` system prompt: prefix cache on vs off.

    The cache is warmed by one request first (as a stance's first user would); each measured request
    then adds ``eb.prompt_len`` tokens of its own. "Off" runs the same requests with the engine's prefix
    cache detached.
    """
    sch = eb.engine.scheduler
    rng = eb._rng
    system = [rng.randrange(100, 1000) for _ in range(system_tokens)]

    def batch() -> list[list[int]]:
        return [system + eb.prompt() for _ in range(requests)]

    async def go(prompts: list[list[int]]) -> list[dict]:
        return await asyncio.gather(*(eb._one(stance, max_tokens=eb.max_tokens, prompt=p) for p in prompts))

    prefix = sch.prefix
    out: dict[str, Any] = {"system_tokens": system_tokens, "suffix_tokens": eb.prompt_len, "requests": requests}
    if prefix is None:
        out["error"] = "the engine's prefix cache is off (prefix_cache_memory_bytes=0)"
        return out
    asyncio.run(go(batch()[:1]))  # warm: the system prompt's blocks enter the cache
    hits0 = prefix.hits
    on = asyncio.run(go(batch()))
    out["cached_tokens_per_request"] = round((prefix.hits - hits0) / requests, 1)
    sch.prefix = None
    try:
        off = asyncio.run(go(batch()))
    finally:
        sch.prefix = prefix
    t_on = statistics.median(r["ttft"] for r in on)
    t_off = statistics.median(r["ttft"] for r in off)
    out.update({"ttft_s_p50_prefix_cache": round(t_on, 4), "ttft_s_p50_no_prefix_cache": round(t_off, 4),
                "ratio": round(t_on / t_off, 3)})
    return out
