"""jsonread: nesting depth measured before parsing, so hostile JSON is a 422, never a RecursionError."""

from __future__ import annotations

import json

import pytest

from app.errors import AdapterValidationError
from app.registry.jsonread import MAX_JSON_DEPTH, json_depth, loads_limited, parse_metadata
from tests.factories import nested_json


def refused(fn, *args, fragment: str = "", **kw) -> AdapterValidationError:
    """``fn(*args, **kw)`` raises AdapterValidationError naming ``kw["param"]`` (default ``"metadata"``)."""
    param = kw.get("param", "metadata")
    with pytest.raises(AdapterValidationError) as exc:
        fn(*args, **kw)
    assert exc.value.param == param
    assert exc.value.message.startswith(f"{param}: "), exc.value.message
    assert fragment in exc.value.message, exc.value.message
    return exc.value


@pytest.mark.parametrize(
    "text, depth",
    [
        ("1", 0),
        ('"[[["', 0),
        ("{}", 1),
        ("[1, 2]", 1),
        ('{"a": [1]}', 2),
        ('{"a": {"b": [{}]}, "c": []}', 4),
        (r'"a\"[[["', 0),  # an escaped quote does not end the string
        (r'["a\"[[[", ["x"]]', 2),
        (r'["\\", [1]]', 2),  # an escaped backslash does end it: the next quote closes the string
        ('{"k": "]]]}}}{{{[[["}', 1),
        (nested_json(5000), 5000),
    ],
)
def test_json_depth(text, depth):
    assert json_depth(text) == depth


def test_json_depth_stops_early():
    assert json_depth(nested_json(5000), stop_above=32) == 33
    assert json_depth(nested_json(32), stop_above=32) == 32


def test_default_limit_is_32():
    assert MAX_JSON_DEPTH == 32


def test_depth_limit_is_inclusive():
    assert loads_limited(nested_json(32), max_depth=32, param="x.json") == json.loads(nested_json(32))
    refused(loads_limited, nested_json(33), max_depth=32, param="x.json", fragment="deeper than 32")


@pytest.mark.parametrize("depth", [5000, 100_000])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_very_deep_is_a_validation_error(depth, as_bytes):
    text = nested_json(depth)
    # without the check, json.loads itself fails with RecursionError (an HTTP 500)
    with pytest.raises(RecursionError):
        json.loads(text)
    doc = text.encode() if as_bytes else text
    refused(loads_limited, doc, max_depth=MAX_JSON_DEPTH, param="adapter_config.json", fragment="deeper than")
    refused(loads_limited, '{"a": ' * depth + "1" + "}" * depth, max_depth=32, param="p", fragment="deeper than")


def test_brackets_in_strings_do_not_count():
    inner = json.dumps('a"[[[[\\' + "[" * 100)
    assert loads_limited(nested_json(32, inner), max_depth=32, param="p") == json.loads(nested_json(32, inner))
    assert loads_limited(r'{"k": "a\"[[["}', max_depth=1, param="p") == {"k": 'a"[[['}


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('{"a": 1', "not valid JSON"),
        ('"unterminated [[[[', "not valid JSON"),
        ("1" * 5000, "not valid JSON"),  # longer than Python's int digit limit: ValueError, not JSONDecodeError
        ("{} {}", "not valid JSON"),
    ],
)
def test_invalid_documents(raw, fragment):
    refused(loads_limited, raw, max_depth=32, param="f.json", fragment=fragment)


def test_max_bytes():
    doc = json.dumps({"a": "x" * 100})
    assert loads_limited(doc, max_depth=2, param="p", max_bytes=len(doc)) == {"a": "x" * 100}
    refused(loads_limited, doc, max_depth=2, param="p", max_bytes=len(doc) - 1, fragment="larger than")
    refused(loads_limited, doc.encode(), max_depth=2, param="p", max_bytes=len(doc) - 1, fragment="larger than")
    wide = json.dumps("é" * 60)  # 62 characters, 122 bytes
    refused(loads_limited, wide, max_depth=2, param="p", max_bytes=100, fragment="larger than")


# --------------------------------------------------------------------------- parse_metadata


@pytest.mark.parametrize("raw", [None, ""])
def test_metadata_absent(raw):
    assert parse_metadata(raw, max_depth=32) is None


def test_metadata_object():
    assert parse_metadata('{"lr": 1e-4, "tags": ["a", {"b": "[[["}]}', max_depth=32) == {
        "lr": 1e-4,
        "tags": ["a", {"b": "[[["}],
    }


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (nested_json(5000), "deeper than 32"),
        ('{"a": ' + nested_json(32) + "}", "deeper than 32"),
        ("[1, 2]", "JSON object"),
        ("[]", "JSON object"),
        ("5", "JSON object"),
        ('"text"', "JSON object"),
        ("null", "JSON object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_metadata_refused(raw, fragment):
    refused(parse_metadata, raw, max_depth=32, fragment=fragment)


def test_metadata_limits_are_parameters():
    assert parse_metadata('{"a": [[1]]}', max_depth=3) == {"a": [[1]]}
    refused(parse_metadata, '{"a": [[1]]}', max_depth=2, fragment="deeper than 2")
    refused(parse_metadata, json.dumps({"a": "x" * 2000}), max_depth=2, max_bytes=1000, fragment="larger than")
    refused(parse_metadata, b'{"a": 1}', max_depth=2, fragment="JSON object")
