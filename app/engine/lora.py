"""Batched multi-LoRA linear layers: every row of a batch with its own adapter or blend.

:class:`MultiLoRA` wraps the targeted ``nn.Linear`` modules of a base model in
:class:`MultiLoRALinear`. Each wrapped layer owns preallocated *slot* tensors

* ``At``: ``[S, d_in, R]`` (slot ``s`` holds ``lora_A`` of one adapter, transposed, zero-padded to rank ``R``)
* ``Bt``: ``[S, R, d_out]`` (``lora_B`` transposed, already multiplied by the adapter's scaling)

and, for a batch whose row ``b`` carries ``K`` (slot, weight) pairs, computes

    y[b] = W x[b] + sum_k  w[b, k] * scaling_{s} * B_{s} A_{s} x[b],   s = idx[b, k]

for all rows at once: gathered matmuls in prefill, ``embedding_bag`` gather-reductions in
decode (the BGMV pattern of Punica, Chen et al. 2023, arXiv:2310.18547, and S-LoRA,
arXiv:2311.03285), never a Python loop over adapters. A plain adapter is one pair with weight 1; a blend
is several pairs, computed live (no merged weights). Rows without an adapter
carry weight 0. The formula is the one of issue #2; LoRA itself is Hu et al.
2021 (arXiv:2106.09685).

What this module does not do: decide which adapter sits in which slot (that is
:mod:`app.engine.slots`), or validate adapters (:mod:`app.registry.validation`).
Only the engine thread may call it: it mutates the model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from app.registry.adapter import AdapterWeights, LoRAModuleWeights

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRABatch:
    """Per-row adapter routing for one forward pass.

    Attributes:
        idx: slot indices, ``[rows, K]`` int64, on the model's device.
        weights: blend weights, ``[rows, K]`` in the model's dtype; 0 where a row has fewer than K terms.
        uniform_slot: if every row uses exactly one and the same slot with weight 1, that slot
            (lets layers use one dense matmul instead of gathers); else ``None``.
    """

    idx: torch.Tensor
    weights: torch.Tensor
    uniform_slot: int | None = None
    _cache: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def flat_idx(self) -> torch.Tensor:
        """``idx`` flattened to ``[rows * K]`` (what ``index_select`` takes)."""
        return self.idx.reshape(-1)

    def row_scales(self, rank: int) -> torch.Tensor:
        """``weights`` repeated per rank column: ``[rows, K * rank]`` (cached per rank)."""
        key = ("scale", rank)
        s = self._cache.get(key)
        if s is None:
            s = self._cache[key] = self.weights.repeat_interleave(rank, dim=1)
        return s

    def bag_index(self, width: int) -> torch.Tensor:
        """Row indices into a ``[slots * width, n]`` table for each (row, term): ``[rows * K, width]``.

        Entry ``[(b, k), j]`` is ``idx[b, k] * width + j``: with ``width = d_in`` it selects the rows of
        ``A^T`` of the term's slot, with ``width = rank`` the rows of ``B^T`` (cached per width).
        """
        key = ("bag", width)
        s = self._cache.get(key)
        if s is None:
            ar = torch.arange(width, device=self.idx.device)
            s = self._cache[key] = self.flat_idx.unsqueeze(1) * width + ar
        return s

    @classmethod
    def from_rows(
        cls, rows: list[list[tuple[int, float]]], *, device: torch.device, dtype: torch.dtype
    ) -> LoRABatch | None:
        """Build the routing of a batch from each row's (slot, weight) pairs.

        Args:
            rows: one list per batch row; ``[]`` means the base model for that row.

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
            torch.tensor(idx, dtype=torch.long, device=device),
            torch.tensor(w, dtype=dtype, device=device),
            uniform,
        )


class MultiLoRALinear(nn.Module):
    """An ``nn.Linear`` plus per-row LoRA terms read from slot tensors.

    Slot tensors: ``At`` ``[S, d_in, R]`` (``lora_A`` transposed) and ``Bt`` ``[S, R, d_out]``
    (``lora_B`` transposed, times the adapter's scaling).

    Input ``x``: ``[rows, T, d_in]`` (or ``[T, d_in]`` for a single row); output ``[rows, T, d_out]``.
    Three paths, same result:

    * every row on one adapter with weight 1: two dense matmuls with that slot;
    * decode (``T == 1``): ``embedding_bag`` with per-sample weights gathers and reduces the
      slot rows each (row, term) needs in one pass, reading every needed weight once and
      writing no gathered copy (measured on CPU: 4.5x faster than gather + bmm for 3-term blends);
    * prefill (``T > 1``): gather the rows' slots once (``index_select``), then ``bmm`` over all
      ``T`` tokens, where the gathered weights are reused.
    """

    def __init__(self, base: nn.Linear, owner: MultiLoRA, slots: int, rank: int) -> None:
        super().__init__()
        self.base_layer = base
        self._owner = [owner]  # a list so nn.Module does not register the owner as a child
        self.in_features = base.in_features
        self.out_features = base.out_features
        w = base.weight
        self.register_buffer("At", torch.zeros(slots, self.in_features, rank, dtype=w.dtype, device=w.device))
        self.register_buffer("Bt", torch.zeros(slots, rank, self.out_features, dtype=w.dtype, device=w.device))

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of projections
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def resize(self, slots: int, rank: int) -> None:
        """Grow the slot tensors to ``slots`` slots of rank ``rank``, keeping existing contents."""
        s0, _, r0 = self.At.shape
        if slots == s0 and rank == r0:
            return
        at = torch.zeros(slots, self.in_features, rank, dtype=self.At.dtype, device=self.At.device)
        bt = torch.zeros(slots, rank, self.out_features, dtype=self.Bt.dtype, device=self.Bt.device)
        at[:s0, :, :r0] = self.At
        bt[:s0, :r0] = self.Bt
        self.At, self.Bt = at, bt

    def write(self, slot: int, m: LoRAModuleWeights | None) -> None:
        """Put one module's factors in ``slot`` (zeros when ``m`` is ``None``)."""
        self.At[slot].zero_()
        self.Bt[slot].zero_()
        if m is not None:
            r = m.rank
            self.At[slot, :, :r].copy_(m.A.t().to(self.At.dtype))
            self.Bt[slot, :r].copy_((m.B.float() * m.scaling).t().to(self.Bt.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        batch = self._owner[0].batch
        if batch is None:
            return y
        if batch.uniform_slot is not None:
            s = batch.uniform_slot
            x2 = x.reshape(-1, self.in_features)
            # y is a fresh output of the base layer, so it is updated in place
            y.view(-1, self.out_features).addmm_(x2 @ self.At[s], self.Bt[s])
            return y
        squeeze = x.dim() == 2
        if squeeze:
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        rows, k = batch.idx.shape
        r = self.At.shape[2]
        if x.shape[1] == 1:
            self._decode(x, y, batch, rows, k, r)
        else:
            self._prefill(x, y, batch, rows, k, r)
        return y.squeeze(0) if squeeze else y

    def _decode(self, x: torch.Tensor, y: torch.Tensor, batch: LoRABatch, rows: int, k: int, r: int) -> None:
        x2 = x.reshape(rows, self.in_features)
        if k > 1:
            x2 = x2.repeat_interleave(k, dim=0)
        # xa[(b, k)] = sum_i x[b, i] * At[s_bk, i, :]  -> [rows * K, R]
        xa = F.embedding_bag(
            batch.bag_index(self.in_features), self.At.view(-1, r), mode="sum", per_sample_weights=x2
        )
        xa = xa.view(rows, k * r) * batch.row_scales(r)
        # y[b] += sum_{k, j} xa[b, k, j] * Bt[s_bk, j, :]
        lora = F.embedding_bag(
            batch.bag_index(r).view(rows, k * r), self.Bt.view(-1, self.out_features), mode="sum",
            per_sample_weights=xa,
        )
        y.view(rows, self.out_features).add_(lora)

    def _prefill(self, x: torch.Tensor, y: torch.Tensor, batch: LoRABatch, rows: int, k: int, r: int) -> None:
        # index_select on the flat index is ~5x faster on CPU than advanced indexing
        at = torch.index_select(self.At, 0, batch.flat_idx)  # [rows*K, d_in, R]
        if k > 1:
            at = at.view(rows, k, self.in_features, r).permute(0, 2, 1, 3)
        at = at.reshape(rows, self.in_features, k * r)
        bt = torch.index_select(self.Bt, 0, batch.flat_idx).view(rows, k * r, self.out_features)
        xa = torch.bmm(x, at) * batch.row_scales(r).unsqueeze(1)  # [rows, T, K*R]
        y.baddbmm_(xa, bt)


class MultiLoRA:
    """Owns the :class:`MultiLoRALinear` layers of one base model and their slot capacity.

    Layers are wrapped lazily, the first time an adapter targets them, so modules no
    adapter uses cost nothing. Slots are preallocated (``initial_slots``, default all
    ``max_slots``, as vLLM does with ``max_loras``) so loading an adapter into a free slot is a
    plain copy; with fewer initial slots capacity grows by doubling. The rank grows to the largest
    rank written (mixed ranks are zero-padded to it): a larger-rank adapter triggers one resize.
    Memory: ``slots * rank * sum(d_in + d_out)`` elements over the wrapped layers
    (SmolLM2-135M, 32 slots, rank 16, 7 targets: 625 MB in fp32).

    Args:
        model: the base model (mutated in place: targeted linears are replaced).
        max_slots: most adapter slots on the device (``--max-loras``).
        initial_slots: slots allocated at first (default ``max_slots``).
    """

    def __init__(self, model: nn.Module, max_slots: int, initial_slots: int | None = None) -> None:
        self.model = model
        self.max_slots = max_slots
        self.slots = min(initial_slots or max_slots, max_slots)
        self.rank = 0
        self.layers: dict[str, MultiLoRALinear] = {}
        self.batch: LoRABatch | None = None

    # ------------------------------------------------------------------ capacity
    def ensure_capacity(self, slots: int, rank: int) -> None:
        """Grow every wrapped layer to at least ``slots`` slots and rank ``rank``.

        Raises:
            ValueError: ``slots`` exceeds ``max_slots``.
        """
        if slots > self.max_slots:
            raise ValueError(f"{slots} slots requested, max_slots is {self.max_slots}")
        new_slots = self.slots
        while new_slots < slots:
            new_slots = min(new_slots * 2, self.max_slots)
        new_rank = max(self.rank, rank)
        if (new_slots, new_rank) != (self.slots, self.rank):
            for layer in self.layers.values():
                layer.resize(new_slots, new_rank)
            self.slots, self.rank = new_slots, new_rank

    def _wrap(self, path: str) -> MultiLoRALinear:
        layer = self.layers.get(path)
        if layer is not None:
            return layer
        try:
            base = self.model.get_submodule(path)
        except AttributeError:
            base = None
        if isinstance(base, MultiLoRALinear):  # wrapped by an earlier engine on the same model
            base = base.base_layer
        if not isinstance(base, nn.Linear):
            raise KeyError(f"{path} is not an nn.Linear of the base model")
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        layer = MultiLoRALinear(base, self, max(self.slots, 1), max(self.rank, 1))
        setattr(parent, child, layer)
        self.layers[path] = layer
        return layer

    # ------------------------------------------------------------------ slots
    def write_slot(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy ``adapter``'s factors into ``slot`` of every layer (zeros where it has none).

        ``lora_B`` is stored transposed and pre-multiplied by the module's scaling.

        Raises:
            KeyError: the adapter names a module that is not a linear of the base model.
        """
        self.ensure_capacity(slot + 1, adapter.max_rank)
        for path in adapter.modules:
            self._wrap(path)
        with torch.no_grad():
            for path, layer in self.layers.items():
                layer.write(slot, adapter.modules.get(path))

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot`` in every layer."""
        with torch.no_grad():
            for layer in self.layers.values():
                if slot < layer.At.shape[0]:
                    layer.write(slot, None)

    @contextlib.contextmanager
    def routing(self, batch: LoRABatch | None) -> Iterator[None]:
        """Apply ``batch``'s per-row routing to every forward inside the ``with`` block."""
        previous, self.batch = self.batch, batch
        try:
            yield
        finally:
            self.batch = previous

    def slot_bytes(self) -> int:
        """Device memory held by the slot tensors, in bytes."""
        return sum(m.At.numel() * m.At.element_size() + m.Bt.numel() * m.Bt.element_size() for m in self.layers.values())


def unwrap(model: nn.Module) -> nn.Module:
    """Put every :class:`MultiLoRALinear` of ``model`` back to its base ``nn.Linear`` (in place); returns ``model``.

    For handing a model the engine wrapped to other code (peft baselines, training).
    """
    for path, module in list(model.named_modules()):
        if isinstance(module, MultiLoRALinear):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, module.base_layer)
    return model
