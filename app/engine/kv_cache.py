"""The engine-owned KV cache: preallocated per-row slots, sized from a memory budget.

One tensor pair per layer, allocated once at start-up:

    k[layer], v[layer]: [rows, kv_heads, max_len, head_dim]

Each running sequence owns one *row* (a slot of ``max_len`` positions) for its whole life; token
``t`` of the sequence (prompt and output alike) lives at position ``t``. Nothing is ever
concatenated, padded or copied per step: a step writes each new token's key and value at its
position (:meth:`KVCache.write`) and attention reads each row up to its own length. Rows are
handed out from a free list; the engine keeps its decoding rows in the lowest row indices
(:meth:`KVCache.move` compacts them), so decode attention reads ``k[:rows, :, :L]`` as a view.
A freed row is zeroed up to where it was written, so a row never hands a later sequence
non-finite values from a failed one (a masked key still multiplies its value by 0, and
``0 * nan`` is ``nan``).

This is a per-row-slot layout rather than paged blocks: no block
tables, at the price of reserving ``max_len`` positions per row. Prefix reuse copies cached
blocks into a row (:mod:`app.engine.prefix_cache`). Not here: attention itself
(:mod:`app.engine.forward`), which sequence owns which row (:mod:`app.engine.batch`).
"""

from __future__ import annotations

import torch


def row_bytes(num_layers: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of one row (keys and values of ``max_len`` positions in every layer)."""
    return 2 * num_layers * kv_heads * max_len * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    """Per-row key/value storage of every layer, allocated up front.

    Args:
        num_layers, kv_heads, head_dim: the model's attention shape.
        rows: sequences that can hold a row at once (the most that can run concurrently).
        max_len: positions per row, in tokens (the engine's ``max_model_len``).
        dtype, device: of the tensors (the model's).

    Attributes:
        k, v: per layer, ``[rows, kv_heads, max_len, head_dim]``.
        nbytes: memory held, in bytes.
    """

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, rows: int, max_len: int,
        dtype: torch.dtype, device: torch.device | str,
    ) -> None:
        if rows < 1:
            raise ValueError("the KV cache needs at least one row")
        shape = (rows, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.rows = rows
        self.max_len = max_len
        self.nbytes = rows * row_bytes(num_layers, kv_heads, head_dim, max_len, dtype)
        self._free = set(range(rows))

    @classmethod
    def budgeted(
        cls, num_layers: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype,
        device: torch.device | str, *, max_rows: int, budget_bytes: int | None,
    ) -> KVCache:
        """A cache of ``min(max_rows, budget_bytes // row_bytes)`` rows (``max_rows`` when no budget).

        Raises:
            ValueError: the budget holds less than one row of ``max_len`` positions (the message gives the
                bytes one row needs).
        """
        per_row = row_bytes(num_layers, kv_heads, head_dim, max_len, dtype)
        rows = max_rows if budget_bytes is None else min(max_rows, budget_bytes // per_row)
        if rows < 1:
            raise ValueError(
                f"a KV cache budget of {budget_bytes} bytes holds no row: one row of {max_len} tokens needs "
                f"{per_row} bytes; raise the budget or lower max_model_len"
            )
        return cls(num_layers, kv_heads, head_dim, rows, max_len, dtype, device)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """Take the lowest free row, or ``None`` when every row is in use."""
        row = self.lowest_free()
        if row is not None:
            self._free.remove(row)
        return row

    def release(self, row: int, written: int) -> None:
        """Give ``row`` back, zeroing its first ``written`` positions (those a step may have written)."""
        if row in self._free:
            raise RuntimeError(f"KV row {row} released twice")
        n = min(max(written, 0), self.max_len)
        if n:
            for t in (*self.k, *self.v):
                t[row, :, :n].zero_()
        self._free.add(row)

    def move(self, src: int, dst: int, length: int) -> None:
        """Move a sequence's first ``length`` positions from row ``src`` to the free row ``dst``; frees ``src``."""
        if dst not in self._free or src in self._free:
            raise RuntimeError(f"cannot move KV row {src} to {dst}")
        n = min(length, self.max_len)
        for t in (*self.k, *self.v):
            t[dst, :, :n].copy_(t[src, :, :n])
        self._free.remove(dst)
        self.release(src, n)

    def reset(self) -> None:
        """Zero every row and free them all (after the engine lost track of its rows)."""
        for t in (*self.k, *self.v):
            t.zero_()
        self._free = set(range(self.rows))

    def lowest_free(self) -> int | None:
        """The lowest free row index, or ``None``."""
        return min(self._free) if self._free else None

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys and values of ``N`` tokens of layer ``layer``.

        Args:
            rows, positions: ``[N]`` int64: each token's row and position.
            k, v: ``[N, kv_heads, head_dim]``.
        """
        self.k[layer][rows, :, positions] = k
        self.v[layer][rows, :, positions] = v
