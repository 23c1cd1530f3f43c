"""The engine-owned KV cache: fixed-size blocks from one memory budget, a block table per sequence (paged).

Paged attention (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention"): the keys and values of every layer live in blocks of :attr:`PagedKVCache.block_size`
positions, one tensor pair per layer, allocated once at start-up:

    k[layer], v[layer]: [kv_heads, num_blocks, block_size, head_dim]

A sequence holds a *block table* (a list of block ids): its token ``t`` lives at position
``t % block_size`` of block ``table[t // block_size]``. Blocks are taken as the sequence grows and
given back when it ends, so memory follows the tokens in use, not ``max_model_len`` per sequence.
Viewed as ``[kv_heads * num_blocks, block_size, head_dim]``, a layer gives a decode step's keys with
one ``index_select`` (block ``h * num_blocks + b`` for each row, KV head and table entry) as
``[rows, kv_heads, length, head_dim]``, contiguous, the layout attention's batched matmuls read
without another copy.

:class:`BlockPool` is the bookkeeping, with no tensors (so it can be property-tested alone): a
reference count per block (the sequences whose tables hold it), the free blocks, and the prefix
index: full blocks of prompt prefixes, keyed by content (:mod:`app.engine.prefix_cache` computes the
keys), shared by reference. A block whose count drops to 0 but that has a key stays cached and
*evictable*: it is reused, least recently used first, only when no plain free block is left.

Block 0 is never handed out: it is the *null block*, which block tables are padded with and which
the padding rows of static-shape decode steps write (:mod:`app.engine.graphs`); masked reads of it
only see finite values. A decode step reads, under its mask, the positions of a row's last block past
the row's length (where a score of ``nan`` from a failed sequence's leftovers would not be masked away),
so the last block of each allocation is zeroed when it is taken; the others are written in full by
the prefill before anything reads them.

Not here: attention (:mod:`app.engine.forward`), which sequence holds which blocks and when
(:mod:`app.engine.admission`, :mod:`app.engine.batch`), the content keys (:mod:`app.engine.prefix_cache`).
"""

from __future__ import annotations

import heapq
import os
from collections import OrderedDict

import torch

#: Tokens per block (vLLM's default block size as well).
BLOCK_SIZE = 16

#: The block that block tables are padded with and padding rows write; never allocated.
NULL_BLOCK = 0


def token_bytes(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one token's keys and values in every layer."""
    return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that hold ``tokens`` positions: ``ceil(tokens / block_size)``."""
    return -(-max(tokens, 0) // block_size)


def default_budget(device: torch.device, *, max_tokens: int, per_token: int) -> int:
    """The KV cache budget when ``kv_cache_memory_bytes`` is unset, in bytes: on CUDA half the device memory free
    now (after the weights; the rest is for activations, adapter slots and graphs), elsewhere a quarter of the
    host's free memory (blocks are touched only when first used, so the process's resident memory follows the
    tokens in use); never more than ``max_tokens`` tokens of ``per_token`` bytes (what the rows could ever hold)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room = free // 2
    else:
        try:
            room = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (ValueError, OSError, AttributeError):  # no sysconf (not POSIX): a fixed 2 GiB
            room = 2 << 30
    return min(room, max_tokens * per_token)


class BlockPool:
    """Reference counts, free blocks and the prefix index of ``num_blocks`` blocks (block 0 reserved).

    Every block other than :data:`NULL_BLOCK` is in exactly one state:

    * *in use*: referenced by at least one sequence (``refs[b] > 0``); a keyed block in use is shared;
    * *evictable*: unreferenced but keyed (its KV is a cached prefix block), least recently used first;
    * *free*: unreferenced and unkeyed.

    Args:
        num_blocks: blocks in the cache, the null block included (at least 2).
        max_cached: most keyed blocks (the prefix index's size); 0 turns prefix caching off.

    Attributes:
        refs: per block, the sequences holding it.
        allocations: blocks handed out by :meth:`allocate` so far (a counter).
        peak_in_use: the most blocks in use at once since the last :meth:`reset_peak`.
    """

    def __init__(self, num_blocks: int, max_cached: int = 0) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least one block besides the null block")
        self.num_blocks = num_blocks
        self.max_cached = max(0, max_cached)
        self.refs = [0] * num_blocks
        self._free = list(range(1, num_blocks))  # a heap: the lowest block first, so touched memory stays compact
        self._key_of: dict[int, bytes] = {}
        self._block_of: OrderedDict[bytes, int] = OrderedDict()  # key -> block, least recently used first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced keyed blocks, LRU first
        self.allocations = 0
        self.peak_in_use = 0

    def reset_peak(self) -> None:
        """Start :attr:`peak_in_use` again from the blocks in use now."""
        self.peak_in_use = self.in_use

    # ------------------------------------------------------------------ counts
    @property
    def capacity(self) -> int:
        """Blocks sequences can hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def free(self) -> int:
        """Blocks :meth:`allocate` can hand out now: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def in_use(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.capacity - self.free

    @property
    def cached(self) -> int:
        """Keyed blocks (in use or evictable)."""
        return len(self._block_of)

    def available(self, reusing: list[int] = ()) -> int:
        """Blocks :meth:`allocate` could hand out after :meth:`share` of ``reusing`` (whose evictable ones then
        are in use)."""
        return self.free - sum(1 for b in set(reusing) if b in self._evictable)

    # ------------------------------------------------------------------ references
    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks for one sequence (each referenced once), or ``None`` (nothing taken) when fewer are
        available. Free blocks go first, then evictable ones, least recently used first (their keys dropped)."""
        if n > self.free:
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = heapq.heappop(self._free)
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
            self.refs[b] = 1
            out.append(b)
        self.allocations += n
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return out

    def share(self, blocks: list[int]) -> None:
        """One more reference to each of ``blocks`` (cached prefix blocks a new sequence reads)."""
        for b in blocks:
            if self.refs[b] == 0:
                if b not in self._evictable:
                    raise RuntimeError(f"KV block {b} is free: it cannot be shared")
                del self._evictable[b]
            self.refs[b] += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each of ``blocks``; a block nobody references becomes evictable (keyed) or free."""
        for b in blocks:
            if b == NULL_BLOCK or self.refs[b] <= 0:
                raise RuntimeError(f"KV block {b} released more often than it was taken")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self._key_of:
                    self._evictable[b] = None
                else:
                    heapq.heappush(self._free, b)

    # ------------------------------------------------------------------ prefix index
    def lookup(self, key: bytes) -> int | None:
        """The block holding the content ``key``, or ``None``."""
        return self._block_of.get(key)

    def touch(self, keys: list[bytes]) -> None:
        """Mark ``keys`` most recently used (in the index, and among evictable blocks)."""
        for key in keys:
            b = self._block_of.get(key)
            if b is not None:
                self._block_of.move_to_end(key)
                if b in self._evictable:
                    self._evictable.move_to_end(b)

    def register(self, key: bytes, block: int) -> bool:
        """Key the in-use ``block`` by ``key`` (a full block of a prompt whose KV is written). Returns whether it
        was added: not when the key or the block is keyed already, or caching is off. Past ``max_cached`` keys
        the least recently used key is dropped."""
        if self.max_cached == 0 or key in self._block_of or block in self._key_of:
            return False
        if self.refs[block] <= 0:
            raise RuntimeError(f"KV block {block} is not in use: it cannot be cached")
        if len(self._block_of) >= self.max_cached:
            self._forget(next(iter(self._block_of)))
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def _forget(self, key: bytes) -> None:
        b = self._block_of.pop(key)
        del self._key_of[b]
        if b in self._evictable:
            del self._evictable[b]
            heapq.heappush(self._free, b)

    def clear(self) -> None:
        """Forget every key (evictable blocks become free)."""
        for key in list(self._block_of):
            self._forget(key)

    def reset(self) -> None:
        """Every block free and unkeyed (after the engine lost track of its sequences)."""
        self.__init__(self.num_blocks, self.max_cached)

    def check(self) -> None:
        """Raise ``AssertionError`` unless the states partition the blocks and the index is consistent (tests)."""
        free, evictable = set(self._free), set(self._evictable)
        used = {b for b in range(1, self.num_blocks) if self.refs[b] > 0}
        assert len(free) == len(self._free), "a block is free twice"
        assert not (free & evictable or free & used or evictable & used), "a block is in two states"
        assert len(free) + len(evictable) + len(used) == self.capacity, "the states do not add up to the capacity"
        assert all(self.refs[b] == 0 for b in free | evictable) and self.refs[NULL_BLOCK] == 0
        assert NULL_BLOCK not in free | evictable
        assert all(b in self._key_of for b in evictable) and not any(b in self._key_of for b in free)
        assert {self._block_of[k]: k for k in self._block_of} == self._key_of
        assert len(self._block_of) <= max(self.max_cached, 0)


class PagedKVCache:
    """Key/value blocks of every layer, allocated up front, and their :class:`BlockPool`.

    Args:
        num_layers, kv_heads, head_dim: the model's attention shape.
        num_blocks: blocks, the null block included.
        dtype, device: of the tensors (the model's).
        block_size: positions per block.
        max_cached: most blocks the prefix index keeps (:class:`BlockPool`; 0: no prefix caching).

    Attributes:
        k, v: per layer, ``[kv_heads, num_blocks, block_size, head_dim]``.
        pool: the blocks' bookkeeping.
        nbytes: memory held, in bytes; token_bytes: bytes of one token's KV (every layer).
    """

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, num_blocks: int, dtype: torch.dtype,
        device: torch.device | str, *, block_size: int = BLOCK_SIZE, max_cached: int = 0,
    ) -> None:
        self.pool = BlockPool(num_blocks, max_cached)
        shape = (kv_heads, num_blocks, block_size, head_dim)
        # empty, not zeros: blocks are zeroed when taken, so pages of blocks never used are never touched (on CPU
        # the process's resident memory follows the blocks in use); the null block is zeroed now
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        for t in (*self.k, *self.v):
            t[:, NULL_BLOCK].zero_()
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.token_bytes = token_bytes(num_layers, kv_heads, head_dim, dtype)
        self.block_bytes = self.token_bytes * block_size
        self.nbytes = num_blocks * self.block_bytes
        self.device = torch.device(device)

    @classmethod
    def budgeted(
        cls, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str, *,
        budget_bytes: int, max_len: int, max_blocks: int | None = None, block_size: int = BLOCK_SIZE,
        prefix_bytes: int = 0,
    ) -> PagedKVCache:
        """A cache of ``budget_bytes // block_bytes`` blocks (at most ``max_blocks``), the null block included.

        Args:
            max_len: the longest sequence, in tokens: the budget must hold one (so a sequence alone always fits).
            prefix_bytes: most bytes of blocks the prefix index keeps (0: off).

        Raises:
            ValueError: the budget holds less than one sequence of ``max_len`` tokens (the message gives the
                bytes that needs).
        """
        per_block = token_bytes(num_layers, kv_heads, head_dim, dtype) * block_size
        blocks = budget_bytes // per_block
        if max_blocks is not None:
            blocks = min(blocks, max_blocks)
        need = blocks_for(max_len, block_size) + 1
        if blocks < need:
            raise ValueError(
                f"a KV cache budget of {budget_bytes} bytes holds {max(blocks, 0)} blocks of {block_size} tokens; one "
                f"sequence of {max_len} tokens needs {need * per_block} bytes ({need} blocks with the null block): "
                "raise kv_cache_memory_bytes or lower max_model_len"
            )
        return cls(num_layers, kv_heads, head_dim, blocks, dtype, device, block_size=block_size,
                   max_cached=prefix_bytes // per_block)

    # ------------------------------------------------------------------ blocks
    @property
    def free_blocks(self) -> int:
        return self.pool.free

    def allocate(self, n: int, *, zero: int = 1) -> list[int] | None:
        """``n`` blocks, or ``None`` when fewer are available (:meth:`BlockPool.allocate`); the last ``zero`` of them
        zeroed (see the module docstring: 1 for one sequence's blocks, ``n`` for one new block for each of ``n``
        sequences, 0 when the caller zeroes them with :meth:`zero`)."""
        blocks = self.pool.allocate(n)
        if blocks and zero > 0:
            self.zero(blocks[-zero:])
        return blocks

    def zero(self, blocks: list[int]) -> None:
        """Zero the keys and values of ``blocks`` in every layer."""
        if blocks:
            idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
            for t in (*self.k, *self.v):
                t.index_fill_(1, idx, 0)

    def release(self, blocks: list[int]) -> None:
        """Drop a sequence's references to ``blocks`` (:meth:`BlockPool.release`)."""
        self.pool.release(blocks)

    def reset(self) -> None:
        """Free every block (after the engine lost track of its sequences)."""
        self.pool.reset()

    def used_bytes(self) -> int:
        """Bytes of the blocks sequences hold now."""
        return self.pool.in_use * self.block_bytes

    # ------------------------------------------------------------------ reads and writes
    def write(self, layer: int, kv_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys and values of ``N`` tokens of layer ``layer``.

        Args:
            kv_index: ``[N]`` int64: each token's ``block * block_size + offset``.
            k, v: ``[N, kv_heads, head_dim]``.
        """
        kc, vc = self.k[layer], self.v[layer]
        h, nb, bs, d = kc.shape
        kc.view(h, nb * bs, d).index_copy_(1, kv_index, k.transpose(0, 1))
        vc.view(h, nb * bs, d).index_copy_(1, kv_index, v.transpose(0, 1))

    def gather(self, layer: int, index: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``rows`` rows' blocks of layer ``layer`` -> two ``[rows, kv_heads, L, head_dim]``
        contiguous tensors (copies).

        Args:
            index: ``[rows * kv_heads * blocks]`` int64 into the layer viewed as ``[kv_heads * num_blocks,
                block_size, head_dim]`` (:meth:`~app.engine.forward.DecodeGroup.gather_index`); ``L = blocks * block_size``.
        """
        kc, vc = self.k[layer], self.v[layer]
        h, nb, bs, d = kc.shape
        length = index.shape[0] // (rows * h) * bs
        return (kc.view(h * nb, bs, d).index_select(0, index).view(rows, h, length, d),
                vc.view(h * nb, bs, d).index_select(0, index).view(rows, h, length, d))
