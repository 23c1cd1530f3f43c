"""Admission by free KV blocks, and the KV blocks of running rows: :class:`Admission`.

Each step with no group prefilling, the scheduler asks :meth:`Admission.admit` for the next prefill group:
preempted sequences first (oldest first), then waiting requests, while the batch has room (``max_batch_size``
rows), the KV cache has free blocks for their prompts (past the blocks the prefix cache shares, keeping
:attr:`~Admission.block_reserve` free while other rows run), their adapters fit in free slots (pinned at
admission, unpinned when the row ends), and the group's prompts fit one prefill chunk (counting the tokens the
prefix cache does not serve; a longer single prompt goes alone). The group's rows of one adapter or blend are
placed next to its first row.

Before each decode step, :meth:`Admission.reserve_decode_blocks` gives each decoding row the block its next
position needs; when the cache has too few it preempts the newest rows (vLLM's recompute preemption): frees
their blocks and keeps them, slots still pinned, at the head of :attr:`~Admission.preempted`, to prefill their
prompt and generated tokens again when blocks are free (the client sees a longer wait, never an error, and the
same tokens).

A request whose admission fails (its adapter cannot load, a seed the generator refuses, a stance needing more
slots than the server has) ends alone with one error event. Not here: the thread, the queue's producers, the
model steps (:mod:`app.engine.scheduler`), events and row endings (:mod:`app.engine.outbox`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

import torch

from app.engine.batch import Batch, Sequence
from app.engine.kv_cache import PagedKVCache, blocks_for
from app.engine.outbox import Outbox
from app.engine.prefix_cache import Hit, PrefixCache, stance_key
from app.engine.request import AdmittedEvent, GenerationRequest, PreemptedEvent
from app.engine.slots import NoFreeSlotError, SlotCache
from app.errors import InternalError, InvalidRequestError

logger = logging.getLogger(__name__)


class Admission:
    """Turns preempted sequences and waiting requests into prefill groups, and finds decoding rows their blocks.

    Args:
        cache: the paged KV cache (its free blocks bound admission and trigger preemption).
        slots: the slot cache the admitted rows' adapters are pinned in.
        outbox: where admission's events and failed requests go (and its ``admission`` fault stage).
        waiting: the queue of requests, oldest first (shared with its producer, which appends under ``lock``).
        lock: guards ``waiting``.
        device: where each row's sampling generator lives.
        prefix_cache: KV blocks of prompt prefixes per stance, reused at admission (``None``: off).
    """

    def __init__(
        self,
        cache: PagedKVCache,
        slots: SlotCache,
        outbox: Outbox,
        waiting: collections.deque[GenerationRequest],
        lock: threading.Condition,
        device: torch.device,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.kv = cache
        self.slots = slots
        self.outbox = outbox
        self.waiting = waiting
        self.lock = lock
        self.device = device
        #: the prefix cache (``None``: off; may be set to ``None`` to detach it)
        self.prefix = prefix_cache
        #: sequences preempted for KV blocks (slots still pinned, no blocks), oldest first: admitted before the queue
        self.preempted: collections.deque[Sequence] = collections.deque()
        #: sequences preempted so far (a counter; /metrics reads it)
        self.preemptions = 0
        self._order = itertools.count()
        #: free blocks admission leaves for the running rows to grow into (vLLM's watermark: 1% of the cache)
        self.block_reserve = max(1, cache.pool.capacity // 100)

    # ------------------------------------------------------------------ admission
    def admit(self, running: int, max_rows: int, budget: int) -> list[Sequence]:
        """The next prefill group: preempted sequences, then waiting requests, taken while they fit.

        Args:
            running: rows running now (admission runs while no group prefills: the decoding rows).
            max_rows: most rows running at once (``max_batch_size``).
            budget: prompt tokens one prefill chunk holds (``prefill_chunk_tokens``); a first row always fits.

        Returns:
            the admitted rows (blocks placed, slots pinned, :class:`AdmittedEvent` sent to the fresh ones), rows
            of one stance side by side; empty when nothing fits now. Requests that cannot run are ended here.
        """
        seqs: list[Sequence] = []
        keys: list[bytes] = []  # each admitted row's stance key
        fresh_blocks: list[int] = []  # each admitted row's last block, zeroed at once below
        while running + len(seqs) < max_rows:
            if self.preempted:  # preempted sequences resume first, oldest first
                seq = self.preempted[0]
                ids = seq.prefill_ids()
                hit = self._match(seq.prefix_key, ids)
                if not self._fits(seqs, len(ids), hit, budget, running):
                    break
                self.preempted.popleft()
                fresh_blocks.append(self._place(seq, ids, hit))
                seqs.append(seq)
                keys.append(seq.prefix_key)
                continue
            if not self.waiting:
                break
            with self.lock:
                req = self.waiting[0]
            if req.cancelled:
                with self.lock:
                    self.waiting.popleft()
                self.outbox.finish_unstarted(req, req.cancel_reason)
                continue
            n = len(req.prompt_ids)
            key = stance_key(req.stance)
            # the prefill cost is the tokens left after the prefix cache: many requests sharing a cached system
            # prompt fit one group, where counting whole prompts would prefill them one group each
            hit = self._match(key, req.prompt_ids)
            if not self._fits(seqs, n, hit, budget, running):
                break
            try:
                self.outbox.inject("admission", req)
                pairs = self._acquire(req)
            except Exception as e:  # noqa: BLE001 - this request alone fails (e.g. its adapter cannot load)
                with self.lock:
                    self.waiting.popleft()
                self.outbox.error(req, e)
                continue
            if pairs is None:
                if running or seqs:
                    break  # no free slot now: wait for running rows to finish
                with self.lock:  # nothing running could free a slot: this request can never run
                    self.waiting.popleft()
                self.outbox.error(req, InvalidRequestError(
                    f"the stance needs {len(req.stance.terms)} adapter slots; the server has {self.slots.capacity}",
                    param="stances",
                ))
                continue
            with self.lock:
                self.waiting.popleft()
            p = req.params
            try:
                seq = Sequence(req=req, slots=pairs, generator=p.make_generator(self.device), next_pos=n,
                               order=next(self._order), prefix_key=key)
            except Exception as e:  # noqa: BLE001 - e.g. a seed the generator refuses
                self.outbox.release(pairs)
                self.outbox.error(req, e)
                continue
            fresh_blocks.append(self._place(seq, req.prompt_ids, hit))
            seq.prompt_cached = seq.cached
            seqs.append(seq)
            keys.append(key)
            self.outbox.emit(req, AdmittedEvent(n, time.perf_counter(), seq.cached))
        self.kv.zero([b for b in fresh_blocks if b >= 0])
        # rows of one stance side by side, at the place of its first row (distinct stances keep their order): prefill
        # then runs one slice per adapter slot over them, not a gather
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        return [seqs[i] for i in sorted(range(len(seqs)), key=lambda i: first[keys[i]])]

    def _match(self, key: bytes, ids: list[int]) -> Hit:
        return self.prefix.match(key, ids) if self.prefix is not None else Hit([], [])

    def _fits(self, seqs: list[Sequence], n: int, hit: Hit, budget: int, running: int) -> bool:
        """Whether a sequence of ``n`` tokens to prefill (``hit`` served by the prefix cache) joins the group
        ``seqs``: its uncached tokens fit the group's prefill budget (a first one always does) and the cache has
        blocks for it, keeping :attr:`block_reserve` free while other rows run."""
        bs = self.kv.block_size
        todo = n - hit.tokens(bs)
        if seqs and sum(s.prefill_len - s.cached for s in seqs) + todo > budget:
            return False  # the group's prefill would exceed one chunk: leave it for the next group
        need = blocks_for(n, bs) - len(hit.blocks)
        reserve = self.block_reserve if (seqs or running) else 0
        return need <= self.kv.pool.available(hit.blocks) - reserve

    def _place(self, seq: Sequence, ids: list[int], hit: Hit) -> int:
        """Give ``seq`` its block table for prefilling ``ids``: the prefix cache's blocks of ``hit``, then allocated
        ones (:meth:`_fits` said they are free). Returns its last allocated block, which the caller zeroes (-1: none)."""
        shared = self.prefix.take(hit, ids) if self.prefix is not None else []
        new = self.kv.allocate(blocks_for(len(ids), self.kv.block_size) - len(shared), zero=0)
        assert new is not None, "admission checked the free blocks"
        seq.blocks = shared + new
        seq.cached = seq.prefilled = len(shared) * self.kv.block_size
        return new[-1] if new else -1

    def _acquire(self, req: GenerationRequest) -> list[tuple[int, float]] | None:
        """Pin every adapter of the request's stance; ``None`` (nothing pinned) when a slot is not free now.

        Raises:
            whatever loading an adapter into a slot raises (nothing stays pinned then).
        """
        taken: list[tuple[int, float]] = []
        try:
            for adapter, weight in req.stance.terms:
                taken.append((self.slots.acquire(adapter), float(weight)))
        except NoFreeSlotError:
            self.outbox.release(taken)
            return None
        except BaseException:
            self.outbox.release(taken)
            raise
        return taken

    # ------------------------------------------------------------------ decode blocks and preemption
    def reserve_decode_blocks(self, batch: Batch) -> None:
        """Give every decoding row of ``batch`` the block its next position needs, preempting the newest rows
        while the cache has too few (:meth:`preempt`)."""
        bs = self.kv.block_size
        while True:
            needy = [s for s in batch.seqs if s.blocks_needed(bs)]
            if not needy:
                return
            if len(needy) <= self.kv.free_blocks:
                got = self.kv.allocate(len(needy), zero=len(needy))
                assert got is not None
                for s, b in zip(needy, got):
                    s.blocks.append(b)
                return
            self.preempt(batch, max(batch.seqs, key=lambda s: s.order))

    def preempt(self, batch: Batch, s: Sequence) -> None:
        """Take ``s`` out of ``batch`` and free its blocks; it resumes ahead of the queue by prefilling its prompt
        and generated tokens again. A sequence that alone needs more blocks than the cache holds fails instead
        (one :class:`~app.errors.InternalError` event)."""
        batch.keep([i for i, x in enumerate(batch.seqs) if x is not s])
        if len(s.blocks) + 1 > self.kv.pool.capacity:
            self.outbox.fail_row(s, InternalError(
                f"the sequence needs more than the KV cache's {self.kv.pool.capacity} blocks "
                f"(request id {s.req.request_id}); raise kv_cache_memory_bytes"
            ))
            return
        if self.prefix is not None:  # its full blocks stay cached (evictable): a resume soon finds them
            self.prefix.store(s.prefix_key, s.prefill_ids(), s.blocks)
        self.kv.release(s.blocks)
        s.blocks, s.prefilled, s.cached = [], 0, 0
        self.preempted.appendleft(s)
        self.preemptions += 1
        self.outbox.notify(s.req, PreemptedEvent(s.next_pos))
        logger.info("preempted request %s at %d tokens (KV cache full); it resumes when blocks are free",
                    s.req.request_id, s.next_pos)
