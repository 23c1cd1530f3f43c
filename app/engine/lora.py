"""Fused linear layers with batched multi-LoRA terms: every row of a batch with its own adapter or blend.

:class:`FusedLinear` holds one matmul's weight for one or more *parts* of a Hugging Face model that
read the same input: ``q_proj``/``k_proj``/``v_proj`` become one ``[dq + dk + dv, d_in]`` weight, and
``gate_proj``/``up_proj`` one ``[2 * d_ff, d_in]`` (as vLLM's ``QKVParallelLinear`` and
``MergedColumnParallelLinear`` do). The parts' own ``weight`` parameters become views of the fused
tensor, so the model is not stored twice and the Hugging Face modules still compute the same thing.

LoRA terms are fused the same way. Each layer owns preallocated *slot* tensors, allocated the first
time an adapter targets one of its parts:

* ``At``: ``[S, d_in, P * R]``: part ``p``'s ``lora_A`` (transposed, zero-padded to rank ``R``) in
  columns ``p * R .. (p + 1) * R``;
* ``Bt[p]``: ``[S, R, d_out_p]``: part ``p``'s ``lora_B`` (transposed, times the adapter's scaling),

The names against LoRA's (``y = W x + scaling * B A x``, ``A``: ``[r, d_in]``, ``B``: ``[d_out, r]``):

==========  ==========================  ============================================================
name        shape                       holds
==========  ==========================  ============================================================
``At``      ``[S, d_in, P * R]``        ``A`` transposed (``t``), every part side by side, per slot
``Bt[p]``   ``[S, R, d_out_p]``         ``B`` of part ``p`` transposed, times ``scaling``, per slot
``Bg[g]``   ``[S, count, R, d_out]``    the ``Bt`` of a group of parts of one ``d_out``, stacked
                                        (``g``: group); ``Bt[p]`` is a view of one of its ``[:, j]``
==========  ==========================  ============================================================

``S``: adapter slots, ``R``: the largest rank in the slots, ``P``: parts. So one ``x @ At`` gives every part's ``A x`` and each part's ``B`` adds into its own output columns
(exact; a block-diagonal fused ``B`` would be slower in decode, reading its zeros).
Consecutive parts of the same ``d_out`` (``k``/``v``, ``gate``/``up``) share one *group* tensor
``Bg[g]``: ``[S, count, R, d_out]``, whose ``[:, p]`` views are their ``Bt``, so decode gathers a
group's ``B`` terms in one ``embedding_bag`` (q, kv, o, gate/up, down: 5 calls per Llama layer
instead of 7, and fewer calls cost less than one per part). For a batch whose row ``b``
carries ``K`` (slot, weight) pairs the layer computes

    y[b] = W x[b] + sum_k  w[b, k] * scaling_{s} * B_{s} A_{s} x[b],   s = idx[b, k]

for all rows at once: in decode, gathers of each row's slots (the BGMV pattern of Punica,
Chen et al. 2023, arXiv:2310.18547, and S-LoRA, arXiv:2311.03285) by one of two kernels chosen per
device and dtype, ``embedding_bag`` gather-reductions or ``index_select`` + ``bmm``
(:mod:`app.engine.lora_kernels`); in prefill one matmul pair per slot in use, over the tokens of
every row using it (the SGMV pattern); never a Python loop over adapters in decode. When every row
is one and the same slot at weight 1 (:attr:`LoRABatch.uniform_slot`: one stance for the whole
batch) there is nothing to gather: one dense ``x @ At[slot]`` and one ``addmm_`` into ``y`` of a
block-diagonal ``B`` of every part, built once for that slot (an ``addmm_`` per part past a few rows).
On CPU these small products run single-threaded (:class:`~app.engine.lora_kernels.serial_threads`).
A plain adapter is one pair with weight 1; a blend is several pairs, computed live (no merged
weights). LoRA itself is Hu et al. 2021 (arXiv:2106.09685).

On CPU the base weight can be *prepacked* (:meth:`FusedLinear.prepack`): reordered once into
oneDNN's blocked layout, as vLLM's CPU backend and inductor's weight freezing do, so no matmul
repacks it per call; ``stanceserve bench --scenarios step`` (bench/decode.py) times a decode step with and
without it.

A batch's routing is a :class:`~app.engine.lora_routing.LoRABatch` (also importable from here).

What this module does not do: run the model (:mod:`app.engine.forward`), decide which adapter
sits in which slot (:mod:`app.engine.slots`), or validate adapters (:mod:`app.registry.validation`).
Only the engine thread may write slots.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from app.engine.lora_kernels import KERNELS, ROW_INVARIANT, SMALL_ROWS, decode_kernel_for, serial_threads
from app.engine.lora_routing import LoRABatch  # the routing's home; importable from here as before
from app.registry.adapter import AdapterWeights, LoRAModuleWeights

logger = logging.getLogger(__name__)


class FusedLinear:
    """One matmul over the fused weights of ``parts`` (linears reading the same input), plus LoRA slots.

    Args:
        name: a label for logs (e.g. ``layers.3.qkv``).
        parts: ``(module path, nn.Linear)`` pairs in output order; they must share ``in_features``,
            dtype and device. With several parts their weights are copied into one tensor and each
            module's ``weight`` (and ``bias``) becomes a view of it.

    Attributes:
        weight: ``[D_out, d_in]``; bias: ``[D_out]`` or ``None``.
        paths: the parts' module paths; offsets: their first output column; sizes: their ``d_out``.
        At: LoRA ``A`` slots (``None`` until :meth:`enable`); Bt: one ``B`` slot view per part; Bg: the group
            tensors they view; groups: ``(first part, count, d_out)`` per group. See the module docstring.
        decode_kernel: how decode steps gather each row's slots: ``"embedding_bag"``, ``"bgmv"`` or ``"cpu"``
            (:mod:`app.engine.lora_kernels`; chosen per device and dtype, ``"cpu"`` set by the engine where the C++
            CPU kernels run; settable, for every layer by :meth:`~app.engine.forward.ForwardPass.set_lora_kernel`).

    Call: ``x`` ``[N, d_in]`` (packed tokens) and a :class:`LoRABatch` (or ``None``) -> ``[N, D_out]``.
    """

    def __init__(self, name: str, parts: list[tuple[str, nn.Linear]]) -> None:
        if not parts:
            raise ValueError("a fused linear needs at least one part")
        self.name = name
        self.paths = [p for p, _ in parts]
        linears = [m for _, m in parts]
        self.in_features = linears[0].in_features
        if any(m.in_features != self.in_features for m in linears):
            raise ValueError(f"{name}: fused parts must share in_features")
        self.sizes = [m.out_features for m in linears]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.groups: list[tuple[int, int, int]] = []  # runs of consecutive parts with equal d_out
        for i, n in enumerate(self.sizes):
            if self.groups and self.groups[-1][2] == n:
                first, count, _ = self.groups[-1]
                self.groups[-1] = (first, count + 1, n)
            else:
                self.groups.append((i, 1, n))
        #: per part: its group (an index into ``Bg``), its index in that group and its first output column, as the
        #: C++ LoRA kernel takes them (:func:`app.engine.lora_kernels.cpu_rows`)
        self.part_groups: tuple[list[int], list[int], list[int]] = (
            [g for g, (_, count, _) in enumerate(self.groups) for _ in range(count)],
            [j for _, count, _ in self.groups for j in range(count)],
            list(self.offsets),
        )
        self.out_features = sum(self.sizes)
        if len(linears) == 1:
            self.weight = linears[0].weight.data
            self.bias = None if linears[0].bias is None else linears[0].bias.data
        else:
            with torch.no_grad():
                self.weight = torch.cat([m.weight.data for m in linears], dim=0).contiguous()
                biases = [m.bias for m in linears]
                self.bias = None
                if any(b is not None for b in biases):
                    self.bias = torch.cat([
                        b.data if b is not None else self.weight.new_zeros(m.out_features)
                        for b, m in zip(biases, linears)
                    ])
            for m, off, n in zip(linears, self.offsets, self.sizes):  # the modules now view the fused copy
                m.weight.data = self.weight[off : off + n]
                if m.bias is not None and self.bias is not None:
                    m.bias.data = self.bias[off : off + n]
        self.dtype, self.device = self.weight.dtype, self.weight.device
        self._modules = linears
        #: oneDNN-packed weight (:meth:`prepack`), or ``None`` (then ``weight`` is used)
        self.packed: torch.Tensor | None = None
        self._batch_hint = 0
        self.At: torch.Tensor | None = None
        self.Bt: list[torch.Tensor] = []
        self.Bg: list[torch.Tensor] = []
        self.rank = 0
        #: ``(slot, At[slot], B)`` of the one-slot path's last slot (:meth:`_one_slot`), or ``None``
        self._block: tuple[int, torch.Tensor, torch.Tensor] | None = None
        #: the decode step's gather kernel, a key of :data:`app.engine.lora_kernels.KERNELS`
        self.decode_kernel = decode_kernel_for(self.device, self.dtype)

    def prepack(self, batch_hint: int, *, release: bool = True) -> bool:
        """Reorder the base weight into oneDNN's blocked layout for CPU matmuls (no repacking per call).

        ``batch_hint`` is the row count the layout is tuned for (the decode batch, in tokens); any
        row count works. With ``release`` the dense weight is freed (the parts' ``weight`` become empty
        tensors, so the Hugging Face modules can no longer be called), so the weights are not held twice.
        Pass ``release=False`` for a weight shared with another module (a tied ``lm_head``).

        Returns:
            whether the weight was packed: only on CPU, in float32 or bfloat16, when PyTorch has oneDNN.
        """
        if self.packed is not None:
            return True
        if not prepack_supported(self.device, self.dtype):
            return False
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_hint)
            self._batch_hint = batch_hint
            if release:
                empty = torch.empty(0, dtype=self.dtype, device=self.device)
                for m in self._modules:
                    m.weight.data = empty
                self.weight = empty
        return True

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b``: ``[N, d_in]`` -> ``[N, D_out]``, through the packed weight when there is one.

        oneDNN builds (and caches) one primitive per distinct row count, about 0.6 MB each on this
        project's CPU: prefill lengths alone grew a test process by 356 MB. So row counts are padded
        with zero rows to a bucket (:func:`packed_rows`), which bounds the shapes per weight to about
        ``4 + batch_hint / DECODE_ROW_STEP + max prefill chunk / PACKED_ROW_BUCKET``, and never runs one row
        alone (oneDNN's one-row kernel rounds long sums differently from its many-row one).
        """
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        n = x.shape[0]
        padded = packed_rows(n, self._batch_hint)
        if padded != n:
            x = F.pad(x, (0, 0, 0, padded - n))
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y if padded == n else y[:n]

    @property
    def enabled(self) -> bool:
        """Whether LoRA slots are allocated (some adapter targets one of the parts)."""
        return self.At is not None

    def enable(self, slots: int, rank: int) -> None:
        """Allocate (or grow, keeping contents) the slot tensors to ``slots`` slots of rank ``rank`` per part."""
        p = len(self.paths)
        if self.At is not None and self.At.shape[0] == slots and self.rank == rank:
            return
        at = torch.zeros(slots, self.in_features, p * rank, dtype=self.dtype, device=self.device)
        bg = [torch.zeros(slots, count, rank, n, dtype=self.dtype, device=self.device) for _, count, n in self.groups]
        if self.At is not None:
            s0, r0 = self.At.shape[0], self.rank
            for i in range(p):
                at[:s0, :, i * rank : i * rank + r0] = self.At[:, :, i * r0 : (i + 1) * r0]
            for new, old in zip(bg, self.Bg):
                new[:s0, :, :r0] = old
        self.At, self.Bg, self.rank = at, bg, rank
        self._block = None
        self.Bt = [g[:, j] for g, (_, count, _) in zip(bg, self.groups) for j in range(count)]

    def write(self, slot: int, modules: list[LoRAModuleWeights | None]) -> None:
        """Put each part's factors in ``slot`` (zeros for a part without a module). Needs :meth:`enable`."""
        assert self.At is not None
        self.clear(slot)  # also drops the slot's block-diagonal B
        r = self.rank
        for i, m in enumerate(modules):
            if m is None:
                continue
            self.At[slot, :, i * r : i * r + m.rank].copy_(m.A.t().to(self.At.dtype))
            self.Bt[i][slot, : m.rank].copy_((m.B.float() * m.scaling).t().to(self.Bt[i].dtype))

    def clear(self, slot: int) -> None:
        """Zero ``slot``."""
        if self._block is not None and self._block[0] == slot:
            self._block = None
        if self.At is not None and slot < self.At.shape[0]:
            self.At[slot].zero_()
            for b in self.Bg:
                b[slot].zero_()

    def slot_bytes(self) -> int:
        """Memory held by the slot tensors, in bytes."""
        if self.At is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.At, *self.Bg))

    def __call__(self, x: torch.Tensor, routing: LoRABatch | None) -> torch.Tensor:
        y = self.base(x)
        if routing is None or self.At is None:
            return y
        if self.decode_kernel in ROW_INVARIANT:
            KERNELS[self.decode_kernel](self, x, y, routing)  # every step, prefill too: a row's bits are its own
            return y
        with serial_threads(x):  # small products: one thread beats a fork/join (app.engine.lora_kernels)
            if routing.uniform_slot is not None:
                slot = routing.uniform_slot
                if x.shape[0] <= BLOCK_B_ROWS:
                    a, b = self._one_slot(slot)
                    y.addmm_(torch.mm(x, a), b)  # every part's B in one product (y is fresh: updated in place)
                else:
                    self._add_b(y, x @ self.At[slot], slot)
            elif routing.segments is None:
                KERNELS[self.decode_kernel](self, x, y, routing)
            else:
                self._prefill(x, y, routing)
        return y

    def _one_slot(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(At[slot] [d_in, P * R], B [P * R, D_out])`` for the one-slot path: ``y += (x @ At[slot]) @ B``.

        With several parts ``B`` is block-diagonal: ``slot``'s ``Bt[p]`` in rows ``p * R ..`` and part ``p``'s
        output columns, zeros elsewhere, so ``xa @ B`` is every part's ``B`` product at once: one ``addmm_``
        instead of one per part. It multiplies zeros (``P`` times the work), which at decode's few rows
        costs less than a call per part (bfloat16 CPU matmuls cost about the same per call whatever their
        size). Kept for the last slot used (one slot's worth of memory), dropped when that slot is written
        or cleared, or when the slots grow.
        """
        hit = self._block
        if hit is not None and hit[0] == slot:
            return hit[1], hit[2]
        assert self.At is not None
        if len(self.Bt) == 1:
            b = self.Bt[0][slot]
        else:
            r = self.rank
            b = torch.zeros(len(self.Bt) * r, self.out_features, dtype=self.dtype, device=self.device)
            for i, (off, n) in enumerate(zip(self.offsets, self.sizes)):
                b[i * r : (i + 1) * r, off : off + n] = self.Bt[i][slot]
        self._block = (slot, self.At[slot], b)
        return self._block[1], b

    def _add_b(self, y: torch.Tensor, xa: torch.Tensor, slot: int, alpha: float = 1.0) -> None:
        """``y[:, part p] += alpha * xa[:, part p's rank columns] @ Bt[p][slot]`` for every part."""
        r = self.rank
        if len(self.Bt) == 1:
            y.addmm_(xa, self.Bt[0][slot], alpha=alpha)
            return
        for i, (off, n) in enumerate(zip(self.offsets, self.sizes)):
            y[:, off : off + n].addmm_(xa[:, i * r : (i + 1) * r], self.Bt[i][slot], alpha=alpha)

    def _prefill(self, x: torch.Tensor, y: torch.Tensor, routing: LoRABatch) -> None:
        # one matmul pair per slot over all the tokens that use it (a blend's slots are shared by many rows)
        for slot, tokens, weight in routing.slot_groups:
            if isinstance(tokens, slice):
                self._add_b(y[tokens], x[tokens] @ self.At[slot], slot, weight)
                continue
            xa = (x.index_select(0, tokens) @ self.At[slot]) * weight  # weight: [T, 1], each token's row's
            r = self.rank
            for i, (off, n) in enumerate(zip(self.offsets, self.sizes)):  # each part's columns, added in place
                y[:, off : off + n].index_add_(0, tokens, xa[:, i * r : (i + 1) * r] @ self.Bt[i][slot])


#: the one-slot path adds every part's ``B`` product in one block-diagonal matmul up to this many rows (tokens),
#: past them one product per part (:meth:`FusedLinear._one_slot`)
BLOCK_B_ROWS = SMALL_ROWS

#: packed matmuls of more rows than the decode batch are padded to a multiple of this many rows (see FusedLinear.base)
PACKED_ROW_BUCKET = 32


#: row buckets of packed matmuls up to the decode batch: powers of two up to this, then multiples of it
DECODE_ROW_STEP = 16


def packed_rows(n: int, batch_hint: int) -> int:
    """The row bucket a packed matmul of ``n`` rows runs at.

    Up to ``batch_hint`` (the decode batch; never past it): the next power of two from 2 up to
    :data:`DECODE_ROW_STEP` rows, then the next multiple of it (48 rows run as 48, not 64: on CPU a decode step
    of that many rows is bound by the matmuls' arithmetic, so padded rows cost time). Past ``batch_hint``
    (prefill chunks): the next multiple of :data:`PACKED_ROW_BUCKET`.

    Never one row (unless ``batch_hint`` is 1): oneDNN computes a one-row product with another kernel than a
    product of several rows, whose sums round differently for long reductions (e.g. a 1536-wide down
    projection), so a request alone would get other tokens than the same request among others.
    """
    if n <= batch_hint:
        b = max(2, 1 << max(0, n - 1).bit_length()) if n <= DECODE_ROW_STEP else -(-n // DECODE_ROW_STEP) * DECODE_ROW_STEP
        return min(b, batch_hint)
    return -(-n // PACKED_ROW_BUCKET) * PACKED_ROW_BUCKET


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :meth:`FusedLinear.prepack` can pack weights of ``dtype`` on ``device`` (CPU with oneDNN)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if dtype == torch.bfloat16:  # oneDNN's bf16 matmuls need avx512bw/vl/dq or avx_ne_convert
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class MultiLoRA:
    """The adapter slots of a model's :class:`FusedLinear` layers: capacity, writes, memory.

    Layers get slot tensors lazily, the first time an adapter targets one of their parts, so
    modules no adapter uses cost nothing. Slots are preallocated (``initial_slots``, default all
    ``max_slots``, as vLLM does with ``max_loras``) so loading an adapter into a free slot is a
    plain copy; with fewer initial slots capacity grows by doubling. The rank grows to the largest
    rank written (mixed ranks are zero-padded to it): a larger-rank adapter triggers one resize.
    Memory per slot: ``sum over enabled layers of R * (P * d_in + D_out)`` elements (``At`` holds
    every part's ``A``, each part's ``Bt`` only its own output columns).

    Args:
        layers: the model's fused linears by name (:attr:`app.engine.forward.ForwardPass.linears`).
        max_slots: most adapter slots on the device (``--max-loras``).
        initial_slots: slots allocated at first (default ``max_slots``).
    """

    def __init__(self, layers: dict[str, FusedLinear], max_slots: int, initial_slots: int | None = None) -> None:
        self.max_slots = max_slots
        self.slots = min(initial_slots or max_slots, max_slots)
        self.rank = 0
        self.layers = layers
        #: bumped whenever a layer's slot tensors are (re)allocated, so captured steps that hold their addresses
        #: (:mod:`app.engine.graphs`) know to capture again; writing a slot keeps the tensors and the version
        self.version = 0
        #: module path -> its fused layer
        self.targets: dict[str, FusedLinear] = {p: layer for layer in layers.values() for p in layer.paths}

    def ensure_capacity(self, slots: int, rank: int) -> None:
        """Grow every enabled layer to at least ``slots`` slots and rank ``rank``.

        Raises:
            ValueError: ``slots`` exceeds ``max_slots``.
        """
        if slots > self.max_slots:
            raise ValueError(f"{slots} slots requested, max_slots is {self.max_slots}")
        new_slots = max(self.slots, 1)
        while new_slots < slots:
            new_slots = min(new_slots * 2, self.max_slots)
        new_rank = max(self.rank, rank, 1)
        if (new_slots, new_rank) != (self.slots, self.rank):
            for layer in self.layers.values():
                if layer.enabled:
                    layer.enable(new_slots, new_rank)
            self.slots, self.rank = new_slots, new_rank
            self.version += 1

    def write_slot(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy ``adapter``'s factors into ``slot`` of every enabled layer (zeros where it has none).

        Raises:
            KeyError: the adapter names a module that is not a linear layer of the base model's forward.
        """
        unknown = [p for p in adapter.modules if p not in self.targets]
        if unknown:
            raise KeyError(f"{unknown[0]} is not a linear layer of the base model")
        self.ensure_capacity(slot + 1, adapter.max_rank)
        for path in adapter.modules:
            layer = self.targets[path]
            if not layer.enabled:
                layer.enable(self.slots, self.rank)
                self.version += 1
        with torch.no_grad():
            for layer in self.layers.values():
                if layer.enabled:
                    layer.write(slot, [adapter.modules.get(p) for p in layer.paths])

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot`` in every layer."""
        with torch.no_grad():
            for layer in self.layers.values():
                layer.clear(slot)

    def slot_bytes(self) -> int:
        """Device memory held by the slot tensors, in bytes."""
        return sum(layer.slot_bytes() for layer in self.layers.values())
