"""Incremental detokenisation: deltas add up to ``tokenizer.decode``, stop strings cut and never leak.

Checked on both tokenizer kinds the project ships: the stories260k SentencePiece tokenizer (512
tokens: emoji and CJK go through byte-fallback tokens) and SmolLM2's byte-level BPE (when the
embedded model is cached), through tokenizers' ``DecodeStream``, and through the slow fallback.
"""

from __future__ import annotations

import pytest

from app.engine.detokenizer import TextDecoder

TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Emoji 🙂🚀 and CJK 你好，世界 and accents: café, naïve, Ångström.",
    "  leading spaces, tabs\tand\nnew lines  ",
]


def feed(tokenizer, text, stop, decoder_cls=TextDecoder):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d = decoder_cls(tokenizer, stop)
    deltas = []
    for i in ids:
        deltas.append(d.add(i))
        if d.stopped:
            break
    deltas.append(d.flush())
    return d, deltas, ids


def smollm2_tokenizer():
    from app.config import Settings
    from app.model_loader import embedded_model_dir, is_complete_model_dir

    path = embedded_model_dir(Settings().cache_dir)
    if not is_complete_model_dir(path):
        pytest.skip("the embedded SmolLM2 is not cached (make model)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(params=["stories260k", "smollm2"])
def any_tokenizer(request, tokenizer):
    return tokenizer if request.param == "stories260k" else smollm2_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decoded_text(any_tokenizer, text):
    d, deltas, ids = feed(any_tokenizer, text, [])
    assert "".join(deltas) == any_tokenizer.decode(ids, skip_special_tokens=True)
    assert not d.stopped and len([x for x in deltas if x]) > 3
    assert all("\ufffd" not in x for x in deltas)  # a partial character is held back, never shown


def test_byte_fallback_tokens_really_occur(tokenizer):
    ids = tokenizer("🙂", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 4  # one byte-fallback token per UTF-8 byte: the case DecodeStream must join


@pytest.mark.parametrize("text", TEXTS)
def test_slow_fallback_gives_the_same_text(tokenizer, text):
    class Slow:  # a tokenizer without the Rust backend
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, *a, **k):
            return self.tok(*a, **k)

        def decode(self, *a, **k):
            return self.tok.decode(*a, **k)

    slow = Slow(tokenizer)
    d, deltas, ids = feed(slow, text, [])
    assert d._stream is None
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_cuts_and_is_not_streamed(any_tokenizer):
    text = "Once upon a time, there was a little girl named Lily."
    d, deltas, _ = feed(any_tokenizer, text, ["little girl", "zebra"])
    assert d.stopped
    out = "".join(deltas)
    assert out == "Once upon a time, there was a "
    # no delta ever showed the beginning of the stop string past the cut
    assert all("lit" not in x for x in deltas)


def test_stop_string_inside_multibyte_text(tokenizer):
    text = "Emoji 🙂🚀 and CJK 你好，世界 and more."
    d, deltas, _ = feed(tokenizer, text, ["你好"])
    assert d.stopped and "".join(deltas) == "Emoji 🙂🚀 and CJK "


def test_held_back_prefix_is_released_when_it_does_not_match(any_tokenizer):
    text = "The little dog was happy."
    d, deltas, ids = feed(any_tokenizer, text, ["little cat"])
    assert not d.stopped
    assert "".join(deltas) == any_tokenizer.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    d = TextDecoder(tokenizer)
    text = "".join(d.add(i) for i in [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]) + d.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_invalid_utf8_bytes_fall_back_to_full_decode(tokenizer):
    """Byte-fallback tokens that never form valid UTF-8 (a random model emits them): DecodeStream refuses
    them; the decoder goes on with full decodes (replacement characters, as ``decode``), never raising."""
    vocab = tokenizer.get_vocab()
    bytes_ = [vocab[f"<0x{b:02X}>"] for b in (0x4B, 0x9E, 0x32)]  # a stray continuation byte (found by fuzzing)
    ids = [*tokenizer("It was", add_special_tokens=False)["input_ids"], *bytes_, vocab["▁little"]]
    d = TextDecoder(tokenizer)
    text = "".join(d.add(i) for i in ids) + d.flush()
    assert d._stream is None  # DecodeStream refused the bytes: the fallback really ran
    assert text.startswith("It was") and text.endswith("\ufffd little")
