"""Incremental detokenisation with stop strings, for streaming.

Token-by-token decoding is wrong for multi-byte characters and for tokenizers
that merge spaces, so :class:`IncrementalDetokenizer` decodes the whole
completion each step and emits only the new suffix. It holds back text that
could still grow into a stop string, or that ends in an incomplete UTF-8
sequence (``\\ufffd``), so a stream never shows text that is later cut. This
module knows nothing about models or batching.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, cutting at the first stop string.

    Args:
        tokenizer: a Hugging Face tokenizer (``decode(ids, skip_special_tokens=True)``).
        stop: stop strings; the completion ends before the first occurrence of any.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # full decoded text (up to the stop string, once stopped)
        self.emitted = 0  # characters of ``text`` already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one token; return the newly safe text (maybe empty).

        After a stop string is found, :attr:`stopped` is true and the text is final.
        """
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            cut = min((i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(len(self.text))
        safe = len(self.text.rstrip("\ufffd"))
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
