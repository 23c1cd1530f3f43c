"""The running batch: its sequences, their left-padded KV cache, and the tensors of the next step.

Continuous batching over a Hugging Face model with a ``DynamicCache``: all
rows share one cache of length ``L`` (keys ``[rows, kv_heads, L, head_dim]``
per layer), left-padded, with a 2-D ``attention_mask`` ``[rows, L]`` marking
real positions and per-row ``position_ids``. Newcomers are prefilled as their
own batch, then concatenated in (the shorter cache is padded on the left, as
in TGI's ``CausalLMBatch.concatenate``); finished rows are dropped with an
index select, and all-padding columns on the left are trimmed.

This module only shapes tensors and calls the model; it does not sample, pick
adapters, or talk to clients (:mod:`app.engine.scheduler` does).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from app.engine.request import GenerationRequest


@dataclass
class Sequence:
    """Engine-side state of one running request.

    Attributes:
        slots: (slot, weight) pairs routing its LoRA terms.
        next_pos: position id of the next token to feed, in tokens.
        last_token: the token to feed at the next decode step.
        out_ids: generated token ids.
        first_token_at, last_token_at: ``perf_counter`` times, in seconds.
    """

    req: GenerationRequest
    slots: list[tuple[int, float]]
    generator: torch.Generator | None
    next_pos: int = 0
    last_token: int = -1
    out_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None


def _cache_layers(cache: DynamicCache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") for layer in layers):
        raise TypeError("continuous batching needs a DynamicCache with per-layer keys/values")
    return layers


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Batch:
    """Rows decoding together, with their shared left-padded KV cache.

    Attributes:
        seqs: one :class:`Sequence` per row.
        cache: the ``DynamicCache``, length ``L``.
        mask: ``[rows, L]`` int64, 1 on real tokens.
    """

    def __init__(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        self.seqs = seqs
        self.cache = cache
        self.mask = mask

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @classmethod
    def prefill_inputs(
        cls, prompts: list[list[int]], pad_id: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prefill tensors for ``prompts``.

        Returns:
            ``input_ids`` ``[rows, T]``, ``attention_mask`` ``[rows, T]``, ``position_ids`` ``[rows, T]``.
        """
        t = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), t), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, t - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, t - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(device), mask.to(device), pos.to(device)

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tensors of the next decode step; extends :attr:`mask` by one column.

        Returns:
            ``input_ids`` ``[rows, 1]``, ``attention_mask`` ``[rows, L+1]``, ``position_ids`` ``[rows, 1]``.
        """
        dev = self.mask.device
        ids = torch.tensor([[s.last_token] for s in self.seqs], dtype=torch.long, device=dev)
        pos = torch.tensor([[s.next_pos] for s in self.seqs], dtype=torch.long, device=dev)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], dim=1)
        return ids, self.mask, pos

    def extend(self, other: Batch) -> None:
        """Append ``other``'s rows (their caches are left-padded to a common length)."""
        if not self.seqs:
            self.seqs, self.cache, self.mask = other.seqs, other.cache, other.mask
            return
        la, lb = self.length, other.length
        n = max(la, lb)
        for a, b in zip(_cache_layers(self.cache), _cache_layers(other.cache)):
            a.keys = torch.cat([_pad_left(a.keys, n - la, 2), _pad_left(b.keys, n - lb, 2)], dim=0)
            a.values = torch.cat([_pad_left(a.values, n - la, 2), _pad_left(b.values, n - lb, 2)], dim=0)
        self.mask = torch.cat([_pad_left(self.mask, n - la, 1), _pad_left(other.mask, n - lb, 1)], dim=0)
        self.seqs = self.seqs + other.seqs

    def truncate(self, length: int) -> None:
        """Roll the cache and mask back to their first ``length`` columns (undo a failed step's appends)."""
        self.mask = self.mask[:, :length]
        for layer in _cache_layers(self.cache):
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]

    def select(self, rows: list[int]) -> Batch:
        """A new batch of ``rows`` with its own copy of their cache (this batch is left untouched)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in _cache_layers(self.cache)]
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        return Batch([self.seqs[i] for i in rows], cache, self.mask.index_select(0, index))

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into :attr:`seqs`), then trim all-padding columns on the left."""
        if len(rows) == len(self.seqs):
            return
        self.seqs = [self.seqs[i] for i in rows]
        if not rows:
            self.mask = self.mask[:0]
            self.cache = DynamicCache()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if real.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        for layer in _cache_layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


class PrefillGroup:
    """Newcomers whose prompts are being prefilled, possibly over several steps (chunked prefill).

    The prompts are left-padded to a common length ``T``; each :meth:`next_chunk` hands out the
    next ``chunk`` columns. When all ``T`` columns are done the group becomes a :class:`Batch`
    (:meth:`to_batch`) and joins the running rows.

    Attributes:
        seqs: the rows.
        ids, mask, pos: ``[rows, T]`` padded prompt ids, attention mask and position ids.
        done: columns prefilled so far, in tokens.
    """

    def __init__(self, seqs: list[Sequence], pad_id: int, device: torch.device, config) -> None:
        self.seqs = seqs
        self.ids, self.mask, self.pos = Batch.prefill_inputs([s.req.prompt_ids for s in seqs], pad_id, device)
        self.cache = DynamicCache(config=config)
        self.done = 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    @property
    def finished(self) -> bool:
        return self.done >= self.length

    def next_chunk(self, budget_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next chunk's tensors, at most ``budget_tokens`` padded tokens (at least one column).

        Returns:
            ``input_ids`` ``[rows, c]``, ``attention_mask`` ``[rows, done + c]``, ``position_ids`` ``[rows, c]``.
        """
        c = max(1, min(self.length - self.done, budget_tokens // max(1, len(self.seqs))))
        a, b = self.done, self.done + c
        self.done = b
        return self.ids[:, a:b], self.mask[:, :b], self.pos[:, a:b]

    def to_batch(self) -> Batch:
        """The prefilled rows as a running :class:`Batch` (call once :attr:`finished`)."""
        return Batch(self.seqs, self.cache, self.mask)
