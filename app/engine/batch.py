"""The running batch and the prefilling group: which tokens each step runs, and on which KV rows.

Every sequence owns one row of the engine's :class:`~app.engine.kv_cache.KVCache` from admission
to its end; its token ``t`` sits at position ``t``. A step is a :class:`~app.engine.forward.Plan`
of packed tokens:

* :class:`PrefillGroup`: newcomers whose prompts are prefilled chunk by chunk (chunked prefill:
  each step runs at most ``budget`` prompt tokens of the group, packed, no padding); a sequence
  whose prompt is done keeps its last logits until the whole group is done;
* :class:`Batch`: the decoding rows, one token each per step. The batch keeps its sequences on
  KV rows ``0 .. n-1`` in row order (compacting when rows leave or join), so decode attention
  reads the cache as a view.

This module only shapes plans and moves KV rows; it does not run the model, sample, pick
adapters, or talk to clients (:mod:`app.engine.scheduler` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.engine.forward import Plan
from app.engine.grammar import RowMatcher
from app.engine.kv_cache import KVCache
from app.engine.request import GenerationRequest


@dataclass
class Sequence:
    """Engine-side state of one running request.

    Attributes:
        slots: (slot, weight) pairs routing its LoRA terms.
        kv_row: its KV cache row (-1 once released).
        prefilled: prompt tokens whose KV is in the row, in tokens.
        cached: prompt tokens that came from the prefix cache, in tokens.
        prefix_key: its stance's key in the prefix cache.
        next_pos: position of the next token to feed (= tokens in the KV row once prefilled).
        last_token: the token to feed at the next decode step.
        logits: ``[vocab]`` logits after its last prompt token, kept until its group is done.
        out_ids: generated token ids.
        first_token_at, last_token_at: ``perf_counter`` times, in seconds.
        matcher: its grammar state under constrained decoding (created at its first sampled token), or ``None``.
    """

    req: GenerationRequest
    slots: list[tuple[int, float]]
    generator: torch.Generator | None
    kv_row: int = -1
    prefilled: int = 0
    cached: int = 0
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
    def written(self) -> int:
        """Positions of its KV row a step may have written (what to zero when the row is released)."""
        return max(self.next_pos + 1, self.prompt_len)


class Batch:
    """Rows decoding together, on KV rows ``0 .. n-1`` of ``cache`` whenever it can.

    Attributes:
        seqs: one :class:`Sequence` per row, in KV row order.
        cache: the engine's KV cache.
    """

    def __init__(self, cache: KVCache) -> None:
        self.seqs: list[Sequence] = []
        self.cache = cache

    def __len__(self) -> int:
        return len(self.seqs)

    def decode_plan(self, rows: list[int] | None = None) -> Plan:
        """The plan of one decode step for every row (or only ``rows``, indices into :attr:`seqs`)."""
        seqs = self.seqs if rows is None else [self.seqs[i] for i in rows]
        return Plan.build([(s.kv_row, [s.last_token], s.next_pos) for s in seqs], self.cache.k[0].device)

    def extend(self, seqs: list[Sequence]) -> None:
        """Add prefilled sequences, then compact."""
        self.seqs = self.seqs + seqs
        self._compact()

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into :attr:`seqs`; the others' KV rows are already released), then compact."""
        if len(rows) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in rows]
        self._compact()

    def _compact(self) -> None:
        """Move sequences on KV rows ``>= n`` into free rows below ``n``, then order :attr:`seqs` by KV row."""
        n = len(self.seqs)
        for s in sorted(self.seqs, key=lambda s: -s.kv_row):
            if s.kv_row < n:
                break
            dst = self.cache.lowest_free()
            if dst is None or dst >= n:
                break
            self.cache.move(s.kv_row, dst, s.written)
            s.kv_row = dst
        self.seqs.sort(key=lambda s: s.kv_row)


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
        return all(s.prefilled >= s.prompt_len for s in self.seqs)

    def next_chunk(self, budget_tokens: int, device: torch.device) -> tuple[list[Sequence], Plan]:
        """The sequences and plan of the next chunk: at most ``budget_tokens`` prompt tokens (at least one).

        Sequences are served in order; each gets what is left of the budget. The plan's logits are
        each chunk sequence's last token (the prompt's last token for those it completes).
        """
        budget = max(1, budget_tokens)
        seqs, rows = [], []
        for s in self.seqs:
            left = s.prompt_len - s.prefilled
            if left <= 0:
                continue
            take = min(left, budget)
            seqs.append(s)
            rows.append((s.kv_row, s.req.prompt_ids[s.prefilled : s.prefilled + take], s.prefilled))
            budget -= take
            if budget <= 0:
                break
        return seqs, Plan.build(rows, device)

    @staticmethod
    def advance(seqs: list[Sequence], plan: Plan, logits: torch.Tensor) -> None:
        """Record a chunk's success: progress per sequence, and the logits of those it completed."""
        for i, (s, (_, _, n, _)) in enumerate(zip(seqs, plan.rows)):
            s.prefilled += n
            if s.prefilled >= s.prompt_len:
                s.logits = logits[i]

    def restart(self) -> None:
        """Forget progress past the prefix-cache hit (after a failed chunk; KV writes are idempotent)."""
        for s in self.seqs:
            s.prefilled = s.cached
            s.logits = None
