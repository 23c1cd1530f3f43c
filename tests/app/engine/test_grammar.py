"""Constrained decoding in the engine: per-row grammars in mixed batches of stances and blends.

* Property (hypothesis): random JSON schemas, each row of a batch under its own schema (or free), on adapters,
  a blend and the base model: every completed output parses and validates against its schema (``jsonschema``).
* Free rows decode the same greedy tokens with and without constrained neighbours.
* A grammar that fails mid-generation ends its row alone, with one error; the neighbours are unaffected.
* Masks: a constrained row's mask allows exactly what llguidance allows; the decode step computes masks on
  the helper thread; grammars are compiled once per text.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading

import jsonschema
import llguidance
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from app.api.structured import JSON_OPTIONS
from app.engine import grammar as grammar_mod
from app.engine.config import EngineConfig
from app.engine.engine import Engine
from app.engine.grammar import apply_token_mask, mask_words
from app.engine.sampling import SamplingParams
from app.errors import GenerationError, InvalidConstraintError
from tests.factories import FakeStore, block_bytes, build_tiny_model, drain, load_tokenizer, write_peft_adapter
from tests.factories.schemas import SCHEMAS, object_schema

EOS = 2  # the stories260k tokenizer's </s>
PROMPT = [1, 45, 80, 99]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = build_tiny_model("llama")
    root = tmp_path_factory.mktemp("grammar")
    store = FakeStore({
        "a1": write_peft_adapter(root / "a1", "llama", model=model, rank=4, seed=1, scale=0.5),
        "a2": write_peft_adapter(root / "a2", "llama", model=model, rank=8, alpha=16, seed=2, scale=0.5),
    })
    eng = Engine(model, load_tokenizer(), "tiny", {EOS}, config=EngineConfig(max_loras=4), store=store)
    eng.start()
    yield eng
    eng.stop()


def stances(eng):
    return [eng.resolve_stance("a1"), eng.resolve_stance("tiny", {"a1": 0.6, "a2": -0.8}), eng.resolve_stance("tiny"),
            eng.resolve_stance("a2")]


def compile_schema(eng, schema):
    return eng.grammars.compile(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS),
                                "json", "schema")


async def run_rows(eng, rows):
    """rows: (prompt, params, stance); each gives (token ids, text, finish or None, errors)."""
    return await asyncio.gather(*(drain(eng, *r) for r in rows))


@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schemas=st.lists(SCHEMAS, min_size=2, max_size=3), seed=st.integers(0, 2**16))
def test_random_schemas_in_mixed_batches_always_validate(engine, schemas, seed):
    grammars = [compile_schema(engine, s) for s in schemas]
    rows = []
    for i, st_ in enumerate(stances(engine)):
        g = grammars[i] if i < len(grammars) else None  # the last rows run free (or constrained, when 4 schemas)
        params = SamplingParams(max_tokens=200, temperature=1.0, seed=seed + i, grammar=g)
        rows.append((PROMPT, params, st_))
    rows.append((PROMPT, SamplingParams(max_tokens=12, temperature=0), stances(engine)[0]))  # a free greedy row
    outs = asyncio.run(run_rows(engine, rows))
    completed = 0
    for (toks, text, fin, errs), schema in zip(outs, schemas):
        assert not errs, errs
        if fin.reason == "stop":
            completed += 1
            jsonschema.validate(json.loads(text), schema)
    assert completed >= 1
    assert outs[-1][2].reason == "length" and not outs[-1][3]


def test_free_rows_do_not_see_constrained_neighbours(engine):
    g = compile_schema(engine, object_schema({"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                        "b": {"type": "string", "maxLength": 3}}))
    free = [(PROMPT, SamplingParams(max_tokens=10, temperature=0), s) for s in stances(engine)]
    alone = asyncio.run(run_rows(engine, free))
    constrained = [([1, 7, 8], SamplingParams(max_tokens=40, temperature=0, grammar=g), s) for s in stances(engine)]
    mixed = asyncio.run(run_rows(engine, constrained[:2] + free + constrained[2:]))
    assert [o[0] for o in mixed[2:6]] == [o[0] for o in alone]
    for toks, text, fin, errs in mixed[:2] + mixed[6:]:
        assert not errs
        if fin.reason == "stop":
            assert set(json.loads(text)) == {"a", "b"}


def test_a_failing_grammar_ends_its_row_alone(engine):
    g = compile_schema(engine, object_schema({"a": {"type": "string", "maxLength": 5}}))
    free = [(PROMPT, SamplingParams(max_tokens=10, temperature=0), s) for s in stances(engine)]
    alone = asyncio.run(run_rows(engine, free))
    bad = SamplingParams(max_tokens=40, temperature=0, grammar=g)
    calls = {"n": 0}

    def hook(stage, req):
        if stage == "grammar" and req.params is bad:
            calls["n"] += 1
            if calls["n"] > 3:
                raise GenerationError("grammar failed: injected")

    engine.scheduler.fault_hook = hook
    try:
        outs = asyncio.run(run_rows(engine, free[:2] + [(PROMPT, bad, stances(engine)[1])] + free[2:]))
    finally:
        engine.scheduler.fault_hook = None
    toks, _, fin, errs = outs.pop(2)
    assert fin is None and len(errs) == 1 and len(toks) == 3
    assert [o[0] for o in outs] == [o[0] for o in alone]


def test_a_mask_allows_what_the_grammar_allows(engine):
    g = engine.grammars.compile(llguidance.LLMatcher.grammar_from_regex("(ab|cd)[0-9]"), "regex", "guided_regex")
    m = g.matcher()
    bitmask = torch.zeros((2, mask_words(engine.vocab_size)), dtype=torch.int32)
    m.fill_mask(bitmask, 1)
    logits = torch.zeros(engine.vocab_size)
    apply_token_mask(logits, bitmask[1])
    allowed = {i for i in range(engine.vocab_size) if logits[i] == 0}
    texts = {engine.tokenizer.decode([i]) for i in allowed}
    assert allowed and all(t and ("ab".startswith(t) or "cd".startswith(t) or t in ("ab", "cd")) for t in texts)
    assert torch.count_nonzero(bitmask[0]) == 0  # other rows' words are left alone
    assert m.mask_s > 0


def test_grammars_compile_once_and_bad_ones_name_the_field(engine):
    text = llguidance.LLMatcher.grammar_from_regex("x+")
    hits = engine.grammars.hits
    assert engine.grammars.compile(text, "regex", "p") is engine.grammars.compile(text, "regex", "p")
    assert engine.grammars.hits == hits + 1
    with pytest.raises(InvalidConstraintError) as e:
        engine.grammars.compile(llguidance.LLMatcher.grammar_from_regex("(x"), "regex", "guided_regex")
    assert e.value.param == "guided_regex"


def test_decode_masks_are_computed_beside_the_forward_pass(engine, monkeypatch):
    threads = set()
    fill = grammar_mod.RowMatcher.fill_mask

    def spy(self, bitmask, row):
        threads.add(threading.current_thread().name)
        return fill(self, bitmask, row)

    monkeypatch.setattr(grammar_mod.RowMatcher, "fill_mask", spy)
    g = compile_schema(engine, object_schema({"a": {"type": "boolean"}}))
    asyncio.run(run_rows(engine, [(PROMPT, SamplingParams(max_tokens=20, temperature=0, grammar=g),
                                   stances(engine)[0])]))
    assert any(t.startswith("grammar-masks") for t in threads)  # decode steps: on the helper thread


def test_constrained_rows_survive_preemption(tmp_path):
    """A KV budget far below the traffic preempts rows mid-answer; a preempted constrained row resumes with its
    grammar state and still completes valid JSON, with the tokens it gets with room to spare."""

    model = build_tiny_model("llama")
    schema = object_schema({"a": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                            "minItems": 6, "maxItems": 6}, "b": {"type": "string", "maxLength": 4}})

    def run(**kw):
        eng = Engine(copy.deepcopy(model), load_tokenizer(), "tiny", {EOS}, config=EngineConfig(max_loras=4, **kw))
        eng.start()
        try:
            g = compile_schema(eng, schema)
            rows = [([1, 40 + i, 50, 60], SamplingParams(max_tokens=120, temperature=1.0, seed=i, grammar=g),
                     eng.resolve_stance("tiny")) for i in range(6)]
            return asyncio.run(run_rows(eng, rows)), eng.scheduler.preemptions
        finally:
            eng.stop()

    roomy, _ = run(max_model_len=128)
    tight, preempted = run(kv_cache_memory_bytes=10 * block_bytes(model), max_model_len=128)
    assert preempted > 0
    assert [o[0] for o in tight] == [o[0] for o in roomy]
    for toks, text, fin, errs in tight:
        assert not errs and fin.reason == "stop"
        jsonschema.validate(json.loads(text), schema)
