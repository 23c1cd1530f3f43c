"""Prefix reuse per stance: KV blocks of prompt prefixes, keyed by stance and token content.

Many requests on one stance share a system prompt. With LoRA on k/v (and on every layer below), the
keys and values of a prefix depend on the stance, so a block is keyed by

    key_i = sha256(key_{i-1} || stance key || token ids of block i)

where the stance key names the exact adapter contents and weights (:func:`stance_key`: adapter
digests, so a replaced adapter never reuses its predecessor's KV), as vLLM's automatic prefix
caching keys blocks per LoRA. A block holds ``BLOCK_TOKENS`` consecutive positions of every layer's
keys and values, in a pool preallocated from a byte budget; least recently used blocks are
overwritten when the pool is full.

Sequences keep their own KV rows (:mod:`app.engine.kv_cache`): at admission, :meth:`PrefixCache.load`
copies the longest cached chain of the prompt's full blocks into the sequence's row (always leaving
at least one prompt token to prefill, whose logits give the first output token); once its prompt is
prefilled, :meth:`PrefixCache.store` copies its new full blocks into the pool. Copying a block costs
far less than recomputing it. Not here: deciding when to call these (:mod:`app.engine.scheduler`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from app.engine.kv_cache import KVCache
from app.engine.request import Stance

#: Tokens per cached block (vLLM's default block size is 16 as well).
BLOCK_TOKENS = 16


def stance_key(stance: Stance) -> bytes:
    """The bytes that name a stance's exact weights: each term's adapter digest and weight, in order."""
    parts = [f"{w.id.digest}:{x!r}" for w, x in stance.terms]
    return ("base" if not parts else "|".join(parts)).encode()


def block_keys(stance: bytes, tokens: list[int], blocks: int) -> list[bytes]:
    """The chained keys of the first ``blocks`` full blocks of ``tokens`` under ``stance``."""
    keys, parent = [], b""
    for i in range(blocks):
        chunk = tokens[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS]
        h = hashlib.sha256(parent)
        h.update(stance)
        h.update(b"\0")
        h.update(",".join(map(str, chunk)).encode())
        parent = h.digest()
        keys.append(parent)
    return keys


class PrefixCache:
    """A pool of KV blocks and the index from block keys to them (LRU).

    Args:
        cache: the engine's KV cache (its shape and dtype set the pool's).
        budget_bytes: pool size in bytes; the pool holds ``budget_bytes // block_bytes`` blocks.

    Attributes:
        blocks: blocks in the pool (0 disables the cache).
        block_bytes: bytes of one block (keys and values of every layer).
        hits, queries: prompt tokens served from the cache, and prompt tokens looked up (counters).
    """

    def __init__(self, cache: KVCache, budget_bytes: int) -> None:
        k0 = cache.k[0]
        _, kv_heads, _, head_dim = k0.shape
        layers = len(cache.k)
        self.block_bytes = 2 * layers * kv_heads * BLOCK_TOKENS * head_dim * k0.element_size()
        self.blocks = max(0, budget_bytes // self.block_bytes)
        shape = (self.blocks, kv_heads, BLOCK_TOKENS, head_dim)
        self.k = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in range(layers)] if self.blocks else []
        self.v = [torch.zeros(shape, dtype=k0.dtype, device=k0.device) for _ in range(layers)] if self.blocks else []
        self.cache = cache
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> block, least recently used first
        self._free = list(range(self.blocks - 1, -1, -1))
        self.hits = 0
        self.queries = 0

    @property
    def enabled(self) -> bool:
        return self.blocks > 0

    @property
    def nbytes(self) -> int:
        return self.blocks * self.block_bytes

    def _chain(self, stance: bytes, tokens: list[int]) -> list[tuple[bytes, int]]:
        """``(key, block)`` of the longest cached run of ``tokens``' leading full blocks, leaving at least one token."""
        found = []
        for key in block_keys(stance, tokens, (len(tokens) - 1) // BLOCK_TOKENS):
            block = self._index.get(key)
            if block is None:
                break
            found.append((key, block))
        return found

    def cached_tokens(self, stance: bytes, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` :meth:`load` would serve now, in tokens (nothing copied or
        counted, LRU order untouched): what admission subtracts from a prompt's prefill cost."""
        return len(self._chain(stance, tokens)) * BLOCK_TOKENS if self.enabled else 0

    def load(self, stance: bytes, tokens: list[int], row: int) -> int:
        """Copy the longest cached prefix of ``tokens`` (whole blocks) into KV row ``row``.

        Returns:
            the prefix length served from the cache, in tokens: a multiple of ``BLOCK_TOKENS``, at most
            ``len(tokens) - 1``.
        """
        self.queries += len(tokens)
        if not self.enabled:
            return 0
        found = self._chain(stance, tokens)
        if not found:
            return 0
        for key, _ in found:
            self._index.move_to_end(key)
        idx = torch.tensor([block for _, block in found], dtype=torch.long, device=self.k[0].device)
        n = len(found) * BLOCK_TOKENS
        for pool, rows in ((self.k, self.cache.k), (self.v, self.cache.v)):
            for src, dst in zip(pool, rows):
                # [blocks, kv_heads, B, hd] -> [kv_heads, blocks * B, hd]
                dst[row, :, :n].copy_(src.index_select(0, idx).transpose(0, 1).reshape(dst.shape[1], n, -1))
        self.hits += n
        return n

    def store(self, stance: bytes, tokens: list[int], row: int, start: int = 0) -> int:
        """Copy the full blocks of ``tokens`` from KV row ``row`` into the pool (from token ``start`` on).

        Blocks already cached are only touched (LRU). Returns the number of blocks added.
        """
        if not self.enabled:
            return 0
        added = 0
        keys = block_keys(stance, tokens, len(tokens) // BLOCK_TOKENS)
        for i, key in enumerate(keys):
            if key in self._index:
                self._index.move_to_end(key)
                continue
            if i * BLOCK_TOKENS < start:  # loaded from the pool at admission (and evicted since)
                continue
            block = self._take()
            a = i * BLOCK_TOKENS
            for pool, rows in ((self.k, self.cache.k), (self.v, self.cache.v)):
                for dst, src in zip(pool, rows):
                    dst[block].copy_(src[row, :, a : a + BLOCK_TOKENS])
            self._index[key] = block
            added += 1
        return added

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        _, block = self._index.popitem(last=False)  # least recently used
        return block

    def clear(self) -> None:
        """Forget every block."""
        self._index.clear()
        self._free = list(range(self.blocks - 1, -1, -1))
