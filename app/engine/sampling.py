"""Next-token choice for a batch of rows, each with its own sampling parameters.

Per row, in this order (as vLLM does):

1. raw logits of the step (``[vocab]``, the model's dtype);
2. repetition penalty (CTRL, Keskar et al. 2019, arXiv:1909.05858; as HF's
   ``RepetitionPenaltyLogitsProcessor``) over every token seen in the prompt or the output;
3. frequency and presence penalties (OpenAI API docs) over the output tokens only;
4. ``logit_bias``;
5. the ``min_tokens`` mask (EOS ids and ``stop_token_ids`` at ``-inf`` until enough output);
5b. the row's **token mask** under constrained decoding (``grammar``): every token its grammar does not
   allow next at ``-inf`` (the masks come from ``app/engine/grammar.py``);
6. greedy rows: argmax; other rows: temperature, top-k, top-p (Holtzman et al. 2019,
   arXiv:1904.09751), then one draw with the row's own ``torch.Generator``.

Steps 2-5b run in float32 on a copy, and only for rows that use them; they apply to greedy
rows too, and a row without them is never touched by a neighbour's. Logprobs follow vLLM's default "raw" mode: ``log_softmax`` in float32 of the raw
logits of step 1, before penalties, bias, masks and temperature.

Each row is independent: a seeded row gets the same tokens whatever shares its batch, and a
row whose logits are non-finite, or whose processing or sampling fails, gets a
:class:`~app.errors.GenerationError` while its neighbours get their tokens.

This module does not know about adapters, the KV cache, stop strings (the scheduler matches
them, and ends rows on EOS and ``stop_token_ids``), nor does it validate request ranges
beyond what keeps the engine safe.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from app.engine.grammar import Grammar, apply_token_mask
from app.errors import GenerationError

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass
class SamplingParams:
    """How one request picks its tokens. Every default means "off".

    Attributes:
        max_tokens: most new tokens to generate.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_p: keep the smallest set of tokens whose probability sums to >= top_p (1 = off).
        top_k: keep the k most likely tokens (0 = off).
        seed: seeds this request's own generator, for reproducible sampling.
        stop: strings that end the completion (not included in the output).
        ignore_eos: keep generating past end-of-sequence tokens (benchmarks); EOS is then not
            masked by ``min_tokens`` either.
        presence_penalty: OpenAI, in [-2, 2]: subtracted once from every token already in the output.
        frequency_penalty: OpenAI, in [-2, 2]: subtracted per occurrence of a token in the output.
        repetition_penalty: CTRL, > 0 (1 = off): divides positive / multiplies negative logits
            of every token in the prompt or the output.
        logit_bias: token id -> value added to its logit (OpenAI range [-100, 100]).
        stop_token_ids: token ids that end the completion (the scheduler acts on them).
        min_tokens: until this many output tokens exist, EOS and ``stop_token_ids`` are banned.
        logprobs: ``None``: none; k in [0, 20]: the chosen token's logprob and the top k.
        grammar: constrained decoding: the compiled grammar the output must match (``None``: free).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    logprobs: int | None = None
    grammar: Grammar | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with ``seed`` on ``device``, or ``None`` when unseeded."""
        if self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


@dataclass
class TokenChoice:
    """One row's chosen token.

    Attributes:
        token_id: the chosen token.
        logprob: its raw log-probability (``None`` unless ``logprobs`` was asked).
        top_logprobs: the k most likely ``(token_id, logprob)``, by decreasing logprob (raw mode).
    """

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p filtering of one row of logits.

    Args:
        logits: ``[vocab]`` float logits.

    Returns:
        ``[vocab]`` float32 logits with filtered-out tokens at ``-inf``.
    """
    x = logits.float() / max(temperature, 1e-5)
    if top_k > 0 and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens before it already reach top_p (the top token is always kept)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[0] = False  # even when top_p rounds to 0 in float32
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
    return x


def needs_processing(p: SamplingParams, n_output: int) -> bool:
    """Whether steps 2-5b (penalties, bias, min_tokens, token mask) change anything for a row with
    ``n_output`` tokens."""
    return bool(
        p.grammar is not None
        or p.repetition_penalty != 1.0
        or (n_output and (p.presence_penalty or p.frequency_penalty))
        or p.logit_bias
        or n_output < p.min_tokens
    )


def _ids(ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """``[n]`` int64 ids on ``device``, dropping ids outside ``[0, vocab)`` (the model cannot emit them)."""
    t = torch.tensor(ids, dtype=torch.long)
    return t[(t >= 0) & (t < vocab)].to(device)


def process_logits(
    x: torch.Tensor,
    p: SamplingParams,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    eos_token_ids: Collection[int] = frozenset(),
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 2-5b on one row, in place: repetition, frequency/presence penalties, logit_bias, min_tokens,
    token mask.

    Args:
        x: ``[vocab]`` float32 logits, modified in place.
        p: the row's parameters.
        prompt_ids: the row's prompt tokens.
        output_ids: the tokens generated so far.
        eos_token_ids: the model's end-of-sequence ids.
        token_mask: ``[ceil(vocab / 32)]`` int32 words of allowed tokens (constrained rows), or ``None``.

    Returns:
        ``x``. Raises ``ValueError`` for a ``logit_bias`` id outside the vocabulary.
    """
    vocab, dev = x.numel(), x.device
    if p.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        # CTRL: logit / p if logit > 0 else logit * p, for every token seen in prompt or output
        # gather-then-scatter at the ids (as HF): repeated ids write the same value
        t, rp = _ids([*prompt_ids, *output_ids], vocab, dev), p.repetition_penalty
        v = x[t]
        x[t] = torch.where(v > 0, v / rp, v * rp)
    if output_ids and (p.presence_penalty or p.frequency_penalty):
        # OpenAI: logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
        t = _ids(output_ids, vocab, dev)
        c = torch.zeros(vocab, dtype=x.dtype, device=dev).index_add_(0, t, torch.ones_like(t, dtype=x.dtype))[t]
        x[t] = x[t] - (c * p.frequency_penalty + p.presence_penalty)  # c >= 1 at every t
    if p.logit_bias:
        keys = [int(k) for k in p.logit_bias]
        bad = [k for k in keys if not 0 <= k < vocab]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")
        vals = torch.tensor([float(v) for v in p.logit_bias.values()], dtype=x.dtype)
        x.index_add_(0, torch.tensor(keys, dtype=torch.long, device=dev), vals.to(dev))
    if len(output_ids) < p.min_tokens:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        if banned:
            x[_ids(sorted(banned), vocab, dev)] = float("-inf")
    if token_mask is not None:
        apply_token_mask(x, token_mask)
    return x


def _sample(row: torch.Tensor, p: SamplingParams, g: torch.Generator | None) -> torch.Tensor:
    """Draw one token from ``[vocab]`` logits whose max is finite; returns a ``[1]`` tensor.

    The row is shifted so its max is 0 before temperature: then no temperature overflows to
    ``+inf`` and the softmax is always a valid distribution (no device-side assert on CUDA).
    """
    x = row.float()
    x = filter_logits(x - x.max(), p.temperature, p.top_k, p.top_p)
    return torch.multinomial(torch.softmax(x, dim=-1), 1, generator=g)


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    eos_token_ids: Collection[int] = frozenset(),
    token_masks: torch.Tensor | None = None,
) -> list[TokenChoice | GenerationError]:
    """Pick the next token of every row (see the module docstring for the order of steps).

    A row gets a :class:`GenerationError` in its place when its raw logits contain NaN or
    ``+inf`` or have no finite entry, when its logits after steps 2-5 have no finite maximum,
    when ``logprobs`` is outside [0, 20], or when processing or sampling raises. The other
    rows are unaffected. Rows that use no penalty, bias, min_tokens or logprobs cost one
    batched max (finiteness check and greedy argmax at once) and, when sampled, one draw.

    Args:
        logits: ``[rows, vocab]`` last-position logits; not modified.
        params: one :class:`SamplingParams` per row.
        generators: one generator per row (``None``: the global RNG).
        prompt_ids: per row, the prompt's token ids (for the repetition penalty).
        output_ids: per row, the tokens generated so far (penalties, min_tokens).
        eos_token_ids: the model's end-of-sequence ids (banned while below ``min_tokens``).
        token_masks: ``[rows, ceil(vocab / 32)]`` int32 token masks; row ``i``'s applies when
            ``params[i].grammar`` is set (other rows' words are ignored). A constrained row whose mask allows
            nothing gets a :class:`GenerationError`.

    Returns:
        one :class:`TokenChoice` or :class:`GenerationError` per row.
    """
    rows, vocab = logits.shape
    if not len(params) == len(generators) == len(prompt_ids) == len(output_ids) == rows:
        raise ValueError("logits, params, generators, prompt_ids and output_ids must have one entry per row")
    out: list[TokenChoice | GenerationError | None] = [None] * rows

    # steps 2-5 on a float32 copy of only the rows that use them
    need = [i for i in range(rows) if needs_processing(params[i], len(output_ids[i]))]
    pos = {i: j for j, i in enumerate(need)}
    reductions = [logits.max(dim=-1)]  # NaN and +inf propagate through max: one check for all
    if need:
        sub = logits[torch.tensor(need, device=logits.device)].to(torch.float32)
        for j, i in enumerate(need):
            try:
                mask = None
                if params[i].grammar is not None:
                    if token_masks is None:
                        raise ValueError("a constrained row has no token mask")
                    mask = token_masks[i]
                process_logits(sub[j], params[i], prompt_ids[i], output_ids[i], eos_token_ids, mask)
            except Exception as e:  # one row's fault must not fail the batch
                out[i] = GenerationError(f"logits processing failed: {e}")
        reductions.append(sub.max(dim=-1))
    flags = torch.cat([torch.stack([torch.isfinite(m).long(), a]) for m, a in reductions], dim=1).tolist()
    raw_ok, argmax = flags[0][:rows], flags[1][:rows]
    for j, i in enumerate(need):  # processed rows: their own finiteness and argmax
        if raw_ok[i] and not flags[0][rows + j] and out[i] is None:
            out[i] = GenerationError(
                "no token allowed: non-finite logits after penalties, logit_bias, min_tokens and the grammar's mask")
        argmax[i] = flags[1][rows + j]
    for i in range(rows):
        k = params[i].logprobs
        if not raw_ok[i]:
            out[i] = GenerationError("non-finite logits (NaN, +inf, or no finite entry)")
        elif k is not None and not 0 <= k <= MAX_LOGPROBS and out[i] is None:
            out[i] = GenerationError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {k}")

    # greedy rows take the argmax; sampled rows draw with their own generator (one sync at the end)
    tokens: dict[int, int] = {}
    drawn: dict[int, torch.Tensor] = {}
    for i, p in enumerate(params):
        if out[i] is not None:
            continue
        if p.greedy:
            tokens[i] = int(argmax[i])
            continue
        try:
            drawn[i] = _sample(sub[pos[i]] if i in pos else logits[i], p, generators[i])
        except Exception as e:  # idem
            out[i] = GenerationError(f"sampling failed: {e}")
    if drawn:
        tokens.update(zip(drawn, torch.cat(list(drawn.values())).tolist()))

    # raw logprobs, batched over the rows that asked
    lp_rows = [i for i in tokens if params[i].logprobs is not None]
    top: dict[int, list[tuple[int, float]]] = {}
    chosen: dict[int, float] = {}
    if lp_rows:
        lps = torch.log_softmax(logits[torch.tensor(lp_rows, device=logits.device)].float(), dim=-1)
        ids = torch.tensor([tokens[i] for i in lp_rows], device=logits.device)
        chosen = dict(zip(lp_rows, lps.gather(1, ids[:, None])[:, 0].tolist()))
        kmax = min(max(params[i].logprobs or 0 for i in lp_rows), vocab)
        if kmax:
            vals, idx = torch.topk(lps, kmax, dim=-1)
            for i, v, t in zip(lp_rows, vals.tolist(), idx.tolist()):
                top[i] = list(zip(t, v))[: params[i].logprobs]
    for i, tok in tokens.items():
        out[i] = TokenChoice(tok, chosen.get(i), top.get(i, []))
    return out  # type: ignore[return-value]  # every row is filled
