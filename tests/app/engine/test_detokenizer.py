"""Incremental detokenisation: deltas add up to the full text, stop strings cut it and are never leaked."""

from __future__ import annotations

from app.engine.detokenizer import IncrementalDetokenizer


def feed(tokenizer, text, stop):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for i in ids:
        deltas.append(d.add(i))
        if d.stopped:
            break
    deltas.append(d.flush())
    return d, deltas


def test_deltas_concatenate_to_decoded_text(tokenizer):
    text = "Once upon a time, there was a little girl named Lily."
    d, deltas = feed(tokenizer, text, [])
    assert "".join(deltas) == tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert not d.stopped and len([x for x in deltas if x]) > 3


def test_stop_string_cuts_and_is_not_streamed(tokenizer):
    text = "Once upon a time, there was a little girl named Lily."
    d, deltas = feed(tokenizer, text, ["little girl", "zebra"])
    assert d.stopped
    out = "".join(deltas)
    assert out == "Once upon a time, there was a "
    # no delta ever showed the beginning of the stop string past the cut
    assert all("lit" not in x for x in deltas)


def test_held_back_prefix_is_released_when_it_does_not_match(tokenizer):
    text = "The little dog was happy."
    d, deltas = feed(tokenizer, text, ["little cat"])
    assert not d.stopped
    assert "".join(deltas) == tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
