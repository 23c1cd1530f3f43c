"""Parsing JSON that comes from outside the server, with limits checked before parsing.

Python's :func:`json.loads` recurses once per nesting level, so a document such as
``[[[[...]]]]`` 5000 levels deep raises :class:`RecursionError` (an HTTP 500) instead of a
validation error. :func:`loads_limited` first measures the nesting depth with a linear
scan (:func:`json_depth`, which skips string contents and honours backslash escapes) and
refuses a document deeper than ``max_depth`` (or larger than ``max_bytes``, or not UTF-8,
or not JSON) with :class:`~app.errors.AdapterValidationError` naming the file or form
field at fault. :func:`parse_metadata` applies it to the upload form's ``metadata`` field.

The registry reads every external JSON document through here: ``adapter_config.json``
(:mod:`app.registry.peft_reader`), ``stance.json`` and ``training_metrics.json``
(:mod:`app.registry.store`) and the upload's ``metadata`` string.

This module does not check what a document means (a config's fields are
:func:`app.registry.validation.config_problems`), does not read files, and does not
limit the size of numbers or strings beyond ``max_bytes``; integers longer than Python's
digit limit (``sys.get_int_max_str_digits``) are refused as invalid JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.errors import AdapterValidationError

#: Deepest nesting of arrays / objects accepted by default (a peft config nests 3 levels).
MAX_JSON_DEPTH = 32
#: Largest upload ``metadata`` field, in UTF-8 bytes, accepted by :func:`parse_metadata` by default.
MAX_METADATA_BYTES = 256 * 1024

# One JSON string (possibly unterminated: then it runs to the end of the text, which is
# invalid JSON anyway), or one bracket. Unrolled so each string is matched without backtracking.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
_OPEN = frozenset("[{")


def json_depth(text: str, *, stop_above: int | None = None) -> int:
    """The deepest nesting of ``[`` / ``{`` in the JSON ``text``, counted outside strings.

    A scalar document has depth 0, ``{}`` and ``[1]`` depth 1, ``{"a": [1]}`` depth 2.
    Brackets inside strings, escaped quotes included (``"a\\"[["``), do not count. The text
    is not otherwise checked: for invalid JSON the result is only an estimate.

    Args:
        text: the document.
        stop_above: if given, return as soon as the depth exceeds it (the result is then
            ``stop_above + 1``), so a hostile document costs no more than needed.

    Time is linear in ``len(text)``; nothing is allocated per nesting level.
    """
    depth = deepest = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    return deepest
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def _utf8_size_over(text: str, limit: int) -> bool:
    """Whether ``text`` is more than ``limit`` bytes in UTF-8 (without encoding it when the length decides)."""
    if len(text) > limit:
        return True
    if 4 * len(text) <= limit:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


def loads_limited(text: str | bytes, *, max_depth: int, param: str, max_bytes: int | None = None) -> Any:
    """Parse the JSON document ``text`` after checking its size and nesting depth.

    Args:
        text: the document, as ``str`` or UTF-8 ``bytes``.
        max_depth: deepest nesting of arrays / objects accepted (see :func:`json_depth`).
        param: the file or form field the document comes from; names it in errors.
        max_bytes: if given, the largest accepted size in bytes (UTF-8 for a ``str``).

    Returns:
        The parsed value (any JSON type; the caller checks it is an object if it must be).

    Raises:
        AdapterValidationError: (``param=param``, message starting ``"<param>: "``) if the
            document is larger than ``max_bytes``, is not valid UTF-8, is nested deeper
            than ``max_depth``, or is not valid JSON. Never RecursionError.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if max_bytes is not None and len(raw) > max_bytes:
            raise AdapterValidationError(f"{param}: larger than {max_bytes} bytes", param=param)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AdapterValidationError(f"{param}: not valid UTF-8 ({exc})", param=param) from None
    elif max_bytes is not None and _utf8_size_over(text, max_bytes):
        raise AdapterValidationError(f"{param}: larger than {max_bytes} bytes", param=param)
    if json_depth(text, stop_above=max_depth) > max_depth:
        raise AdapterValidationError(
            f"{param}: JSON nested deeper than {max_depth} levels of arrays/objects", param=param
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits; depth was checked
        raise AdapterValidationError(f"{param}: not valid JSON ({exc})", param=param) from None


def parse_metadata(
    raw: str | None, *, max_depth: int, max_bytes: int | None = MAX_METADATA_BYTES
) -> dict[str, Any] | None:
    """The upload form's ``metadata`` field as a dict, or None when it is absent or empty.

    Args:
        raw: the field's text (None or ``""`` when not sent).
        max_depth: deepest nesting accepted (``AdapterStore.max_json_depth``).
        max_bytes: largest accepted size in UTF-8 bytes (None: no limit).

    Raises:
        AdapterValidationError: (``param="metadata"``) not a string, too large, too deep,
            not valid JSON, or valid JSON that is not an object (a list, a number...).
    """
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise AdapterValidationError(
            f"metadata: must be a JSON object as text, got {type(raw).__name__}", param="metadata"
        )
    value = loads_limited(raw, max_depth=max_depth, param="metadata", max_bytes=max_bytes)
    if not isinstance(value, dict):
        raise AdapterValidationError(f"metadata: must be a JSON object, got {type(value).__name__}", param="metadata")
    return value
