"""What one forward pass computes: :class:`Plan` (packed tokens, where their KV goes, which logits come back) and
:class:`DecodeGroup` (decode rows whose attention runs as one call).

A plan is built from each sequence's block table, new token ids and cached length (:meth:`Plan.build`); it
holds the tensors every attention path reads: decode block tables padded to one width, the rows split into groups
of similar lengths, or the prefill kernel's per-row arguments. Not here: running it
(:class:`~app.engine.forward.ForwardPass`), choosing its tokens (:mod:`app.engine.batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.engine.kv_cache import BLOCK_SIZE, NULL_BLOCK, blocks_for


@dataclass
class DecodeGroup:
    """Decode rows whose attention runs as one batched call over their blocks.

    Attributes:
        rows: ``[g]`` int64, the rows' indices in the plan (``None``: every row, in order).
        tables: ``[g, blocks]`` int64, each row's block table up to the group's longest row, padded with the null
            block; attention reads ``L = blocks * block_size`` positions of each row.
        positions: ``[g]`` int64, each row's position (its last visible key).
        block_size: positions per block.
    """

    rows: torch.Tensor | None
    tables: torch.Tensor
    positions: torch.Tensor
    block_size: int
    _mask: torch.Tensor | None = None
    _bias: torch.Tensor | None = None
    _index: torch.Tensor | None = None

    def mask(self) -> tuple[torch.Tensor, int]:
        """``([g, 1, 1, L] bool, L)``: key ``j`` of row ``b`` is visible iff ``j <= position_b``."""
        if self._mask is None:
            length = int(self.tables.shape[1]) * self.block_size
            ar = torch.arange(length, device=self.positions.device)
            self._mask = (ar[None, :] <= self.positions[:, None])[:, None, None, :]
        return self._mask, int(self._mask.shape[-1])

    def bias(self) -> torch.Tensor:
        """:meth:`mask` as an additive fp32 score bias ``[g, 1, 1, L]``: 0 where visible, ``-inf`` elsewhere (the
        matmul decode attention keeps its scores in fp32 in every dtype)."""
        if self._bias is None:
            mask, _ = self.mask()
            self._bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
        return self._bias

    def gather_index(self, kv_heads: int, num_blocks: int) -> torch.Tensor:
        """``[g * kv_heads * blocks]`` int64: for row ``r``, KV head ``h`` and table entry ``i``, the block
        ``h * num_blocks + tables[r, i]`` of a cache layer viewed as ``[kv_heads * num_blocks, block_size,
        head_dim]``, in ``(r, h, i)`` order, so the gathered blocks view as ``[g, kv_heads, L, head_dim]``."""
        if self._index is None:
            heads = torch.arange(kv_heads, device=self.tables.device) * num_blocks
            self._index = (self.tables[:, None, :] + heads[None, :, None]).reshape(-1)
        return self._index


@dataclass
class Plan:
    """What one forward pass computes: its packed tokens, where their KV goes and which logits come back.

    Attributes:
        ids, positions: ``[N]`` int64 token ids and positions of the packed tokens.
        kv_index: ``[N]`` int64, where each token's key and value go: ``block * block_size + offset`` in the
            :class:`~app.engine.kv_cache.PagedKVCache` (KV has blocks; only adapters have slots).
        rows: per sequence, ``(block table, first token index in the pack, tokens, cached length before them)``.
        decode: every sequence has one token (then token ``i`` is sequence ``i``).
        logit_index: ``[M]`` int64, the packed tokens whose logits are returned.
        tables: decode only: ``[rows, blocks]`` int64, each row's block table up to the longest row's length,
            padded with the null block; attention reads ``blocks * block_size`` positions of every row, a mask
            hiding each row's positions past its own (a fixed width gives a step static shapes:
            :mod:`app.engine.graphs`).
        row_tables: prefill only: per sequence, ``[blocks]`` int64, the blocks holding its first
            ``cached + tokens`` positions.
        block_size: positions per block.
        groups: decode only: the rows split by length (:meth:`decode_groups`), or ``None``: one group.
    """

    ids: torch.Tensor
    positions: torch.Tensor
    kv_index: torch.Tensor
    rows: list[tuple[list[int], int, int, int]]
    decode: bool
    logit_index: torch.Tensor
    tables: torch.Tensor | None = None
    row_tables: list[torch.Tensor] | None = None
    all_logits: bool = False
    block_size: int = BLOCK_SIZE
    groups: list[DecodeGroup] | None = None
    _prefill_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(
        cls, rows: list[tuple[list[int], list[int], int]], device: torch.device, *, all_logits: bool = False,
        block_size: int = BLOCK_SIZE,
    ) -> Plan:
        """A plan from ``(block table, new token ids, cached length)`` per sequence.

        A sequence's new tokens take positions ``cached .. cached + len(ids) - 1``; its table must hold a block
        for each of them. Logits come back for each sequence's last token (``[sequences, vocab]``), or with
        ``all_logits`` for every token (``[N, vocab]``, for tests and scoring).

        Raises:
            ValueError: a table is too short for its sequence's positions.
        """
        ids: list[int] = []
        pos: list[int] = []
        kv_index: list[int] = []
        spans = []
        last = []
        for table, toks, cached in rows:
            end = cached + len(toks)
            if blocks_for(end, block_size) > len(table):
                raise ValueError(f"a block table of {len(table)} blocks cannot hold {end} positions")
            spans.append((table, len(ids), len(toks), cached))
            ids.extend(toks)
            pos.extend(range(cached, end))
            kv_index.extend(table[p // block_size] * block_size + p % block_size for p in range(cached, end))
            last.append(len(ids) - 1)
        decode = all(n == 1 for _, _, n, _ in spans)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        index = t(list(range(len(ids)))) if all_logits else t(last)
        tables = row_tables = groups = None
        if decode:
            widths = [blocks_for(c + 1, block_size) for *_, c in spans]
            width = max(widths)

            def padded(rows: list[int], w: int) -> torch.Tensor:
                return padded_tables([spans[i][0] for i in rows], w, device)

            tables = padded(list(range(len(spans))), width)
            # rows of very different lengths attend in groups of similar widths (powers of two of blocks), so short
            # rows do not gather the longest row's length; only when that halves the positions read
            by_width: dict[int, list[int]] = {}
            for i, w in enumerate(widths):
                by_width.setdefault(1 << (w - 1).bit_length(), []).append(i)
            split = sum(len(r) * max(widths[i] for i in r) for r in by_width.values())
            if len(by_width) > 1 and 2 * split <= len(spans) * width:
                groups = [
                    DecodeGroup(t(r), padded(r, max(widths[i] for i in r)), t([spans[i][3] for i in r]), block_size)
                    for _, r in sorted(by_width.items())
                ]
        else:
            row_tables = [t(list(tb[: blocks_for(c + n, block_size)])) for tb, _, n, c in spans]
        return cls(t(ids), t(pos), t(kv_index), spans, decode, index, tables, row_tables, all_logits, block_size, groups)

    def prefill_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill only: ``(tables [R, W], starts [R], counts [R], cached [R])`` int64, the rows' block tables (padded
        with the null block to the longest), first token indices in the pack, new tokens and cached lengths, as the
        CPU prefill kernel takes them (``prefill_attention``, :mod:`app.engine.cpu_kernels`); built once per plan."""
        assert self.row_tables is not None, "not a prefill plan"
        if self._prefill_args is None:
            width = max(int(t.shape[0]) for t in self.row_tables)
            tables = padded_tables([tb[: blocks_for(c + n, self.block_size)] for tb, _, n, c in self.rows], width,
                                   self.ids.device)
            meta = torch.tensor([[a, n, c] for _, a, n, c in self.rows], dtype=torch.long, device=self.ids.device)
            self._prefill_args = (tables, meta[:, 0].contiguous(), meta[:, 1].contiguous(), meta[:, 2].contiguous())
        return self._prefill_args

    @property
    def segments(self) -> list[tuple[int, int]]:
        """Each sequence's token range ``(start, end)`` in the pack."""
        return [(a, a + n) for _, a, n, _ in self.rows]

    def decode_groups(self, split: bool = True) -> list[DecodeGroup]:
        """The decode rows' attention groups: :attr:`groups`, or one group of every row over :attr:`tables`.

        ``split=False``: that one group whatever :attr:`groups` holds, for attention that reads each row's own
        positions only (the CPU kernel), where splitting rows by length saves nothing.
        """
        assert self.tables is not None, "not a decode plan"
        if not split:
            return [DecodeGroup(None, self.tables, self.positions, self.block_size)]
        if self.groups is None:
            self.groups = [DecodeGroup(None, self.tables, self.positions, self.block_size)]
        return self.groups


def padded_tables(tables: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    """``[len(tables), width]`` int64: each block table cut or padded with the null block to ``width`` entries."""
    return torch.tensor([list(tb[:width]) + [NULL_BLOCK] * (width - min(len(tb), width)) for tb in tables],
                        dtype=torch.long, device=device)
