"""Constrained decoding: per-row grammar state and token masks, on llguidance.

A constrained request carries a :class:`Grammar` (a compiled, validated llguidance grammar, shared by every
request with the same grammar text). At admission each row gets its own :class:`RowMatcher` (a copy of the
grammar's start state). Before a row's next token is sampled, its matcher writes the row's **token mask**
(one bit per vocabulary entry, ``[ceil(vocab / 32)]`` int32 words, bit set = allowed) into a batch bitmask;
the sampler sets the logits of every other token to ``-inf``; the chosen token then advances the matcher.

llguidance (Moskal et al., "llguidance", github.com/guidance-ai/llguidance) compiles JSON schemas, regular
expressions and Lark grammars into an Earley parser over a lazily built lexer, so a grammar is ready in
milliseconds and each mask costs tens of microseconds; mask computation releases the GIL, which lets the
scheduler compute a step's masks on a helper thread while the forward pass runs (:class:`MaskJob`).

This module does not know about HTTP, OpenAI's request fields or tool calls (``app/api/structured.py`` turns
those into grammar text), nor about sampling (``app/engine/sampling.py`` applies the masks).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.hf
import torch

from app.errors import GenerationError, InvalidConstraintError

#: Grammars kept compiled (LRU), keyed by the sha256 of their text.
GRAMMAR_CACHE_SIZE = 256


def mask_words(vocab_size: int) -> int:
    """int32 words of one row's token mask: ``ceil(vocab_size / 32)``."""
    return (vocab_size + 31) // 32


@dataclass
class Grammar:
    """A compiled grammar: what every row constrained by the same text starts from.

    Attributes:
        text: the llguidance grammar (JSON-serialised, as ``LLMatcher.grammar_from_*`` returns it).
        key: sha256 of ``text`` (hex).
        kind: what it came from, for metrics: ``json``, ``regex``, ``choice``, ``grammar`` or ``tools``.
        compile_s: seconds the first compilation took (validation and the start state).
        start: the start state; rows copy it (``LLMatcher.deep_copy``).
    """

    text: str
    key: str
    kind: str
    compile_s: float
    start: Any = field(repr=False)

    def matcher(self) -> RowMatcher:
        """A fresh matcher for one row."""
        return RowMatcher(self.start.deep_copy())


class RowMatcher:
    """One row's grammar state (an ``LLMatcher``): its token mask, then the token it took.

    Raises nothing itself: a grammar error puts it in an error state, which :meth:`consume` turns into a
    :class:`~app.errors.GenerationError` for that row alone.
    """

    def __init__(self, matcher: Any) -> None:
        self._m = matcher
        #: seconds spent computing this row's masks
        self.mask_s = 0.0

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this row's allowed tokens into ``bitmask[row]`` (``[rows, words]`` int32, CPU, contiguous)."""
        t0 = time.perf_counter()
        v = bitmask[row]
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())
        self.mask_s += time.perf_counter() - t0

    def consume(self, token_id: int) -> None:
        """Advance by the sampled token.

        Raises:
            GenerationError: the grammar is in an error state, or refused the token.
        """
        ok = self._m.consume_token(token_id)
        if not ok or self._m.is_error():
            raise GenerationError(f"grammar failed: {self._m.get_error() or f'token {token_id} not allowed'}")

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (the row ends with ``stop``)."""
        return self._m.is_stopped()


class GrammarCompiler:
    """Compiles grammar text for one tokenizer, validates it, and caches the result per text (LRU).

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (llguidance reads its ``tokenizer.json``).
        vocab_size: the width of the model's logits, in tokens (may exceed the tokenizer's vocabulary;
            the extra ids are never allowed).
        eos_token_ids: the model's end-of-sequence ids; the first is what a finished grammar allows.

    Building the llguidance tokenizer takes about a second for a 50k vocabulary; it happens on first use.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tok: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        #: compilations done and cache hits, for the bench and metrics
        self.compiled = 0
        self.hits = 0

    @property
    def tokenizer(self) -> Any:
        """The llguidance tokenizer (built once)."""
        if self._tok is None:
            with self._lock:
                if self._tok is None:
                    eos = self._eos[0] if self._eos else None
                    self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=eos)
        return self._tok

    def compile(self, text: str, kind: str, param: str) -> Grammar:
        """The :class:`Grammar` of ``text``, compiled once and cached.

        Args:
            text: llguidance grammar text (``LLMatcher.grammar_from_json_schema`` and friends).
            kind: what it came from (see :class:`Grammar`).
            param: the request field to name in an error.

        Raises:
            InvalidConstraintError: the grammar is invalid or unsupported (``param`` names the field).
        """
        key = hashlib.sha256(text.encode()).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return hit
        tok = self.tokenizer
        t0 = time.perf_counter()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tok)
        if is_error:
            raise InvalidConstraintError(f"invalid {param}: {'; '.join(messages)}", param=param)
        start = llguidance.LLMatcher(tok, text, log_level=0)
        if start.is_error():
            raise InvalidConstraintError(f"invalid {param}: {start.get_error()}", param=param)
        grammar = Grammar(text, key, kind, time.perf_counter() - t0, start)
        with self._lock:
            self._cache[key] = grammar
            self.compiled += 1
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return grammar


class MaskJob:
    """The token masks of one step's constrained rows, computed on a helper thread.

    :meth:`start` returns at once; the masks are computed while the caller runs the forward pass
    (llguidance releases the GIL), and :meth:`result` waits for them.
    """

    _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")

    def __init__(self, matchers: Sequence[RowMatcher | None], vocab_size: int) -> None:
        self.matchers = list(matchers)
        self.rows = [i for i, m in enumerate(self.matchers) if m is not None]
        #: ``[rows, words]`` int32, allocated only when a row is constrained (free batches pay nothing per step)
        self.bitmask: torch.Tensor | None = (
            torch.zeros((len(self.matchers), mask_words(vocab_size)), dtype=torch.int32) if self.rows else None
        )
        self._future: Future | None = None
        self._errors: dict[int, BaseException] = {}

    def _run(self) -> None:
        for i in self.rows:
            try:
                self.matchers[i].fill_mask(self.bitmask, i)  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - one row's grammar must not fail the step
                self._errors[i] = GenerationError(f"grammar failed: {e}")

    def start(self, overlap: bool = True) -> MaskJob:
        """Begin computing (on the helper thread when ``overlap``, else now)."""
        if self.rows:
            if overlap:
                self._future = self._pool.submit(self._run)
            else:
                self._run()
        return self

    def result(self) -> tuple[torch.Tensor | None, dict[int, BaseException]]:
        """``(bitmask [rows, words] or None when no row is constrained, {row: error})``."""
        if self._future is not None:
            self._future.result()
        return self.bitmask, self._errors


def apply_token_mask(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to ``-inf``, in place.

    Args:
        logits: ``[vocab]`` float logits of one row.
        words: ``[ceil(vocab / 32)]`` int32 mask words; bit ``j`` of word ``w`` allows token ``32 w + j``.

    Returns:
        ``logits``.
    """
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).reshape(-1)[: logits.shape[-1]].bool()
    logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
    return logits
