"""Per-row LoRA routing of one forward pass: each row's (slot, weight) pairs, as the tensors and index sets
the fused layers (:mod:`app.engine.lora`) and decode kernels (:mod:`app.engine.lora_kernels`) read.

A :class:`LoRABatch` is built once per step by the scheduler (or by a static decode step,
:mod:`app.engine.graphs`) and shared by every layer, so what it derives (the ``embedding_bag`` indices,
the prefill's tokens per slot, whether every row is one and the same slot) is computed once per step.

Not here: the layers, slots and kernels that read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch


@dataclass(frozen=True)
class LoRABatch:
    """Per-row adapter routing for one forward pass.

    Attributes:
        rows: each row's (slot, weight) pairs; ``()`` for the base model.
        idx: slot indices, ``[rows, K]`` int64, on the model's device.
        weights: blend weights, ``[rows, K]`` in the model's dtype; 0 where a row has fewer than K terms.
        segments: each row's token range ``(start, end)`` in the packed input of a prefill, or ``None``
            when every row has exactly one token (decode: token ``i`` is row ``i``).
        uniform_slot: if every row uses exactly one and the same slot with weight 1, that slot
            (lets layers use one dense matmul instead of gathers); else ``None``.
    """

    rows: tuple[tuple[tuple[int, float], ...], ...]
    idx: torch.Tensor
    weights: torch.Tensor
    segments: tuple[tuple[int, int], ...] | None = None
    uniform_slot: int | None = None
    _bags: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, compare=False, repr=False)

    @cached_property
    def unit_weights(self) -> bool:
        """Every row has exactly one term, of weight 1 (plain adapters, no blend, no base-model row): the weight
        multiply can be skipped."""
        # a base-model row (no term) has weight 0 on its padding term: it must be multiplied too
        return all(len(r) == 1 and r[0][1] == 1.0 for r in self.rows)

    def bags(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [rows * K * width], offsets [rows * K])`` for the ``A`` side's ``embedding_bag``.

        Bag ``(b, k)`` holds rows ``idx[b, k] * width + j``, ``j < width``, of a ``[slots * width, n]``
        table: with ``width = d_in`` the rows of ``A^T`` of the term's slot. Cached, so the layers of a
        step share them (no index arithmetic per layer).
        """
        hit = self._bags.get(("A", width))
        if hit is None:
            ar = torch.arange(width, device=self.idx.device)
            flat = (self.idx.reshape(-1, 1) * width + ar).reshape(-1)
            hit = self._bags[("A", width)] = (flat, torch.arange(0, flat.numel(), width, device=self.idx.device))
        return hit

    def group_bags(self, rank: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices [rows * count * K * rank], offsets [rows * count])`` for the ``B`` side's ``embedding_bag``.

        The table is a part group's ``B`` slots viewed ``[slots * count * rank, n]`` (slot, part, rank
        row). Bag ``(b, p)`` holds rows ``(idx[b, k] * count + p) * rank + j`` for every term ``k`` and
        ``j < rank``: row ``b``'s terms for part ``p``, so one call gives ``[rows * count, n]``, which is
        ``[rows, count * n]``: the group's output columns in order. Cached like :meth:`bags`.
        """
        hit = self._bags.get(("B", rank, count))
        if hit is None:
            dev = self.idx.device
            rows, k = self.idx.shape
            p = torch.arange(count, device=dev).view(1, count, 1, 1)
            j = torch.arange(rank, device=dev).view(1, 1, 1, rank)
            flat = ((self.idx.view(rows, 1, k, 1) * count + p) * rank + j).reshape(-1)
            hit = self._bags[("B", rank, count)] = (flat, torch.arange(0, flat.numel(), k * rank, device=dev))
        return hit

    @cached_property
    def segment_bounds(self) -> torch.Tensor:
        """``[rows, 2]`` int64 ``(start, end)`` of each row's tokens (:attr:`segments`), or an empty tensor in decode
        (token ``i`` is row ``i``): the C++ LoRA kernel's argument (:func:`app.engine.lora_kernels.cpu_rows`)."""
        if self.segments is None:
            return torch.empty(0, dtype=torch.long)
        return torch.tensor(self.segments, dtype=torch.long).reshape(-1, 2)

    @cached_property
    def slot_groups(self) -> list[tuple[int, slice | torch.Tensor, Any]]:
        """Prefill: each slot with the packed tokens that use it, and their weights (computed once per batch).

        Returns:
            ``(slot, tokens, weight)`` per slot used with a non-zero weight: ``tokens`` a ``slice`` when
            the tokens using the slot are one run at one weight (one row, or adjacent rows of the same
            weight: a group's requests on one stance or blend; then ``weight`` is that float), else an
            int64 index tensor ``[T]`` of the tokens of every row using it, with ``weight`` ``[T, 1]``
            (each token's row's).
        """
        assert self.segments is not None
        uses: dict[int, list[tuple[int, int, float]]] = {}
        for (a, b), pairs in zip(self.segments, self.rows):
            for slot, weight in pairs:
                if weight != 0.0 and b > a:
                    runs = uses.setdefault(slot, [])
                    if runs and runs[-1][1] == a and runs[-1][2] == weight:
                        runs[-1] = (runs[-1][0], b, weight)  # adjacent and the same weight: one slice
                    else:
                        runs.append((a, b, weight))
        groups: list[tuple[int, slice | torch.Tensor, Any]] = []
        dev, dtype = self.idx.device, self.weights.dtype
        for slot, runs in uses.items():
            if len(runs) == 1:
                a, b, w = runs[0]
                groups.append((slot, slice(a, b), w))
                continue
            tokens = torch.cat([torch.arange(a, b, device=dev) for a, b, _ in runs])
            weight = torch.cat([torch.full((b - a, 1), w, dtype=dtype, device=dev) for a, b, w in runs])
            groups.append((slot, tokens, weight))
        return groups

    @classmethod
    def from_rows(
        cls,
        rows: list[list[tuple[int, float]]],
        *,
        device: torch.device,
        dtype: torch.dtype,
        segments: list[tuple[int, int]] | None = None,
    ) -> LoRABatch | None:
        """Build the routing of a batch from each row's (slot, weight) pairs.

        Args:
            rows: one list per batch row; ``[]`` means the base model for that row.
            segments: token ranges of the rows in a packed prefill (``None``: one token per row).

        Returns:
            ``None`` if no row uses an adapter (the layers then skip LoRA entirely).
        """
        k = max((len(r) for r in rows), default=0)
        if k == 0:
            return None
        idx = [[0] * k for _ in rows]
        w = [[0.0] * k for _ in rows]
        for i, pairs in enumerate(rows):
            for j, (slot, weight) in enumerate(pairs):
                idx[i][j] = slot
                w[i][j] = weight
        uniform = None
        if k == 1 and all(len(r) == 1 and r[0][1] == 1.0 for r in rows) and len({r[0][0] for r in rows}) == 1:
            uniform = rows[0][0][0]
        return cls(
            tuple(tuple((int(s), float(x)) for s, x in r) for r in rows),
            torch.tensor(idx, dtype=torch.long, device=device),
            torch.tensor(w, dtype=dtype, device=device),
            None if segments is None else tuple(segments),
            uniform,
        )
