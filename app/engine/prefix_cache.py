"""Prefix reuse per stance: full KV blocks of prompt prefixes, shared by reference, keyed by stance and content.

Many requests on one stance share a system prompt. With LoRA on k/v (and on every layer below), the
keys and values of a prefix depend on the stance, so a block is keyed by

    key_i = sha256(key_{i-1} || stance key || token ids of block i)

where the stance key names the exact adapter contents and weights (:func:`stance_key`: adapter
digests, so a replaced adapter never reuses its predecessor's KV), as vLLM's automatic prefix
caching keys blocks per LoRA. A block is shared only between sequences of the same stance key.

The blocks are the engine's own KV blocks (:class:`~app.engine.kv_cache.PagedKVCache`), nothing is
copied: once a sequence's prompt is prefilled, :meth:`PrefixCache.store` keys its full prompt blocks
in the cache's :class:`~app.engine.kv_cache.BlockPool`; at admission, :meth:`PrefixCache.match` finds
the longest keyed chain of a prompt's full blocks (always leaving at least one prompt token to
prefill, whose logits give the first output token) and :meth:`PrefixCache.take` puts them at the
head of the new sequence's block table, one more reference each. A sequence writes only positions
past its cached prefix, so a shared block is only ever read. Blocks nobody references stay keyed
(evictable) until the pool needs them. Not here: deciding when to call these (:mod:`app.engine.admission`,
:mod:`app.engine.scheduler`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from app.engine.kv_cache import BLOCK_SIZE, PagedKVCache
from app.engine.request import Stance


def stance_key(stance: Stance) -> bytes:
    """The bytes that name a stance's exact weights: each term's adapter digest and weight, in order."""
    parts = [f"{w.id.digest}:{x!r}" for w, x in stance.terms]
    return ("base" if not parts else "|".join(parts)).encode()


def block_keys(stance: bytes, tokens: list[int], blocks: int, block_size: int = BLOCK_SIZE) -> list[bytes]:
    """The chained keys of the first ``blocks`` full blocks of ``tokens`` under ``stance``."""
    keys, parent = [], b""
    for i in range(blocks):
        chunk = tokens[i * block_size : (i + 1) * block_size]
        h = hashlib.sha256(parent)
        h.update(stance)
        h.update(b"\0")
        h.update(",".join(map(str, chunk)).encode())
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class Hit:
    """The cached leading blocks of a prompt: their keys and block ids (empty: no hit)."""

    keys: list[bytes]
    blocks: list[int]

    def tokens(self, block_size: int) -> int:
        return len(self.blocks) * block_size


class PrefixCache:
    """The prefix index of a paged KV cache, per stance (see the module docstring).

    Args:
        cache: the engine's KV cache; its pool's ``max_cached`` bounds the keyed blocks (0 disables the cache).

    Attributes:
        hits, queries: prompt tokens served from the cache, and prompt tokens looked up (counters).
    """

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.pool = cache.pool
        self.block_size = cache.block_size
        self.hits = 0
        self.queries = 0

    @property
    def enabled(self) -> bool:
        return self.pool.max_cached > 0

    @property
    def blocks(self) -> int:
        """Most keyed blocks."""
        return self.pool.max_cached

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks keyed now (they are KV cache blocks, not a separate pool)."""
        return self.pool.cached * self.cache.block_bytes

    def match(self, stance: bytes, tokens: list[int]) -> Hit:
        """The longest keyed run of ``tokens``' leading full blocks under ``stance``, leaving at least one token
        (nothing shared, counted or reordered)."""
        hit = Hit([], [])
        if not self.enabled:
            return hit
        for key in block_keys(stance, tokens, (len(tokens) - 1) // self.block_size, self.block_size):
            block = self.pool.lookup(key)
            if block is None:
                break
            hit.keys.append(key)
            hit.blocks.append(block)
        return hit

    def cached_tokens(self, stance: bytes, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` a :meth:`match` serves now, in tokens: what admission subtracts
        from a prompt's prefill cost."""
        return self.match(stance, tokens).tokens(self.block_size)

    def take(self, hit: Hit, tokens: list[int]) -> list[int]:
        """Share ``hit``'s blocks with a new sequence of prompt ``tokens`` (one more reference each) and count the
        lookup. Returns the blocks, the head of the sequence's block table."""
        self.queries += len(tokens)
        if hit.blocks:
            self.pool.share(hit.blocks)
            self.pool.touch(hit.keys)
            self.hits += hit.tokens(self.block_size)
        return list(hit.blocks)

    def store(self, stance: bytes, tokens: list[int], table: list[int]) -> int:
        """Key the full blocks of ``tokens`` (whose KV is written) in ``table`` under ``stance``.

        Blocks already keyed are only touched (LRU). Returns the number of blocks added.
        """
        if not self.enabled:
            return 0
        keys = block_keys(stance, tokens, min(len(tokens) // self.block_size, len(table)), self.block_size)
        self.pool.touch(keys)
        return sum(self.pool.register(key, block) for key, block in zip(keys, table))

    def clear(self) -> None:
        """Forget every key."""
        self.pool.clear()
