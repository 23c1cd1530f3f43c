"""A step's tokens: from each row's last-position logits to its emitted token: :class:`TokenStep`.

After a forward pass, :meth:`TokenStep.consume` chooses one token per row (grammar masks, penalties,
sampling: :func:`~app.engine.sampling.choose_tokens`), advances each constrained row's matcher, sends the
row its :class:`~app.engine.request.TokenEvent`, and finishes rows on EOS, a stop token, a grammar that
stopped, or ``max_tokens``. A fault at one of these stages (``sampling``, the grammar's mask or matcher,
delivering the token) fails that row alone; its neighbours keep the tokens they chose.

Not here: the forward pass and its fault isolation, dropping ended rows from the batch
(:mod:`app.engine.scheduler`), stop strings and detokenisation (the consumer side, :mod:`app.engine.stream`).
"""

from __future__ import annotations

import time

import torch

from app.engine.batch import Sequence
from app.engine.grammar import MaskJob
from app.engine.outbox import Outbox
from app.engine.request import TokenEvent
from app.engine.sampling import TokenChoice, choose_tokens


class TokenStep:
    """Chooses, emits and ends: one token per row of a step's logits.

    Args:
        eos_token_ids: token ids that end a sequence (unless its params ignore EOS).
        vocab_size: the logits' width (the token masks' size).
        outbox: where tokens, endings and row faults go (and the ``sampling`` and ``grammar`` fault stages).
    """

    def __init__(self, eos_token_ids: set[int], vocab_size: int, outbox: Outbox) -> None:
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.outbox = outbox

    def masks(self, seqs: list[Sequence], overlap: bool) -> MaskJob:
        """Start computing the token masks of the constrained rows of ``seqs`` (see :class:`MaskJob`): on the
        helper thread when ``overlap`` (beside a forward pass), else now. A row's matcher is made on first use."""
        for s in seqs:
            if s.matcher is None and s.req.params.grammar is not None:
                s.matcher = s.req.params.grammar.matcher()
        return MaskJob([s.matcher for s in seqs], self.vocab_size).start(overlap)

    def consume(self, seqs: list[Sequence], logits: torch.Tensor, masks: MaskJob | None = None) -> bool:
        """Sample one token per row of ``logits`` and emit it; end finished and failed rows.

        Args:
            seqs: rows of the batch; ``seqs[i]`` goes with logits row ``i``.
            logits: ``[len(seqs), vocab]`` last-position logits.
            masks: the constrained rows' token masks, when already started (decode); else computed here.

        Returns:
            whether a row ended (finished or failed): the caller drops it from the batch.
        """
        faults: dict[int, BaseException] = {}
        for i, s in enumerate(seqs):
            try:
                self.outbox.inject("sampling", s.req)
            except Exception as e:  # noqa: BLE001
                faults[i] = e
        bitmask, mask_faults = (masks or self.masks(seqs, overlap=False)).result()
        for i, e in mask_faults.items():
            faults.setdefault(i, e)
        choices = choose_tokens(
            logits, [s.req.params for s in seqs], [s.generator for s in seqs],
            [s.req.prompt_ids for s in seqs], [s.out_ids for s in seqs], self.eos_token_ids, bitmask,
        )
        now = time.perf_counter()
        gone = False
        for i, (s, choice) in enumerate(zip(seqs, choices)):
            fault = faults.get(i, choice if isinstance(choice, BaseException) else None)
            if fault is None:
                try:
                    if s.matcher is not None:
                        self.outbox.inject("grammar", s.req)
                        s.matcher.consume(choice.token_id)
                    self._on_token(s, choice, now)
                except Exception as e:  # noqa: BLE001 - e.g. the detokenizer fails on this row's text
                    fault = e
            if fault is not None:
                self.outbox.fail_row(s, fault)
            gone = gone or s.finish_reason is not None
        return gone

    def _on_token(self, s: Sequence, choice: TokenChoice, now: float) -> None:
        req, p = s.req, s.req.params
        tok = choice.token_id
        if s.first_token_at is None:
            s.first_token_at = now
        s.last_token_at = now
        s.last_token = tok
        s.out_ids.append(tok)
        ends = (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids
        self.outbox.emit(req, TokenEvent(tok, choice.logprob, choice.top_logprobs, now, ends))
        if ends or (s.matcher is not None and s.matcher.stopped):
            self.outbox.finish(s, "stop", decoded=True)
        elif len(s.out_ids) >= p.max_tokens:
            self.outbox.finish(s, "length", decoded=True)
