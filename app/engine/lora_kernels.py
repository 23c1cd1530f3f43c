"""The LoRA terms of a decode step with one adapter (or blend) per row: interchangeable kernels, the table
choosing one per device and dtype, and the thread count small LoRA products run at on CPU.

A decode step routes row ``b`` (one token) through its ``K`` (slot, weight) terms. Every kernel computes,
for every part ``p`` of a :class:`~app.engine.lora.FusedLinear`,

    y[b, part p] += sum_k  w[b, k] * (x[b] @ At[s_bk][:, p's rank columns]) @ Bt[p][s_bk]

* ``"embedding_bag"`` (:func:`embedding_bag_decode`): the slot tensors viewed as embedding tables, one
  weighted ``embedding_bag`` for ``A`` and one per part group for ``B``: each row's ``A``/``B`` rows are
  reduced where they lie, never copied.
* ``"cpu"`` (:func:`cpu_rows`): a C++ kernel (:mod:`app.engine.cpu_kernels`) computing each token's terms
  in one fixed order in fp32, so a row's bits never depend on the other rows of its step; where it applies (on
  CPU, the kernels built) the engine sets it on every layer, and it then takes every step, prefill included,
  one adapter for all rows included (:data:`ROW_INVARIANT`).
* ``"bgmv"`` (:func:`bgmv_decode`): the BGMV pattern written with stock ops (Punica, Chen et al. 2023,
  arXiv:2310.18547): ``index_select`` copies each term's ``A`` and ``B`` slot into a batch, then ``torch.bmm``.
  It copies every row's factors first, which an ``embedding_bag`` never does, but ``bmm`` is a tuned
  batched GEMM where a device's ``embedding_bag`` may not be.

:data:`DECODE_KERNELS` says which one a layer uses by default, per device type and dtype: a table, not a
measurement at start-up (timings taken while a busy host serves would pick at random). ``stanceserve bench
--scenarios step`` times every kernel that runs on the host (``*_step_s_by_kernel``), so an entry changes
with the numbers that justify it; on CPU, in float32 and bfloat16, ``embedding_bag`` was the faster of the two
gather kernels (``bmm`` does not make up for copying every row's slots) and is what runs where the C++ kernels
cannot be built; where they are, the ``"cpu"`` kernel is faster than both (the benchmarks page) and the engine
sets it. CUDA keeps ``embedding_bag`` until the bench says otherwise.

On CPU, LoRA products of few rows (:data:`SMALL_ROWS`) run on the calling thread alone
(:class:`serial_threads`): a ``[16, 576] @ [576, 48]`` product is a few microseconds of work, less than
what splitting it over threads costs, and each parallel region waits for its slowest thread, which on a
busy host may be descheduled. The base model's own matmuls keep every thread.

Not here: the layers and slot tensors (:mod:`app.engine.lora`), the prefill path of the other kernels (one
matmul pair per slot, :meth:`~app.engine.lora.FusedLinear._prefill`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from app.engine import cpu_kernels

if TYPE_CHECKING:
    from app.engine.lora import FusedLinear
    from app.engine.lora_routing import LoRABatch

#: LoRA products of at most this many rows (tokens) are small: single-threaded on CPU (:class:`serial_threads`)
SMALL_ROWS = 256


class serial_threads:  # noqa: N801 - used like a function: ``with serial_threads(x):``
    """Context: torch's intra-op threads set to 1 while small CPU LoRA products run, then restored.

    Active only on CPU, for ``x`` of at most :data:`SMALL_ROWS` rows, when torch has more than one thread;
    else it changes nothing. The count is read and restored on the calling thread (OpenMP and MKL keep it
    per thread); torch also records it process-wide for threads that start their first parallel op while it
    is 1, which then run single-threaded, so only the engine thread, which runs every forward pass, uses this.

    Args:
        x: the layer's input ``[N, d_in]``.
    """

    __slots__ = ("_n",)

    def __init__(self, x: torch.Tensor) -> None:
        self._n = 0
        if x.device.type == "cpu" and x.shape[0] <= SMALL_ROWS:
            n = torch.get_num_threads()
            if n > 1:
                self._n = n

    def __enter__(self) -> None:
        if self._n:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self._n:
            torch.set_num_threads(self._n)


def embedding_bag_decode(layer: FusedLinear, x: torch.Tensor, y: torch.Tensor, routing: LoRABatch) -> None:
    """Add the LoRA terms of a decode step into ``y`` with ``embedding_bag`` gather-reductions.

    Args:
        layer: an enabled fused linear (``At``, ``Bg`` allocated).
        x: ``[rows, d_in]``, one token per row; y: ``[rows, D_out]``, the base output, updated in place.
        routing: the step's routing (``segments`` is ``None``).
    """
    rows, k = routing.idx.shape
    r, p = layer.rank, len(layer.Bt)
    x2 = x if k == 1 else x.repeat_interleave(k, dim=0)
    # xa[(b, k)] = sum_i x[b, i] * At[s_bk, i, :]  -> [rows * K, P*R], scaled by each term's weight
    index, offsets = routing.bags(layer.in_features)
    xa = F.embedding_bag(index, layer.At.view(-1, p * r), offsets, mode="sum", per_sample_weights=x2.reshape(-1))
    xa = _weighted(xa.view(rows, k, p, r), routing)
    for (first, count, n), table in zip(layer.groups, layer.Bg):
        # y[b, part i] += sum_{k, j} xa[b, k, i, j] * Bt[i][s_bk, j, :], for the group's parts i at once:
        # a bag per (row, part) over its K terms' B^T rows, weighted in (row, part, term, j) order
        index, offsets = routing.group_bags(r, count)
        weights = xa[:, :, first : first + count, :].transpose(1, 2).reshape(-1)  # a view when K = 1 and one group
        off = layer.offsets[first]
        out = F.embedding_bag(index, table.view(-1, n), offsets, mode="sum", per_sample_weights=weights)
        y[:, off : off + count * n] += out.view(rows, count * n)


def bgmv_decode(layer: FusedLinear, x: torch.Tensor, y: torch.Tensor, routing: LoRABatch) -> None:
    """Add the LoRA terms of a decode step into ``y`` by gathering each term's slot and a batched matmul (BGMV).

    Same arguments and result as :func:`embedding_bag_decode`. Copies ``rows * K`` slots of ``A``
    (``[d_in, P * R]`` each) and of each group's ``B`` before the ``bmm`` calls.
    """
    rows, k = routing.idx.shape
    r, p = layer.rank, len(layer.Bt)
    idx = routing.idx.reshape(-1)  # term (b, k) at b * K + k
    x2 = x if k == 1 else x.repeat_interleave(k, dim=0)
    xa = torch.bmm(x2.unsqueeze(1), layer.At.index_select(0, idx))  # [rows * K, 1, P*R]
    xa = _weighted(xa.view(rows, k, p, r), routing)
    for (first, count, n), table in zip(layer.groups, layer.Bg):
        # row b's parts i of the group, each summing its K terms: [rows * count, 1, K*R] @ [rows * count, K*R, n]
        xs = xa[:, :, first : first + count, :].transpose(1, 2).reshape(rows * count, 1, k * r)
        b = table.index_select(0, idx).view(rows, k, count, r, n).transpose(1, 2).reshape(rows * count, k * r, n)
        off = layer.offsets[first]
        y[:, off : off + count * n] += torch.bmm(xs, b).view(rows, count * n)


def _weighted(xa: torch.Tensor, routing: LoRABatch) -> torch.Tensor:
    """``xa`` ``[rows, K, P, R]`` times each term's blend weight (unchanged when every row is one term of weight 1)."""
    if routing.unit_weights:
        return xa
    rows, k = routing.idx.shape
    w = routing.weights.view(rows, k, 1, 1)
    xa = xa * w
    if xa.dtype == torch.float16:  # a padding term (weight 0) reads slot 0: if that adapter's A x overflows
        xa = xa.masked_fill(w == 0, 0.0)  # fp16 for this row, inf * 0 = NaN must not reach the row
    return xa


def cpu_rows(layer: FusedLinear, x: torch.Tensor, y: torch.Tensor, routing: LoRABatch) -> None:
    """Add the LoRA terms of a step into ``y`` through the C++ CPU kernel (``lora_rows_`` of
    :mod:`app.engine.cpu_kernels`), decode or prefill: each token's terms in one fixed order of its own, in fp32,
    rounded once into ``y``, so a token's bits do not depend on the step's other rows, their adapters or how its
    prompt was chunked. Same arguments and result as :func:`embedding_bag_decode` (and, with
    ``routing.segments``, as :meth:`~app.engine.lora.FusedLinear._prefill`); the layer routes every step here,
    one adapter for all rows included.

    Raises:
        RuntimeError: the kernels are not built (the engine sets this kernel only once they are).
    """
    ext = cpu_kernels.extension()
    if ext is None:
        raise RuntimeError("the CPU kernels are not available")
    ext.lora_rows_(x, y, layer.At, layer.Bg, *layer.part_groups, routing.idx, routing.weights,
                   routing.segment_bounds)


#: the decode kernels by name
KERNELS: dict[str, Callable[[FusedLinear, torch.Tensor, torch.Tensor, LoRABatch], None]] = {
    "embedding_bag": embedding_bag_decode,
    "bgmv": bgmv_decode,
    "cpu": cpu_rows,
}

#: kernels that take every step, prefill and decode, one adapter for all rows included (batch-invariant by design)
ROW_INVARIANT = frozenset({"cpu"})

#: the kernel a layer uses, by (device type, dtype); ``(device type, None)`` covers that device's other dtypes.
#: Measured with ``stanceserve bench --scenarios step --dtype float32|bfloat16`` (see the module docstring).
DECODE_KERNELS: dict[tuple[str, torch.dtype | None], str] = {
    ("cpu", torch.float32): "embedding_bag",
    ("cpu", torch.bfloat16): "embedding_bag",
    ("cpu", None): "embedding_bag",
    ("cuda", None): "embedding_bag",
}


def decode_kernel_for(device: torch.device, dtype: torch.dtype) -> str:
    """The name of the decode kernel (a key of :data:`KERNELS`) for layers on ``device`` in ``dtype``."""
    return DECODE_KERNELS.get((device.type, dtype)) or DECODE_KERNELS.get((device.type, None)) or "embedding_bag"
