"""Decode steps with static shapes, captured as CUDA graphs and replayed, one per (rows, context, terms) bucket.

A decode step of a small model on a GPU is bound by *launching* its kernels, not by running them:
SmolLM2-135M launches about 20 kernels in each of its 30 layers per step, each for microseconds of
work. A CUDA graph records a step's kernels once and replays them all with one launch, as vLLM's
and SGLang's CUDA-graph runners do for decode. A graph replays fixed shapes at fixed addresses, so
:class:`DecodeGraphs` gives the decode step static shapes:

* **rows** are padded up to a bucket (1, 2, 4, ... ``max_rows``). A padding row decodes token 0 at
  position 0 of a block table of null blocks (:data:`~app.engine.kv_cache.NULL_BLOCK`, which no
  sequence holds) and its logits are dropped; it writes only the null block.
* **context**: attention reads ``L / block_size`` blocks of each row's block table, ``L`` the smallest
  length bucket (128, 256, ... ``max_len``, in multiples of the block size) holding the longest row;
  the block tables are a static ``[max_rows, max_len / block_size]`` buffer, padded with null blocks,
  and the mask, computed inside the graph from the positions, hides each row's positions past its own.
  A step of any rows (their blocks anywhere in the cache) fits a bucket, so the graphs stay valid
  whatever blocks the sequences hold.
* **LoRA terms**: ``K`` (slot, weight) pairs per row, padded to 1, 2, 4 ... ``max_terms`` with weight
  0, through the general gather path (never the uniform-slot shortcut, chosen per batch).

Each bucket's inputs (token ids, positions, KV indices, block tables, LoRA routing) live in static buffers,
filled before each replay; the logits come back as a
copy. A graph reads the LoRA slot tensors at their addresses, so a LoRA bucket is keyed by
:attr:`~app.engine.lora.MultiLoRA.version` (new slot tensors: capture again); loading an adapter into
a slot copies into the same tensors, which a graph then reads.

A captured graph is checked once against the same step run eagerly; a mismatch, or a capture that
fails (an op that synchronises, for example), turns graphs off for the process, with an error in the
log, and the engine runs eagerly: a capture bug costs speed, never output. With ``capture=False``
(CPU: no graphs there, and padding only adds work) the same static-shape step runs eagerly, which is
how the tests check the padding, buckets and buffers on machines without a GPU.

Not here: the forward pass itself (:mod:`app.engine.forward`), which rows decode (:mod:`app.engine.batch`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from app.engine.forward import ForwardPass
from app.engine.kv_cache import NULL_BLOCK, PagedKVCache, blocks_for
from app.engine.lora import LoRABatch, MultiLoRA
from app.engine.plan import Plan

logger = logging.getLogger(__name__)

#: smallest context bucket, in tokens
MIN_LENGTH_BUCKET = 128

#: a captured step's logits may differ from the eager step's by this share of the largest eager logit
CHECK_TOLERANCE = 1e-2

#: ``(rows, context, terms, LoRA version)``; terms 0 is the base model (then the version is -1)
Key = tuple[int, int, int, int]


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from ``smallest`` up to below ``limit``, then ``limit``: ``buckets(12) == [1, 2, 4, 8, 12]``."""
    out = []
    size = max(1, min(smallest, limit))
    while size < limit:
        out.append(size)
        size *= 2
    out.append(limit)
    return out


def bucket_of(n: int, sizes: list[int]) -> int | None:
    """The smallest of ``sizes`` (ascending) that is ``>= n``, or ``None``."""
    return next((s for s in sizes if s >= n), None)


class DecodeGraphs:
    """Static-shape decode steps, one per bucket, captured as CUDA graphs (see the module docstring).

    Args:
        forward_pass: the forward pass; cache: its paged KV cache (the graphs write and read it in place).
        lora: the forward pass's multi-LoRA slots (their :attr:`~app.engine.lora.MultiLoRA.version` keys LoRA graphs).
        max_rows: the largest row bucket (the scheduler's ``max_batch_size``).
        max_len: the longest sequence, in tokens (the engine's ``max_model_len``): the largest context bucket.
        max_terms: the largest terms bucket (the most (slot, weight) pairs a row routes: a blend's members).
        capture: record CUDA graphs (default: on CUDA); ``False`` runs the static-shape step eagerly.

    Attributes:
        row_buckets, length_buckets, term_buckets: the bucket sizes (rows, tokens, pairs).
        disabled: why graphs were turned off, or ``None``.
        stats: ``captured`` graphs and ``replays`` so far.

    Raises:
        ValueError: ``capture`` on a device that is not CUDA.
    """

    def __init__(
        self, forward_pass: ForwardPass, cache: PagedKVCache, lora: MultiLoRA, *, max_rows: int, max_terms: int,
        max_len: int, capture: bool | None = None,
    ) -> None:
        device = forward_pass.device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.forward_pass, self.cache, self.lora = forward_pass, cache, lora
        rows = max(1, max_rows)
        bs = self.block_size = cache.block_size
        self.max_len = blocks_for(max_len, bs) * bs
        self.row_buckets = buckets(rows)
        self.length_buckets = buckets(self.max_len, MIN_LENGTH_BUCKET)
        self.term_buckets = buckets(max(1, max_terms))
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.kv_index = torch.full((rows,), NULL_BLOCK * bs, dtype=torch.long, device=device)
        self.tables = torch.full((rows, self.max_len // bs), NULL_BLOCK, dtype=torch.long, device=device)
        self.logit_index = torch.arange(rows, device=device)  # one token per row
        self.idx = {k: torch.zeros(rows, k, dtype=torch.long, device=device) for k in self.term_buckets}
        self.weights = {k: torch.zeros(rows, k, dtype=forward_pass.dtype, device=device) for k in self.term_buckets}
        self._steps: dict[Key, Callable[[], torch.Tensor]] = {}
        self._pool: Any = None
        self.disabled: str | None = None
        self.stats = {"captured": 0, "replays": 0}

    # ------------------------------------------------------------------ public
    def key(self, plan: Plan, routing: LoRABatch | None) -> Key | None:
        """The bucket that runs decode step ``plan``, or ``None`` when it must run eagerly: graphs are off, it is
        not a decode step, or it has more rows, context or terms than the largest bucket."""
        if self.disabled is not None or not plan.decode or plan.all_logits:
            return None
        rows = bucket_of(len(plan.rows), self.row_buckets)
        length = bucket_of(max(c for *_, c in plan.rows) + 1, self.length_buckets)
        k = 0 if routing is None else int(routing.idx.shape[1])
        terms = bucket_of(k, self.term_buckets) if k else 0
        if rows is None or length is None or terms is None:
            return None
        return rows, length, terms, self.lora.version if terms else -1

    def run(self, plan: Plan, routing: LoRABatch | None) -> torch.Tensor | None:
        """The logits ``[rows, vocab]`` of decode step ``plan`` (writing its KV), through its bucket's step.

        Captures the bucket on its first use. Returns ``None`` when the step has no bucket (:meth:`key`), or
        its capture failed: the caller then runs it eagerly.
        """
        key = self.key(plan, routing)
        if key is None:
            return None
        self._load(key, plan, routing)
        step = self._steps.get(key)
        if step is None:
            step = self._capture(key)
            if step is None:
                return None
        out = step()
        self.stats["replays"] += 1
        return out[: len(plan.rows)].clone()

    def warm_up(self) -> int:
        """Capture every (rows, context) bucket of the base model now (at start-up), largest first so later
        captures reuse the memory pool; LoRA buckets are captured on first use. Returns the steps held.

        Padding rows only: each writes the null block (see the module docstring).
        """
        for rows in reversed(self.row_buckets):
            for length in reversed(self.length_buckets):
                key = (rows, length, 0, -1)
                if self.disabled is not None:
                    return 0
                if key not in self._steps:
                    self._load(key, None, None)
                    self._capture(key)
        return len(self._steps)

    # ------------------------------------------------------------------ internals
    def _load(self, key: Key, plan: Plan | None, routing: LoRABatch | None) -> None:
        """Fill the static inputs of ``key``'s rows: ``plan``'s rows first, padding rows after them."""
        rows, _, terms, _ = key
        n = 0 if plan is None else len(plan.rows)
        if plan is not None:
            assert plan.tables is not None
            width = int(plan.tables.shape[1])
            self.ids[:n].copy_(plan.ids)
            self.positions[:n].copy_(plan.positions)
            self.kv_index[:n].copy_(plan.kv_index)
            self.tables[:n, :width].copy_(plan.tables)
            self.tables[:n, width:].fill_(NULL_BLOCK)
        self.ids[n:rows].zero_()
        self.positions[n:rows].zero_()
        self.kv_index[n:rows].fill_(NULL_BLOCK * self.block_size)
        self.tables[n:rows].fill_(NULL_BLOCK)
        if terms:
            idx, weights = self.idx[terms], self.weights[terms]
            idx[:rows].zero_()
            weights[:rows].zero_()
            if routing is not None:
                k = routing.idx.shape[1]
                idx[:n, :k].copy_(routing.idx)
                weights[:n, :k].copy_(routing.weights)

    def _static_step(self, key: Key) -> torch.Tensor:
        """One decode step of ``key``'s shapes over the static inputs (fresh plan and routing, so nothing
        computed in an earlier run, such as the mask or the gather indices, is reused) -> ``[rows, vocab]``."""
        rows, length, terms, _ = key
        plan = Plan(
            self.ids[:rows], self.positions[:rows], self.kv_index[:rows], [([NULL_BLOCK], i, 1, 0) for i in range(rows)],
            True, self.logit_index[:rows], tables=self.tables[:rows, : length // self.block_size],
            block_size=self.block_size,
        )
        routing = None
        if terms:  # weight 0 on every pair, so no shortcut (unit weights, uniform slot) is taken
            pairs = tuple(((0, 0.0),) * terms for _ in range(rows))
            routing = LoRABatch(pairs, self.idx[terms][:rows], self.weights[terms][:rows])
        return self.forward_pass.forward(plan, self.cache, routing)

    def _capture(self, key: Key) -> Callable[[], torch.Tensor] | None:
        """Record ``key``'s step (with ``capture``; else its eager static step) and check it; ``None`` turns graphs off."""
        if key[2]:  # LoRA steps of older slot tensors can never run again
            for old in [k for k in self._steps if k[2] and k[3] != key[3]]:
                del self._steps[old]
        run = lambda: self._static_step(key)  # noqa: E731
        if not self.capture:
            self._steps[key] = run
            return run
        try:
            step = self._record(run)
            got = step().clone()
            want = run()
            err = float((got.float() - want.float()).abs().max())
            scale = float(want.float().abs().max())
            if not err <= CHECK_TOLERANCE * max(scale, 1.0):  # also catches NaN
                raise RuntimeError(f"the replayed step differs from the eager one by {err:.3g} (largest logit {scale:.3g})")
        except Exception as e:  # noqa: BLE001 - any capture problem: run eagerly from now on
            self._disable(f"decode bucket {key}: {e}")
            return None
        self._steps[key] = step
        self.stats["captured"] += 1
        return step

    def _record(self, run: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """A CUDA graph of ``run`` and the function replaying it (returning its static output)."""
        device = self.forward_pass.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # lazy set-up (cuBLAS handles, workspaces) must happen outside the capture
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: only this (the engine) thread's unsafe calls break the capture, not another thread's
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = run()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    def _disable(self, why: str) -> None:
        self.disabled = why
        self._steps.clear()
        logger.error("CUDA graphs are off, decode runs eagerly: %s", why)
