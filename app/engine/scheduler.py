"""The scheduler: the one thread that touches the model.

Loop, one *step* at a time (continuous batching, Yu et al. 2022, "Orca"):

1. drop cancelled rows; if no group is prefilling, admit waiting requests as a
   new group while the batch has room (``max_batch_size``), their adapters fit
   in free slots, and the group's padded prompts fit one prefill chunk
   (``prefill_chunk_tokens``; a longer single prompt goes alone);
2. prefill the group's next chunk of at most ``prefill_chunk_tokens`` padded
   tokens (chunked prefill: a long prompt never stalls the running rows for
   more than one chunk per step); when its prompts are done, sample their first
   tokens and merge them into the running batch;
3. run one decode step for every running row;
4. emit tokens, finish rows on EOS, stop string or ``max_tokens``, release
   their adapter slots.

Each row routes its own LoRA terms (:class:`~app.engine.lora.LoRABatch`), so
rows of different stances and blends share every step. Not here: HTTP,
tokenisation of chat messages, adapter validation.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import torch
from transformers import DynamicCache

from app.engine.batch import Batch, PrefillGroup, Sequence
from app.engine.detokenizer import IncrementalDetokenizer
from app.engine.lora import LoRABatch, MultiLoRA
from app.engine.request import ErrorEvent, FinishEvent, GenerationRequest, TokenEvent
from app.engine.sampling import choose_tokens
from app.engine.slots import NoFreeSlotError, SlotCache
from app.errors import InvalidRequestError, NotReadyError, QueueFullError
from app.metrics import Metrics

logger = logging.getLogger(__name__)


class Scheduler:
    """Queues requests and runs them in continuous batches on its own thread.

    Args:
        model: the base causal LM (already wrapped by ``lora``).
        tokenizer: for detokenisation.
        lora, slots: the multi-LoRA layers and their slot cache.
        eos_token_ids: token ids that end a sequence.
        max_batch_size: most rows per step.
        max_waiting: queue length past which :meth:`submit` raises :class:`QueueFullError`.
        prefill_chunk_tokens: prompt-token budget of one step's prefill.
        metrics: where to record; ``None`` records nothing.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        lora: MultiLoRA,
        slots: SlotCache,
        eos_token_ids: set[int],
        *,
        max_batch_size: int = 16,
        max_waiting: int = 256,
        prefill_chunk_tokens: int = 512,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lora = lora
        self.slots = slots
        self.eos_token_ids = set(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.metrics = metrics
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_token_ids, default=0))
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._cv = threading.Condition()
        self._batch = Batch([], DynamicCache(), torch.zeros(0, 0, dtype=torch.long, device=self.device))
        self._group: PrefillGroup | None = None  # newcomers being prefilled, chunk by chunk
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        #: cumulative timings of the model steps (for benchmarks): seconds, tokens, steps, rows
        self.timings = {"prefill_s": 0.0, "prefill_tokens": 0, "prefill_steps": 0, "decode_s": 0.0, "decode_steps": 0, "decode_rows": 0}
        self._control: collections.deque = collections.deque()

    # ------------------------------------------------------------------ public
    @property
    def num_running(self) -> int:
        """Rows decoding plus rows being prefilled."""
        return len(self._batch) + (len(self._group) if self._group is not None else 0)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._loop, name="stanceserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still queued or running get an :class:`ErrorEvent`."""
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
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stop or self._waiting or self._control or self.num_running):
                    self._cv.wait()
                if self._stop:
                    break
                control = list(self._control)
                self._control.clear()
            for fn in control:
                fn()
            try:
                self.step()
            except Exception as e:  # a failed step fails its rows, never the server
                logger.exception("engine step failed")
                self._fail_all(e)
        self._fail_all(NotReadyError("engine stopped"))

    def step(self) -> None:
        """One scheduling step: admit newcomers and prefill one chunk of them, then decode every running row once."""
        self.steps += 1
        self._drop_cancelled()
        if self._group is None:
            newcomers = self._admit()
            if newcomers:
                self._group = PrefillGroup(newcomers, self.pad_id, self.device, self.model.config)
        if self._group is not None:
            self._prefill_chunk()
        if len(self._batch):
            self._decode()

    # ------------------------------------------------------------------ admission
    def _admit(self) -> list[Sequence]:
        seqs: list[Sequence] = []
        budget = self.prefill_chunk_tokens
        while self._waiting and self.num_running + len(seqs) < self.max_batch_size:
            with self._cv:
                req = self._waiting[0]
            if req.cancelled:
                with self._cv:
                    self._waiting.popleft()
                self._finish_unstarted(req, "cancelled")
                continue
            n = len(req.prompt_ids)
            longest = max([n] + [len(s.req.prompt_ids) for s in seqs])
            if seqs and (len(seqs) + 1) * longest > budget:
                break  # the group's padded prefill would exceed one chunk: leave it for the next group
            pairs = self._acquire(req)
            if pairs is None:
                if len(self._batch) or seqs:
                    break  # no free slot now: wait for running rows to finish
                with self._cv:  # nothing running could free a slot: this request can never run
                    self._waiting.popleft()
                self._error(req, InvalidRequestError(
                    f"the stance needs {len(req.stance.terms)} adapter slots; the server has {self.slots.capacity}",
                    param="stances",
                ))
                continue
            with self._cv:
                self._waiting.popleft()
            p = req.params
            seqs.append(
                Sequence(
                    req=req,
                    slots=pairs,
                    detok=IncrementalDetokenizer(self.tokenizer, p.stop),
                    generator=p.make_generator(self.device),
                    next_pos=n,
                )
            )
        return seqs

    def _acquire(self, req: GenerationRequest) -> list[tuple[int, float]] | None:
        taken: list[tuple[int, float]] = []
        try:
            for adapter, weight in req.stance.terms:
                taken.append((self.slots.acquire(adapter), float(weight)))
        except NoFreeSlotError:
            for slot, _ in taken:
                self.slots.release(slot)
            return None
        return taken

    # ------------------------------------------------------------------ model steps
    def _forward(self, seqs: list[Sequence], ids, mask, pos, cache) -> torch.Tensor:
        routing = LoRABatch.from_rows([s.slots for s in seqs], device=self.device, dtype=self.dtype)
        with self.lora.routing(routing):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                use_cache=True, logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    def _prefill_chunk(self) -> None:
        """Prefill the next chunk of the group; when its prompts are done, sample first tokens and merge."""
        g = self._group
        assert g is not None
        t0 = time.perf_counter()
        ids, mask, pos = g.next_chunk(self.prefill_chunk_tokens)
        logits = self._forward(g.seqs, ids, mask, pos, g.cache)
        self.timings["prefill_s"] += time.perf_counter() - t0
        self.timings["prefill_tokens"] += int(ids.numel())
        self.timings["prefill_steps"] += 1
        if not g.finished:
            return
        self._group = None
        seqs = g.seqs
        if self.metrics is not None:
            for s in seqs:
                self.metrics.prompt_tokens.labels(s.req.stance.label).inc(len(s.req.prompt_ids))
        self._batch.extend(g.to_batch())
        start = len(self._batch) - len(seqs)
        self._consume(seqs, logits, list(range(start, start + len(seqs))))

    def _decode(self) -> None:
        t0 = time.perf_counter()
        ids, mask, pos = self._batch.decode_inputs()
        logits = self._forward(self._batch.seqs, ids, mask, pos, self._batch.cache)
        self.timings["decode_s"] += time.perf_counter() - t0
        self.timings["decode_steps"] += 1
        self.timings["decode_rows"] += len(self._batch)
        seqs = self._batch.seqs
        for s in seqs:
            s.next_pos += 1
        self._consume(seqs, logits, list(range(len(seqs))))

    def _consume(self, seqs: list[Sequence], logits: torch.Tensor, rows: list[int]) -> None:
        """Sample one token per row of ``logits`` (rows align with ``seqs``), emit, and retire finished rows."""
        tokens = choose_tokens(logits, [s.req.params for s in seqs], [s.generator for s in seqs])
        now = time.perf_counter()
        finished = set()
        for s, tok, row in zip(seqs, tokens, rows):
            self._on_token(s, tok, now)
            if s.finish_reason is not None:
                finished.add(row)
        if finished:
            self._batch.keep([i for i in range(len(self._batch)) if i not in finished])

    def _on_token(self, s: Sequence, tok: int, now: float) -> None:
        req, p = s.req, s.req.params
        label = req.stance.label
        if s.first_token_at is None:
            s.first_token_at = now
            if self.metrics is not None:
                self.metrics.ttft.labels(label).observe(now - req.arrival)
        elif self.metrics is not None:
            self.metrics.itl.labels(label).observe(now - (s.last_token_at or now))
        s.last_token_at = now
        s.last_token = tok
        if self.metrics is not None:
            self.metrics.generation_tokens.labels(label).inc()
            self.metrics.token_rate.add(label, 1)
        if tok in self.eos_token_ids and not p.ignore_eos:
            s.out_ids.append(tok)
            self._finish(s, "stop")
            return
        s.out_ids.append(tok)
        text = s.detok.add(tok)
        if s.detok.stopped:
            if text:
                req.sink(TokenEvent(tok, text))
            self._finish(s, "stop")
            return
        req.sink(TokenEvent(tok, text))
        if len(s.out_ids) >= p.max_tokens:
            self._finish(s, "length")

    # ------------------------------------------------------------------ endings
    def _finish(self, s: Sequence, reason: str) -> None:
        s.finish_reason = reason
        for slot, _ in s.slots:
            self.slots.release(slot)
        req = s.req
        tail = "" if reason == "cancelled" else s.detok.flush()
        ttft = None if s.first_token_at is None else s.first_token_at - req.arrival
        req.sink(FinishEvent(reason, tail, len(req.prompt_ids), len(s.out_ids), ttft))
        if self.metrics is not None:
            label = req.stance.label
            self.metrics.request_latency.labels(label).observe(time.perf_counter() - req.arrival)
            self.metrics.requests.labels(label, reason).inc()

    def _finish_unstarted(self, req: GenerationRequest, reason: str) -> None:
        req.sink(FinishEvent(reason, "", len(req.prompt_ids), 0, None))
        if self.metrics is not None:
            self.metrics.requests.labels(req.stance.label, reason).inc()

    def _drop_cancelled(self) -> None:
        # (rows still prefilling finish when their group joins the batch: at most one chunk later)
        keep = []
        for i, s in enumerate(self._batch.seqs):
            if s.req.cancelled:
                self._finish(s, "cancelled")
            else:
                keep.append(i)
        self._batch.keep(keep)

    def _fail_all(self, error: BaseException) -> None:
        group, self._group = (self._group.seqs if self._group is not None else []), None
        for s in self._batch.seqs + group:
            for slot, _ in s.slots:
                self.slots.release(slot)
            self._error(s.req, error)
        self._batch.keep([])
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        for req in waiting:
            self._error(req, error)

    def _error(self, req: GenerationRequest, error: BaseException) -> None:
        req.sink(ErrorEvent(error))
        if self.metrics is not None:
            self.metrics.requests.labels(req.stance.label, "error").inc()
