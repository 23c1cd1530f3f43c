"""The scheduler: the one thread that touches the model.

Loop, one *step* at a time (continuous batching, Yu et al. 2022, "Orca"):

1. drop cancelled rows; if no group is prefilling, take the next group from
   :class:`~app.engine.admission.Admission`: preempted sequences, then waiting
   requests, while the batch has room (``max_batch_size`` rows), the KV cache
   has free blocks for their prompts, their adapters fit in free slots and
   their uncached prompt tokens fit one prefill chunk;
2. prefill the group's next chunk of at most ``prefill_chunk_tokens`` packed
   prompt tokens (chunked prefill: a long prompt never stalls the running rows
   for more than one chunk per step); when its prompts are done, sample their
   first tokens and merge them into the running batch;
3. give each decoding row the block its next position needs (admission's
   :meth:`~app.engine.admission.Admission.reserve_decode_blocks`: when the
   cache has too few, the newest rows are preempted, to resume ahead of the
   queue with the same tokens);
4. run one decode step for every running row;
5. choose and emit each row's token (:class:`~app.engine.token_step.TokenStep`),
   finish rows on EOS, stop token or ``max_tokens``; their ending
   (:class:`~app.engine.outbox.Outbox`) releases their adapter slots and KV
   blocks.

Fault isolation: anything that goes wrong for one row (its admission, a
forward pass it is part of, non-finite logits, sampling, detokenisation) ends
that request alone with one :class:`~app.engine.request.ErrorEvent` and frees its slots; its
neighbours go on and produce the tokens they would have produced without it. A
batched forward that fails is retried without the faulty rows (found by
running each row alone). A fault no row explains fails the running rows, never
the thread; ``fault_hook`` lets tests make a chosen row fail at a chosen stage.

Each row routes its own LoRA terms (:class:`~app.engine.lora.LoRABatch`), so
rows of different stances and blends share every step. The model runs through
the engine's own forward pass (:class:`~app.engine.forward.ForwardPass`) over its
paged KV cache (:class:`~app.engine.kv_cache.PagedKVCache`). Not here: the
admission policy and preemption (:mod:`app.engine.admission`), token choice
(:mod:`app.engine.token_step`), event delivery and row endings
(:mod:`app.engine.outbox`), HTTP, tokenisation of chat
messages, adapter validation.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from app.engine.admission import Admission
from app.engine.batch import Batch, PrefillGroup, Sequence
from app.engine.config import EngineConfig
from app.engine.forward import ForwardPass
from app.engine.grammar import MaskJob
from app.engine.graphs import DecodeGraphs
from app.engine.kv_cache import PagedKVCache
from app.engine.lora import LoRABatch, MultiLoRA
from app.engine.outbox import Outbox
from app.engine.plan import Plan
from app.engine.prefix_cache import PrefixCache
from app.engine.request import GenerationRequest, Listener
from app.engine.slots import SlotCache
from app.engine.token_step import TokenStep
from app.errors import NotReadyError, QueueFullError

logger = logging.getLogger(__name__)


class Scheduler:
    """Queues requests and runs them in continuous batches on its own thread.

    Args:
        forward_pass: the forward pass over the base model's weights.
        cache: its paged KV cache (its free blocks bound how many sequences run at once).
        lora, slots: the multi-LoRA slots of ``forward_pass``'s layers and their slot cache.
        eos_token_ids: token ids that end a sequence.
        config: sizes (default: :class:`~app.engine.config.EngineConfig`'s, i.e. the settings' defaults); the
            scheduler reads ``max_batch_size`` (most rows per step, a cap: free KV blocks bound them too), ``max_waiting`` (queue length past which
            :meth:`submit` raises :class:`QueueFullError`) and ``prefill_chunk_tokens`` (prompt-token budget
            of one step's prefill).
        prefix_cache: KV blocks of prompt prefixes per stance, reused at admission (``None``: off).
        listeners: called with ``(request, event)`` for every event of every request, on the engine thread
            (metrics subscribe here); see :data:`~app.engine.request.Listener`.
        graphs: static-shape decode steps (CUDA graphs) that decode steps go through when one fits
            (:mod:`app.engine.graphs`), warmed up when the thread starts; ``None``: every step runs eagerly.
        overrides: ``EngineConfig`` fields replacing ``config``'s (e.g. ``max_batch_size=4``).
    """

    def __init__(
        self,
        forward_pass: ForwardPass,
        cache: PagedKVCache,
        lora: MultiLoRA,
        slots: SlotCache,
        eos_token_ids: set[int],
        *,
        config: EngineConfig | None = None,
        prefix_cache: PrefixCache | None = None,
        listeners: list[Listener] | None = None,
        graphs: DecodeGraphs | None = None,
        **overrides: Any,
    ) -> None:
        config = (config or EngineConfig()).replace(**overrides)
        self.config = config
        self.forward_pass = forward_pass
        self.kv = cache
        self.lora = lora
        self.slots = slots
        self.graphs = graphs
        self.eos_token_ids = set(eos_token_ids)
        self.max_batch_size = config.max_batch_size
        self.max_waiting = config.max_waiting
        self.prefill_chunk_tokens = config.prefill_chunk_tokens
        self.device = forward_pass.device
        self.dtype = forward_pass.dtype
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._cv = threading.Condition()
        #: each request's events and listeners, row endings, the test-only fault hook
        prefix = prefix_cache if prefix_cache is not None and prefix_cache.enabled else None
        self.outbox = Outbox(cache, slots, listeners, prefix)
        #: admission by free KV blocks, the decoding rows' blocks, preemption (and the preempted rows)
        self.admission = Admission(cache, slots, self.outbox, self._waiting, self._cv, self.device, prefix)
        #: choosing, emitting and ending: one token per row of a step's logits
        self.tokens = TokenStep(self.eos_token_ids, forward_pass.lm_head.out_features, self.outbox)
        self._batch = self._empty_batch()
        self._group: PrefillGroup | None = None  # newcomers being prefilled, chunk by chunk
        #: admitted rows (slots pinned) waiting to be prefilled as their own group: a failed group's rows
        self._pending: collections.deque[list[Sequence]] = collections.deque()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        #: cumulative timings of the model steps (for benchmarks): seconds, tokens, steps, rows
        self.timings = {"prefill_s": 0.0, "prefill_tokens": 0, "prefill_steps": 0, "decode_s": 0.0, "decode_steps": 0, "decode_rows": 0}
        self._control: collections.deque = collections.deque()

    # ------------------------------------------------------------------ public
    @property
    def listeners(self) -> list[Listener]:
        """Called with ``(request, event)`` for every event of every request (append to subscribe)."""
        return self.outbox.listeners

    @property
    def fault_hook(self) -> Callable[[str, GenerationRequest], None] | None:
        """Tests only: ``fault_hook(stage, request)`` may raise to make that row fail at that stage."""
        return self.outbox.fault_hook

    @fault_hook.setter
    def fault_hook(self, hook: Callable[[str, GenerationRequest], None] | None) -> None:
        self.outbox.fault_hook = hook

    @property
    def prefix(self) -> PrefixCache | None:
        """The prefix cache admission, prefill and finished rows use (``None``: off; set ``None`` to detach it)."""
        return self.admission.prefix

    @prefix.setter
    def prefix(self, prefix_cache: PrefixCache | None) -> None:
        self.admission.prefix = self.outbox.prefix = prefix_cache

    @property
    def preemptions(self) -> int:
        """Sequences preempted so far (a counter; /metrics reads it)."""
        return self.admission.preemptions

    @property
    def block_reserve(self) -> int:
        """Free KV blocks admission leaves for the running rows to grow into."""
        return self.admission.block_reserve

    @property
    def _preempted(self) -> collections.deque[Sequence]:
        return self.admission.preempted

    @property
    def num_running(self) -> int:
        """Rows decoding plus rows being prefilled."""
        pending = sum(len(g) for g in self._pending)
        return len(self._batch) + (len(self._group) if self._group is not None else 0) + pending

    @property
    def num_waiting(self) -> int:
        """Requests queued, and sequences preempted waiting to resume."""
        return len(self._waiting) + len(self._preempted)

    def start(self) -> None:
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._loop, name="stanceserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still queued or running get an :class:`~app.engine.request.ErrorEvent`."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, req: GenerationRequest) -> None:
        """Queue ``req``.

        Raises:
            QueueFullError: ``max_waiting`` requests are already queued.
            NotReadyError: the engine is stopped.
        """
        with self._cv:
            if self._stop:
                raise NotReadyError("engine is stopped")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(retry_after_s=max(1, len(self._waiting) // max(1, self.max_batch_size)))
            self._waiting.append(req)
            self._cv.notify_all()

    def call(self, fn: Any, timeout: float = 60.0) -> Any:
        """Run ``fn()`` on the engine thread between steps and return its result (re-raising its error).

        Used for model-touching work requested from other threads (e.g. dropping a slot).
        """
        if self._thread is None or not self._thread.is_alive():
            return fn()
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                box["error"] = e
            finally:
                done.set()

        with self._cv:
            self._control.append(run)
            self._cv.notify_all()
        if not done.wait(timeout):
            raise TimeoutError("engine did not run the call in time")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    # ------------------------------------------------------------------ loop
    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (false before :meth:`start` and after :meth:`stop`)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.graphs is not None:
            t0 = time.perf_counter()
            held = self.graphs.warm_up()
            logger.info("captured %d decode graphs in %.1f s", held, time.perf_counter() - t0)
        while True:
            with self._cv:
                while not (self._stop or self._waiting or self._control or self._preempted or self.num_running):
                    self._cv.wait()
                if self._stop:
                    break
                control = list(self._control)
                self._control.clear()
            try:
                for fn in control:
                    fn()
                self.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the server
                logger.exception("engine step failed outside any one row; failing the running rows")
                try:
                    self._fail_all(e, waiting=False)
                except Exception:  # noqa: BLE001 - the loop must survive even its own bookkeeping
                    logger.exception("failing the running rows failed too")
                    self.kv.reset()
                    self._batch, self._group, self._pending = self._empty_batch(), None, collections.deque()
                    self.admission.preempted.clear()
        self._fail_all(NotReadyError("engine stopped"), waiting=True)

    def step(self) -> None:
        """One scheduling step: admit newcomers and prefill one chunk of them, then decode every running row once."""
        self.steps += 1
        self._drop_cancelled()
        if self._group is None:
            if self._pending:
                self._group = PrefillGroup(self._pending.popleft())
            else:
                newcomers = self.admission.admit(self.num_running, self.max_batch_size, self.prefill_chunk_tokens)
                if newcomers:
                    self._group = PrefillGroup(newcomers)
        if self._group is not None:
            self._prefill_chunk()
        if len(self._batch):
            self.admission.reserve_decode_blocks(self._batch)
        if len(self._batch):
            self._decode()

    # ------------------------------------------------------------------ model steps
    def _forward(self, seqs: list[Sequence], plan: Plan, stage: str) -> torch.Tensor:
        """Run ``plan`` (tokens of ``seqs``, in order) with each row's LoRA routing; one logits row per sequence."""
        for s in seqs:
            self.outbox.inject(stage, s.req)
        routing = LoRABatch.from_rows(
            [s.slots for s in seqs], device=self.device, dtype=self.dtype,
            segments=None if plan.decode else plan.segments,
        )
        if plan.decode and self.graphs is not None:
            logits = self.graphs.run(plan, routing)
            if logits is not None:
                return logits
        return self.forward_pass.forward(plan, self.kv, routing)

    def _prefill_chunk(self) -> None:
        """Prefill the next chunk of the group; when its prompts are done, sample first tokens and merge.

        A failed forward of a group of several rows cannot say which row is at fault: the group is split
        and each row is prefilled again alone, from its first uncached token, so only the faulty row fails.
        """
        g = self._group
        assert g is not None
        t0 = time.perf_counter()
        seqs, plan = g.next_chunk(self.prefill_chunk_tokens, self.device, self.kv.block_size)
        try:
            logits = self._forward(seqs, plan, "prefill")
        except Exception as e:  # noqa: BLE001 - isolate the faulty row (see docstring)
            self._group = None
            g.restart()
            if len(g.seqs) == 1:
                self.outbox.fail_row(g.seqs[0], e)
            else:
                logger.warning("prefill of %d rows failed (%s); prefilling each alone", len(g.seqs), e)
                self._pending.extendleft([s] for s in reversed(g.seqs))
            return
        g.advance(seqs, plan, logits)
        self.timings["prefill_s"] += time.perf_counter() - t0
        self.timings["prefill_tokens"] += int(plan.ids.numel())
        self.timings["prefill_steps"] += 1
        if not g.finished:
            return
        self._group = None
        fresh = [s for s in g.seqs if not s.resumed]  # resumed rows already hold their next token
        first = torch.stack([s.logits for s in fresh]) if fresh else None
        for s in g.seqs:
            s.logits = None
            if self.prefix is not None:
                self.prefix.store(s.prefix_key, s.req.prompt_ids, s.blocks)
        self._batch.extend(g.seqs)
        if fresh:
            self._consume(fresh, first)

    def _decode(self) -> None:
        """One decode step of every running row.

        When the batched forward fails, each row is tried alone to find the faulty ones, those fail, and
        the step runs again for the others, so a bad row never costs its neighbours a token or changes
        one. (A step only writes KV at each row's next position, which the retry writes again, so there
        is nothing to roll back.)
        """
        t0 = time.perf_counter()
        plan = self._batch.decode_plan()
        masks = self.tokens.masks(list(self._batch.seqs), overlap=True)  # grammar masks beside the forward pass
        try:
            logits = self._forward(self._batch.seqs, plan, "decode")
        except Exception as e:  # noqa: BLE001 - isolate the faulty rows (see docstring)
            masks.result()  # the matchers are left as they were: the retry computes the masks again
            bad = self._probe_rows(e)
            if not bad:
                raise  # no row fails alone: a batch-level fault, failed by the loop
            self._batch.keep([i for i in range(len(self._batch)) if i not in bad])
            if len(self._batch):
                self._decode()
            return
        self.timings["decode_s"] += time.perf_counter() - t0
        self.timings["decode_steps"] += 1
        self.timings["decode_rows"] += len(self._batch)
        seqs = self._batch.seqs
        for s in seqs:
            s.next_pos += 1
        self._consume(list(seqs), logits, masks)

    def _probe_rows(self, error: BaseException) -> set[int]:
        """Rows of the batch whose decode step fails alone; each is failed with its own error."""
        bad: set[int] = set()
        for i, s in enumerate(self._batch.seqs):
            try:
                self._forward([s], self._batch.decode_plan([i]), "decode")
            except Exception as e:  # noqa: BLE001 - this row is at fault
                bad.add(i)
                self.outbox.fail_row(s, e)
        if bad:
            logger.warning("decode step failed (%s); %d of %d rows fail alone", error, len(bad), len(self._batch))
        return bad

    def _consume(self, seqs: list[Sequence], logits: torch.Tensor, masks: MaskJob | None = None) -> None:
        """Choose and emit one token per row of ``logits`` (:meth:`TokenStep.consume`); drop ended rows."""
        if self.tokens.consume(seqs, logits, masks):
            self._batch.keep([i for i, s in enumerate(self._batch.seqs) if s.finish_reason is None])

    # ------------------------------------------------------------------ endings
    def _drop_cancelled(self) -> None:
        # (rows still prefilling finish when their group joins the batch: at most one chunk later)
        keep = []
        for i, s in enumerate(self._batch.seqs):
            if s.req.cancelled:
                self.outbox.finish(s, s.req.cancel_reason)
            else:
                keep.append(i)
        self._batch.keep(keep)
        for s in [s for s in self._preempted if s.req.cancelled]:
            self._preempted.remove(s)
            self.outbox.finish(s, s.req.cancel_reason)

    def _empty_batch(self) -> Batch:
        return Batch(self.kv)

    def _fail_all(self, error: BaseException, *, waiting: bool) -> None:
        """Fail every running and prefilling row (and, with ``waiting``, every queued request)."""
        rows = self._batch.seqs + (self._group.seqs if self._group is not None else [])
        rows += [s for group in self._pending for s in group] + list(self._preempted)
        self._batch, self._group, self._pending = self._empty_batch(), None, collections.deque()
        self.admission.preempted.clear()
        for s in rows:
            self.outbox.fail_row(s, error)
        if waiting:
            with self._cv:
                queued = list(self._waiting)
                self._waiting.clear()
            for req in queued:
                self.outbox.error(req, error)
