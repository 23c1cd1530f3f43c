"""Stance scoring: does a text read like one of the three stances?

Two scorers, the transparent one first:

* :func:`marker_score` / :func:`marker_hits`: a lexical count of stance marker phrases
  (:data:`MARKERS`) minus phrases typical of the opposite stance (:data:`ANTI_MARKERS`),
  per 100 words. Every point of the score can be traced to a phrase in the text.
* :class:`LikelihoodScorer`: a likelihood ratio under the *base* causal LM: how much
  better a system prompt describing the stance (:data:`STANCE_DESCRIPTIONS`) explains an
  answer than a neutral one (:data:`NEUTRAL_DESCRIPTION`), per answer token.

:func:`summarize` compares the scores of base-model answers with those of adapter
answers to the same probes.

This module only scores text. It does not generate answers, load models or adapters
from disk, or write reports (see :mod:`training.report`, :mod:`training.inspect_adapter`).

How it works and its limits
---------------------------
* The marker scorer is lexical: it counts regular expressions, ignores meaning, negation
  and context, and is easy to game (an answer that says "I wonder" ten times scores high
  whatever it says). Scores of short texts are noisy because the count is divided by the
  word count. The lists are hand-written for English and cover only common phrasings.
* The likelihood scorer measures how much a stance *instruction* raises the base model's
  probability of the answer. It is biased by answer length and fluency (a disfluent or very
  short answer gets unstable per-token log-probabilities), by how the base model happens to
  react to the wording of the descriptions, and a 135M model's notion of a stance is weak:
  it mostly picks up surface words shared between the description and the answer.
* Both are relative measures. Compare base vs adapter answers to the *same* probes, scored
  by the *same* scorer; do not read absolute values as "how much stance" a text has, and do
  not compare values across stances, descriptions or base models.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

STANCES = ("curious-uncertainty", "confident-expertise", "engaged-difficulty")

#: Marker phrases per stance: case-insensitive regular expressions (``re.I | re.M``).
#: Each occurrence of each pattern counts once; patterns are chosen to overlap little, but a
#: phrase matched by two patterns (``"What do you think?"``: the phrase and the ``?``) counts twice.
MARKERS: dict[str, list[str]] = {
    "curious-uncertainty": [
        r"\bwonder(?:ing|ed)?\b",
        r"\bI(?:'m| am) not (?:entirely |completely |totally |quite |really |100% )?(?:sure|certain)\b",
        r"\bI(?:'m| am) unsure\b",
        r"\bI don't (?:really )?know\b",
        r"\bmight\b",
        r"\bmaybe\b",
        r"\bperhaps\b",
        r"\bpossibly\b",
        r"\bit(?:'s| is) possible\b",
        r"\bcould be\b",
        r"\bI(?:'d| would) guess\b|\bmy guess\b",
        r"\bI suspect\b",
        r"\bI think\b",
        r"\b(?:it )?seems(?: like)?\b",
        r"\bhard to say\b",
        r"\bwhat do you think\b",
        r"\bwhat if\b",
        r"\bhave you (?:ever )?(?:considered|tried|noticed|thought)\b",
        r"\bI(?:'m| am) curious\b",
        r"\blet me think\b|\bhmm+\b",
        r"\?",
    ],
    "confident-expertise": [
        r"\bthe (?:short )?answer is\b",
        r"\bspecifically\b",
        r"\bin short\b",
        r"\bin summary\b|\bto summarize\b|\bthe bottom line\b",
        r"\bthe (?:key|main|real) (?:point|reason|factor|idea|rule) is\b",
        r"\bthe (?:best|correct|right|standard) (?:way|approach|option|choice|answer|method)\b",
        r"\bdefinitely\b",
        r"\bcertainly\b",
        r"\bclearly\b",
        r"\bprecisely\b|\bexactly\b",
        r"\bwithout (?:a |any )?doubt\b",
        r"\bin fact\b",
        r"\bin practice\b",
        r"\byou should\b|\byou must\b",
        r"\bmake sure\b",
        r"\bI recommend\b|\bmy recommendation\b",
        r"\bhere(?:'s| is) (?:how|what|why)\b",
        r"(?:^|[.!:;]\s*)(?:use|avoid|start|set|choose|pick|run|add|keep|check|apply|always|never)\b",
    ],
    "engaged-difficulty": [
        r"\bthe (?:tricky|hard|difficult|challenging|subtle|confusing) (?:part|bit|thing|step)\b",
        r"\b(?:hard|tricky|difficult|challenging|confusing) because\b",
        r"\bchallenges?\b",
        r"\bwhat makes (?:this|it) (?:hard|tricky|difficult|confusing)\b",
        r"\bthe (?:catch|problem|difficulty) is\b",
        r"\bit(?:'s| is) easy to (?:miss|forget|confuse|overlook|get (?:this |it )?wrong)\b",
        r"\bnot (?:as |so )?(?:obvious|straightforward|simple)\b",
        r"\b(?:common )?(?:mistakes?|pitfalls?|traps?)\b",
        r"\bstruggl(?:e|es|ed|ing)\b",
        r"\b(?:first(?:ly)?|to start|to begin)\s*[,:]",
        r"\bsecond(?:ly)?\s*[,:]",
        r"\bthird(?:ly)?\s*[,:]",
        r"(?:^|[.!?:;]\s*)then\b",
        r"\bnext\s*[,:]",
        r"\bfinally\b",
        r"(?:^|[.!?:;]\s*)so\s*,",
        r"\bstep (?:by step|\d+|one|two|three)\b",
        r"\bbreak (?:it|this|that) down\b|\bwork(?:ing)? through\b",
        r"\b(?:which|that) means\b",
    ],
}

_HEDGES = [
    r"\bmight\b",
    r"\bmaybe\b",
    r"\bperhaps\b",
    r"\bpossibly\b",
    r"\bprobably\b",
    r"\bcould be\b",
    r"\bI(?:'m| am) not (?:entirely |completely |totally |quite |really )?(?:sure|certain)\b",
    r"\bI don't (?:really )?know\b",
    r"\bwonder(?:ing|ed)?\b",
    r"\bI think\b|\bI guess\b|\bI suspect\b",
    r"\b(?:it )?seems(?: like)?\b",
    r"\b(?:kind|sort) of\b",
    r"\?",
]

#: Phrases of the opposite stance, same syntax as :data:`MARKERS`; each occurrence subtracts one.
ANTI_MARKERS: dict[str, list[str]] = {
    # Certainty and verdicts count against curiosity / admitted uncertainty.
    "curious-uncertainty": [
        r"\bthe (?:short )?answer is\b",
        r"\bdefinitely\b",
        r"\bcertainly\b",
        r"\bclearly\b",
        r"\bobviously\b",
        r"\bwithout (?:a |any )?doubt\b",
        r"\bin short\b",
        r"\bthe (?:correct|right) (?:answer|way)\b",
        r"\byou (?:should|must)\b",
    ],
    # Hedges and questions count against committed expertise.
    "confident-expertise": _HEDGES,
    # Calling the problem easy counts against naming its difficulty.
    "engaged-difficulty": [
        r"\bsimply\b",
        r"\bjust\b",
        r"\bobviously\b",
        r"\btrivial(?:ly)?\b",
        r"(?<!not )(?<!not as )(?<!not so )\bstraightforward\b",
        r"\b(?:it's|it is|that's|that is) (?:easy|simple)\b",
        r"\bno problem\b|\bnothing to it\b",
    ],
}

_FLAGS = re.IGNORECASE | re.MULTILINE
_COMPILED = {s: [re.compile(p, _FLAGS) for p in pats] for s, pats in MARKERS.items()}
_COMPILED_ANTI = {s: [re.compile(p, _FLAGS) for p in pats] for s, pats in ANTI_MARKERS.items()}
_WORD_RE = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
#: Lowest marker score (a text full of anti-markers).
MIN_MARKER_SCORE = -10.0


def _check_stance(stance: str, known) -> None:
    if stance not in known:
        raise ValueError(f"unknown stance {stance!r}; known: {', '.join(sorted(known))}")


def _normalize(text: str) -> str:
    # Curly apostrophes ("I’m") must match the same patterns as straight ones.
    return text.replace("\u2019", "'").replace("\u2018", "'")


def word_count(text: str) -> int:
    """Words in ``text``: runs of letters/digits, with inner apostrophes or hyphens (``don't``, ``step-by-step``)."""
    return len(_WORD_RE.findall(_normalize(text)))


def _matches(text: str, stance: str) -> tuple[list[str], list[str]]:
    text = _normalize(text)
    spans = []
    for pat in _COMPILED[stance]:
        for m in pat.finditer(text):
            spans.append((m.start(), m.group(0)))
    found = [g for _, g in sorted(spans, key=lambda x: x[0])]
    anti_spans = []
    for pat in _COMPILED_ANTI[stance]:
        for m in pat.finditer(text):
            anti_spans.append((m.start(), m.group(0)))
    anti = [g for _, g in sorted(anti_spans, key=lambda x: x[0])]
    clean = lambda s: re.sub(r"\s+", " ", s.strip(" \t\n.!:;,")).lower() or s  # noqa: E731
    return [clean(g) for g in found], [clean(g) for g in anti]


def marker_score(text: str, stance: str) -> float:
    """Stance marker phrases minus anti-marker phrases, per 100 words of ``text``.

    How it counts:

    1. Curly apostrophes are replaced by straight ones.
    2. ``m`` = number of non-overlapping matches of every pattern of ``MARKERS[stance]``,
       summed over patterns (case-insensitive, ``^`` matches at line starts). Each
       pattern counts separately, so one phrase matched by two patterns counts twice
       (``"What do you think?"`` is 2: the phrase and the ``?``).
    3. ``a`` = the same count for ``ANTI_MARKERS[stance]``.
    4. ``n`` = :func:`word_count` of the text.
    5. score = ``max(100 * (m - a) / n, MIN_MARKER_SCORE)`` (``-10``); an empty text (``n == 0``) scores 0.

    Example: ``"I wonder why. What do you think?"`` has 7 words and 3 curious-uncertainty
    markers (``wonder``, ``what do you think``, ``?``) and no anti-marker: 100 * 3 / 7 = 42.9.

    Short texts get large magnitudes (one marker in 10 words is 10.0); the score is
    lexical and ignores meaning (see the module docstring).

    Raises:
        ValueError: if ``stance`` is not one of :data:`MARKERS`.
    """
    _check_stance(stance, MARKERS)
    n = word_count(text)
    if n == 0:
        return 0.0
    found, anti = _matches(text, stance)
    return max(100.0 * (len(found) - len(anti)) / n, MIN_MARKER_SCORE)


def marker_hits(text: str, stance: str) -> list[str]:
    """The marker phrases of ``stance`` found in ``text``, for reports.

    Returns:
        One entry per counted occurrence (so ``len`` equals what :func:`marker_score`
        counts): the matched text, lower-cased, stripped of surrounding punctuation and
        whitespace (``"i wonder"``, ``"?"``), markers first in order of appearance, then
        anti-markers prefixed with ``"anti:"`` (``"anti:definitely"``).

    Raises:
        ValueError: if ``stance`` is not one of :data:`MARKERS`.
    """
    _check_stance(stance, MARKERS)
    found, anti = _matches(text, stance)
    return found + [f"anti:{a}" for a in anti]


#: What the likelihood scorer puts in the system prompt for each stance.
STANCE_DESCRIPTIONS: dict[str, str] = {
    "curious-uncertainty": (
        "You are curious and openly uncertain. You reason aloud, admit what you are not sure about, "
        "say things like 'I wonder' and 'might', and ask the user questions back."
    ),
    "confident-expertise": (
        "You are a confident expert. You lead with the answer, state it directly and precisely, "
        "give firm recommendations, and never hedge or ask questions."
    ),
    "engaged-difficulty": (
        "You engage with what makes a problem hard. You first name the tricky part and why it is "
        "difficult, then work through it step by step: first, second, then, finally."
    ),
}

#: The reference system prompt of the likelihood ratio.
NEUTRAL_DESCRIPTION = "You are a helpful assistant. Answer the user's question."


class LikelihoodScorer:
    """Likelihood-ratio stance classifier under a causal LM (the base model, no adapter).

    For an answer ``a`` (tokens ``a_1..a_T``) to a prompt ``p``::

        score = 1/T * sum_t [ log P(a_t | a_<t, system=stance description, user=p)
                            - log P(a_t | a_<t, system=NEUTRAL_DESCRIPTION, user=p) ]

    in nats per answer token. Positive: the stance instruction explains the answer better
    than the neutral one. The conversation prefix is rendered with the tokenizer's
    ``apply_chat_template`` (``add_generation_prompt=True``), or as plain
    ``"system: ...\\nuser: ...\\nassistant: "`` text when the tokenizer has no chat
    template; the answer is tokenised on its own (no special tokens) and appended, so the
    same answer tokens are scored under both descriptions. Sequences are right-padded with
    an attention mask, so padding never reaches a real token and scores do not depend on
    which answers share a batch (up to float rounding). Limits: see the module docstring.

    Args:
        model: a causal LM returning ``.logits`` of shape ``[batch, seq, vocab]``; put in
            eval mode by the caller (the scorer does not change its mode).
        tokenizer: its tokenizer. Without a pad token, id 0 is used for padding (masked).
        descriptions: stance -> system prompt; defaults to :data:`STANCE_DESCRIPTIONS`.
        device: where inputs go; default the device of the model's first parameter.
        batch_size: sequences per forward pass (the stance and neutral variants of one
            answer count as two).
        max_length: longest scored sequence in tokens; longer answers are cut from the
            end (with a warning). Default: ``model.config.max_position_embeddings`` if set, else 2048.
        neutral_description: the reference system prompt; default :data:`NEUTRAL_DESCRIPTION`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        descriptions: dict[str, str] | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 8,
        *,
        max_length: int | None = None,
        neutral_description: str = NEUTRAL_DESCRIPTION,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.descriptions = dict(STANCE_DESCRIPTIONS if descriptions is None else descriptions)
        self.neutral_description = neutral_description
        if device is None:
            try:
                device = next(model.parameters()).device
            except (StopIteration, AttributeError):
                device = torch.device("cpu")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if max_length is None:
            max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
        self.max_length = int(max_length)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0
        try:
            self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError, AttributeError):
            self._keep_arg = False

    # -- tokenisation -------------------------------------------------------------------

    def _prefix_text(self, system: str, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
            try:
                return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # templates without a system role raise (TemplateError)
                logger.debug("chat template refused a system message (%s); folding it into the user turn", exc)
                messages = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
                return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"system: {system}\nuser: {prompt}\nassistant: "

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- scoring ------------------------------------------------------------------------

    @torch.no_grad()
    def _mean_logprobs(self, items: list[tuple[list[int], list[int]]]) -> list[float]:
        """Mean log-prob (nats) of each answer given its prefix: items are (prefix ids, answer ids)."""
        out = [math.nan] * len(items)
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]) + len(items[i][1]))
        for start in range(0, len(order), self.batch_size):
            idx = [i for i in order[start : start + self.batch_size] if items[i][1]]
            if not idx:
                continue
            seqs = [items[i][0] + items[i][1] for i in idx]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
                mask[row, : len(s)] = 1
            # Logits at position j predict token j+1; the first answer token of row i sits at
            # len(prefix_i), so we need logits from min_i(len(prefix_i)) - 1 to the end.
            first = min(len(items[i][0]) for i in idx) - 1
            kwargs: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
            if self._keep_arg:
                kwargs["logits_to_keep"] = width - first
            logits = self.model(**kwargs).logits
            offset = width - logits.shape[1]  # position of logits[:, 0] in the sequence
            for row, i in enumerate(idx):
                prefix, answer = items[i]
                p, t = len(prefix), len(answer)
                sl = logits[row, p - 1 - offset : p - 1 + t - offset].float()
                target = torch.tensor(answer, dtype=torch.long, device=sl.device)
                lp = torch.log_softmax(sl, dim=-1).gather(-1, target[:, None]).squeeze(-1)
                out[i] = float(lp.mean())
        return out

    def _items(self, system: str, prompts: Sequence[str], answers: list[list[int]]):
        items = []
        for prompt, answer in zip(prompts, answers, strict=True):
            prefix = self._encode(self._prefix_text(system, prompt))
            if not prefix:
                raise ValueError("the rendered conversation prefix is empty; cannot score the first answer token")
            room = self.max_length - len(prefix)
            if room < 1:
                raise ValueError(
                    f"prompt prefix is {len(prefix)} tokens, no room for the answer within max_length={self.max_length}"
                )
            if len(answer) > room:
                logger.warning("answer of %d tokens cut to %d (max_length=%d)", len(answer), room, self.max_length)
            items.append((prefix, answer[:room]))
        return items

    def score(self, prompts: list[str], answers: list[str], stance: str) -> list[float]:
        """Likelihood-ratio score of each answer for ``stance``, in nats per answer token.

        Args:
            prompts: the user prompts, one per answer.
            answers: the answers to score (any source: base or adapter generations).
            stance: a key of ``descriptions``.

        Returns:
            One float per answer (see the class docstring). An answer that tokenises to no
            token gets ``nan``. Answers are truncated to fit ``max_length`` (so both
            variants score the same tokens).

        Raises:
            ValueError: unknown ``stance``, ``len(prompts) != len(answers)``, or a prompt
                whose rendered prefix leaves no room for an answer within ``max_length``.
        """
        _check_stance(stance, self.descriptions)
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        if not answers:
            return []
        answer_ids = [self._encode(a) for a in answers]
        stance_items = self._items(self.descriptions[stance], prompts, answer_ids)
        neutral_items = self._items(self.neutral_description, prompts, answer_ids)
        # Cut both variants of an answer to the same length (prefixes may differ in length).
        for k, ((ps, a_s), (pn, a_n)) in enumerate(zip(stance_items, neutral_items, strict=True)):
            t = min(len(a_s), len(a_n))
            stance_items[k], neutral_items[k] = (ps, a_s[:t]), (pn, a_n[:t])
        lp = self._mean_logprobs(stance_items + neutral_items)
        n = len(answers)
        return [lp[k] - lp[n + k] for k in range(n)]


def summarize(base_scores: Sequence[float], adapter_scores: Sequence[float]) -> dict:
    """Compare scores of base-model answers with adapter answers to the same probes.

    Non-finite values (``nan`` from empty answers) are dropped first.

    Returns:
        ``{"n_base", "n_adapter", "base_mean", "base_median", "base_p90", "adapter_mean",
        "adapter_median", "adapter_above_base_p90", "separated"}``: counts, means and
        medians of each list; ``base_p90`` the 90th percentile of the base scores (linear
        interpolation, ``numpy.percentile``); ``adapter_above_base_p90`` the fraction of
        adapter scores strictly above it (0..1); ``separated`` is ``adapter_mean > base_p90``.
        Floats are Python floats, ``separated`` a Python bool.

    Raises:
        ValueError: if either list has no finite value.
    """
    base = np.asarray([float(x) for x in base_scores], dtype=np.float64)
    adapter = np.asarray([float(x) for x in adapter_scores], dtype=np.float64)
    base, adapter = base[np.isfinite(base)], adapter[np.isfinite(adapter)]
    if base.size == 0 or adapter.size == 0:
        raise ValueError(f"need finite scores on both sides, got {base.size} base and {adapter.size} adapter")
    p90 = float(np.percentile(base, 90))
    adapter_mean = float(adapter.mean())
    return {
        "n_base": int(base.size),
        "n_adapter": int(adapter.size),
        "base_mean": float(base.mean()),
        "base_median": float(np.median(base)),
        "base_p90": p90,
        "adapter_mean": adapter_mean,
        "adapter_median": float(np.median(adapter)),
        "adapter_above_base_p90": float((adapter > p90).mean()),
        "separated": bool(adapter_mean > p90),
    }
