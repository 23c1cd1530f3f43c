"""Constrained decoding benchmarks: the ``structured`` scenario and the grammar-library comparison.

* :func:`structured_scenario`: a batch of rows on distinct stances, half under a JSON schema, against the same
  batch with no constraint, in interleaved rounds (aggregate output tokens/s and their ratio), with the time to
  compile the schema (first use, then from the cache) and the time spent on masks per decode step.
* :func:`grammar_libraries`: llguidance (what the engine uses) and xgrammar, where installed, on the same
  schemas and tokenizer: compile time, and mask time per token teacher-forced through a valid document.

Nothing here asserts a target: the CLI prints the numbers.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import llguidance
import llguidance.hf
import torch

from app.api.structured import JSON_OPTIONS
from app.engine import SamplingParams, Stance
from app.engine.grammar import mask_words

#: Schemas of the kind clients send, each with a valid compact instance (``", "`` / ``": "`` separators).
SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "person": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                          "email": {"type": "string", "format": "email"}},
         "required": ["name", "age", "email"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com"},
    ),
    "order": (
        {"type": "object", "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                "price": {"type": "number"}}, "required": ["sku", "qty", "price"], "additionalProperties": False}},
            "status": {"enum": ["open", "paid", "shipped"]}},
         "required": ["id", "items", "status"], "additionalProperties": False},
        {"id": "AB-1234", "items": [{"sku": "pen", "qty": 3, "price": 1.5}, {"sku": "ink", "qty": 1, "price": 7.25}],
         "status": "paid"},
    ),
}

#: The scenario's schema: a list of records that cannot end within the scenario's tokens (``minItems``), so the
#: constrained rows generate exactly as many tokens as the free ones.
LONG_LIST = {"type": "array", "minItems": 1000, "items": SCHEMAS["order"][0]["properties"]["items"]["items"]}


def structured_scenario(eb: Any, stances: list[Stance], *, repeats: int) -> dict[str, Any]:
    """Rows on ``stances`` (distinct), every other one under :data:`LONG_LIST`, vs all free, interleaved.

    Returns tokens/s of both batches (median of ``repeats``), their ratio, the schema's compile time cold and
    cached (seconds), and the mask time per decode step (seconds, summed over the batch's constrained rows).
    """
    engine = eb.engine
    text = llguidance.LLMatcher.grammar_from_json_schema(LONG_LIST, overrides=JSON_OPTIONS)
    t0 = time.perf_counter()
    g = engine.grammars.compile(text, "json", "bench")
    compile_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.grammars.compile(text, "json", "bench")
    compile_cached = time.perf_counter() - t0

    def run(constrained: bool) -> tuple[float, float, int]:
        prompts = [eb.prompt() for _ in stances]
        params = [SamplingParams(max_tokens=eb.max_tokens, temperature=0.0, ignore_eos=True,
                                 grammar=g if constrained and i % 2 == 0 else None) for i in range(len(stances))]
        steps0 = engine.scheduler.timings["decode_steps"]
        t0 = time.perf_counter()
        res = [(len(c.tokens), c.finish.mask_s) for c in engine.generate_batch(prompts, stances, params)]
        wall = time.perf_counter() - t0
        steps = engine.scheduler.timings["decode_steps"] - steps0
        return sum(n for n, _ in res) / wall, sum(m for _, m in res), steps

    run(True), run(False)  # warm-up
    free, cons, mask_per_step = [], [], []
    for _ in range(repeats):
        a = run(False)
        b = run(True)
        free.append(a[0])
        cons.append(b[0])
        mask_per_step.append(b[1] / max(1, b[2]))
    return {
        "rows": len(stances), "constrained_rows": (len(stances) + 1) // 2, "max_tokens": eb.max_tokens,
        "free_tok_per_s": round(statistics.median(free), 2),
        "constrained_tok_per_s": round(statistics.median(cons), 2),
        "ratio": round(statistics.median(c / f for c, f in zip(cons, free)), 3),
        "mask_s_per_decode_step": round(statistics.median(mask_per_step), 6),
        "schema_compile_s": round(compile_cold, 6), "schema_compile_cached_s": round(compile_cached, 6),
    }


def grammar_libraries(tokenizer: Any, vocab_size: int, *, repeats: int = 5) -> dict[str, Any]:
    """Compile and per-token mask times of llguidance and (where importable) xgrammar on :data:`SCHEMAS`.

    Each schema's instance is tokenised and fed token by token; before each token the library computes the
    row's mask (``[ceil(vocab / 32)]`` int32 words). Times are medians over ``repeats``, in seconds.
    """
    out: dict[str, Any] = {"tokenizer_vocab": vocab_size}
    t0 = time.perf_counter()
    ll_tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    out["llguidance_tokenizer_s"] = round(time.perf_counter() - t0, 3)
    try:
        import xgrammar as xgr  # optional, no extra installs it: compared only where it is installed
    except ImportError:
        xgr = None
        out["xgrammar"] = "not installed (pip install xgrammar to compare)"
    else:
        t0 = time.perf_counter()
        xg_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        out["xgrammar_tokenizer_s"] = round(time.perf_counter() - t0, 3)
    for name, (schema, instance) in SCHEMAS.items():
        ids = ll_tok.tokenize_str(json.dumps(instance))  # no leading-space marker, as the model writes it mid-reply
        row: dict[str, Any] = {"tokens": len(ids)}
        bitmask = torch.zeros((1, mask_words(vocab_size)), dtype=torch.int32)
        compiles, masks = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m = llguidance.LLMatcher(ll_tok, llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))
            compiles.append(time.perf_counter() - t0)
            t_mask = 0.0
            for t in ids:
                t0 = time.perf_counter()
                m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
                t_mask += time.perf_counter() - t0
                assert m.consume_token(t), m.get_error()
            masks.append(t_mask / len(ids))
        row["llguidance_compile_s"] = round(statistics.median(compiles), 6)
        row["llguidance_mask_s_per_token"] = round(statistics.median(masks), 7)
        if xgr is not None:
            compiles, masks = [], []
            xg_mask = xgr.allocate_token_bitmask(1, vocab_size)
            for _ in range(repeats):
                compiler = xgr.GrammarCompiler(xg_info, cache_enabled=False)
                t0 = time.perf_counter()
                compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                        separators=(", ", ": "))
                compiles.append(time.perf_counter() - t0)
                matcher = xgr.GrammarMatcher(compiled)
                t_mask = 0.0
                for t in ids:
                    t0 = time.perf_counter()
                    matcher.fill_next_token_bitmask(xg_mask)
                    t_mask += time.perf_counter() - t0
                    assert matcher.accept_token(t)
                masks.append(t_mask / len(ids))
            row["xgrammar_compile_s"] = round(statistics.median(compiles), 6)
            row["xgrammar_mask_s_per_token"] = round(statistics.median(masks), 7)
        out[name] = row
    return out
