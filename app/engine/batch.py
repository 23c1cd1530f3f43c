"""The running batch and the prefilling group: which tokens each step runs, and on which KV blocks.

Every sequence holds a block table into the engine's :class:`~app.engine.kv_cache.PagedKVCache` from
admission to its end; its token ``t`` sits at position ``t % block_size`` of block
``blocks[t // block_size]``. A step is a :class:`~app.engine.forward.Plan` of packed tokens:

* :class:`PrefillGroup`: newcomers whose prompts are prefilled chunk by chunk (chunked prefill:
  each step runs at most ``budget`` prompt tokens of the group, packed, no padding); a sequence
  whose prompt is done keeps its last logits until the whole group is done. A sequence resumed
  after preemption prefills its prompt and the tokens it had generated (all but the last, which its
  next decode step feeds);
* :class:`Batch`: the decoding rows, one token each per step.

This module only shapes plans; it does not run the model, sample, take blocks, pick adapters, or
talk to clients (:mod:`app.engine.scheduler`, :mod:`app.engine.admission`, :mod:`app.engine.token_step`
and :mod:`app.engine.outbox` do).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.engine.grammar import RowMatcher
from app.engine.kv_cache import PagedKVCache, blocks_for
from app.engine.plan import Plan
from app.engine.request import GenerationRequest


@dataclass
class Sequence:
    """Engine-side state of one running request.

    Attributes:
        slots: (slot, weight) pairs routing its LoRA terms.
        blocks: its block table (KV cache blocks, in position order; empty once released or preempted).
        order: admission order (a sequence resumed after preemption keeps its own): the newest is preempted first.
        prefilled: tokens of :meth:`prefill_ids` whose KV is in its blocks.
        cached: leading tokens whose blocks came from the prefix cache (at its last admission), in tokens.
        prompt_cached: leading prompt tokens served by the prefix cache at its first admission (reported).
        prefix_key: its stance's key in the prefix cache.
        next_pos: position of the next token to feed (= tokens whose KV its blocks hold once prefilled).
        last_token: the token to feed at the next decode step.
        logits: ``[vocab]`` logits after its last prompt token, kept until its group is done.
        out_ids: generated token ids.
        first_token_at, last_token_at: ``perf_counter`` times, in seconds.
        matcher: its grammar state under constrained decoding (created at its first sampled token), or ``None``.
    """

    req: GenerationRequest
    slots: list[tuple[int, float]]
    generator: torch.Generator | None
    blocks: list[int] = field(default_factory=list)
    order: int = 0
    prefilled: int = 0
    cached: int = 0
    prompt_cached: int = 0
    prefix_key: bytes = b""
    next_pos: int = 0
    last_token: int = -1
    logits: torch.Tensor | None = None
    out_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None
    matcher: RowMatcher | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def prefill_len(self) -> int:
        """Tokens to prefill before decoding: the prompt, or after a preemption every token fed so far."""
        return self.next_pos

    def prefill_ids(self) -> list[int]:
        """The :attr:`prefill_len` tokens to prefill (the prompt, then the generated tokens but the last)."""
        ids = self.req.prompt_ids
        return ids if not self.out_ids else (ids + self.out_ids)[: self.next_pos]

    @property
    def resumed(self) -> bool:
        """It has generated tokens already (its prefill recomputes KV lost to a preemption)."""
        return bool(self.out_ids)

    def blocks_needed(self, block_size: int) -> int:
        """Blocks it needs before its next decode step writes position :attr:`next_pos` (0 or 1)."""
        return max(0, blocks_for(self.next_pos + 1, block_size) - len(self.blocks))


class Batch:
    """Rows decoding together.

    Attributes:
        seqs: one :class:`Sequence` per row.
        cache: the engine's KV cache.
    """

    def __init__(self, cache: PagedKVCache) -> None:
        self.seqs: list[Sequence] = []
        self.cache = cache

    def __len__(self) -> int:
        return len(self.seqs)

    def decode_plan(self, rows: list[int] | None = None) -> Plan:
        """The plan of one decode step for every row (or only ``rows``, indices into :attr:`seqs`)."""
        seqs = self.seqs if rows is None else [self.seqs[i] for i in rows]
        return Plan.build([(s.blocks, [s.last_token], s.next_pos) for s in seqs], self.cache.device,
                          block_size=self.cache.block_size)

    def extend(self, seqs: list[Sequence]) -> None:
        """Add prefilled sequences."""
        self.seqs = self.seqs + seqs

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into :attr:`seqs`; the others' blocks are already released)."""
        if len(rows) != len(self.seqs):
            self.seqs = [self.seqs[i] for i in rows]


class PrefillGroup:
    """Newcomers whose prompts are being prefilled, possibly over several steps (chunked prefill).

    Attributes:
        seqs: the rows; each one's ``prefilled`` counts its progress.
    """

    def __init__(self, seqs: list[Sequence]) -> None:
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def finished(self) -> bool:
        return all(s.prefilled >= s.prefill_len for s in self.seqs)

    def next_chunk(self, budget_tokens: int, device: torch.device, block_size: int) -> tuple[list[Sequence], Plan]:
        """The sequences and plan of the next chunk: at most ``budget_tokens`` prompt tokens (at least one).

        Sequences are served in order; each gets what is left of the budget. The plan's logits are
        each chunk sequence's last token (the prompt's last token for those it completes).
        """
        budget = max(1, budget_tokens)
        seqs, rows = [], []
        for s in self.seqs:
            left = s.prefill_len - s.prefilled
            if left <= 0:
                continue
            take = min(left, budget)
            seqs.append(s)
            rows.append((s.blocks, s.prefill_ids()[s.prefilled : s.prefilled + take], s.prefilled))
            budget -= take
            if budget <= 0:
                break
        return seqs, Plan.build(rows, device, block_size=block_size)

    @staticmethod
    def advance(seqs: list[Sequence], plan: Plan, logits: torch.Tensor) -> None:
        """Record a chunk's success: progress per sequence, and the logits of those it completed."""
        for i, (s, (_, _, n, _)) in enumerate(zip(seqs, plan.rows)):
            s.prefilled += n
            if s.prefilled >= s.prefill_len:
                s.logits = logits[i]

    def restart(self) -> None:
        """Forget progress past the prefix-cache hit (after a failed chunk; KV writes are idempotent)."""
        for s in self.seqs:
            s.prefilled = s.cached
            s.logits = None
