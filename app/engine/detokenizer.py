"""Incremental detokenisation with stop strings, on the consumer side of a request's event stream.

:class:`TextDecoder` turns a completion's token ids, one at a time, into text deltas. With a fast
(Rust) tokenizer it uses tokenizers' ``DecodeStream`` (tokenizers >= 0.21): O(1) per token, and
it holds back a partial UTF-8 character (byte-fallback or byte-level tokens) until it is complete.
A slow tokenizer falls back to decoding the whole completion each step and emitting the new suffix,
and so does a stream whose bytes stop forming valid UTF-8 (``DecodeStream`` raises on those; a random
or confused model can emit them), which then shows replacement characters as ``decode`` does.
Text that could still grow into a stop string is held back too, so a stream never shows text that
is later cut. Special tokens are skipped, as ``tokenizer.decode(ids, skip_special_tokens=True)``.

It runs where the text is consumed (:class:`~app.engine.engine.RequestStream`, on the event
loop), never on the engine thread. It knows nothing about models or batching.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream


class TextDecoder:
    """Token ids in, text deltas out, cut at the first stop string.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones have ``backend_tokenizer``).
        stop: stop strings; the completion ends before the first occurrence of any.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if self._backend is not None:
            self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []  # the completion so far, for the full-decode fallback
        self.text = ""  # all text so far (up to the stop string, once stopped)
        self.emitted = 0  # characters of ``text`` already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text (maybe empty).

        After a stop string is found, :attr:`stopped` is true and the text is final.

        Raises:
            whatever the tokenizer raises for an id it cannot decode.
        """
        if self.stopped:
            return ""
        self._ids.append(int(token_id))
        if self._stream is not None:
            try:
                chunk = self._stream.step(self._backend, int(token_id))
            except Exception:  # noqa: BLE001 - e.g. byte tokens that never form valid UTF-8
                self._stream = None  # from here on, decode the whole completion (replacement characters)
            else:
                if chunk:
                    self.text += chunk
        if self._stream is None:
            self.text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if self.stop:
            starts = (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop)
            cut = min((i for i in starts if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))  # an incomplete character (slow fallback) waits
        hold = 0
        for s in self.stop:  # hold back a tail that is a prefix of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - k : safe] == s[:k]:
                    hold = max(hold, k)
                    break
        return self._take(safe - hold)

    def flush(self) -> str:
        """At the end of generation: return whatever was held back."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta
