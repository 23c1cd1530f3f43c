"""The stance rules, once: each ``(model, stances)`` with the stance it resolves to or the error it gets.

The table is :class:`~app.engine.stances.StanceResolver`'s whole contract (the module docstring says the rules
in words); the engine, the catalog and the evaluation tools all resolve through it.
"""

from __future__ import annotations

import math

import pytest

from app.engine.request import Stance
from app.engine.stances import StanceResolver, blend_size_problem, without_zero_weights
from app.errors import AdapterNotFoundError, BlendMemberMissingError, InvalidBlendError
from app.registry.adapter import AdapterVersion, AdapterWeights

ADAPTERS = {n: AdapterWeights(AdapterVersion(n, f"{i:064x}"), {}) for i, n in enumerate(("a1", "a2", "a3"), 1)}
NAMED = {"mix": {"a1": 0.6, "a2": -0.4}, "gone": {"a1": 0.5, "zz": 0.5}, "heavy": {"a1": 20.0}}


def lookup(name: str) -> AdapterWeights:
    if name not in ADAPTERS:
        raise AdapterNotFoundError(name)
    return ADAPTERS[name]


RESOLVER = StanceResolver({"tiny", "/models/tiny"}, lookup, max_weight=16.0, named_blend=NAMED.get,
                          registered=ADAPTERS.__contains__)
A1, A2, A3 = ADAPTERS["a1"], ADAPTERS["a2"], ADAPTERS["a3"]
NINE = {f"x{i}": 0.1 for i in range(9)}

#: (model, stances) -> the stance, or (error class, HTTP status, code, param)
CASES = {
    "base": (("tiny", None), Stance.base()),
    "base alias": (("/models/tiny", None), Stance.base()),
    "adapter": (("a1", None), Stance("a1", ((A1, 1.0),))),
    "unknown model": (("nope", None), (AdapterNotFoundError, 404, "adapter_not_found", "model")),
    "named blend expands to its recipe, labelled with its name": (("mix", None), Stance("mix", ((A1, 0.6), (A2, -0.4)))),
    "named blend with a missing member": (("gone", None), (BlendMemberMissingError, 409, "blend_member_missing", "model")),
    "named blend past the weight range": (("heavy", None), (BlendMemberMissingError, 409, "blend_member_missing", "model")),
    "blend on the base": (("tiny", {"a1": 0.5, "a2": 0.5}), Stance("blend", ((A1, 0.5), (A2, 0.5)))),
    "blend wins over an adapter model": (("a3", {"a1": 1.0}), Stance("blend", ((A1, 1.0),))),
    "blend wins over a named blend": (("mix", {"a3": 2}), Stance("blend", ((A3, 2.0),))),
    "blend beside an unknown model": (("nope", {"a1": 1.0}), (AdapterNotFoundError, 404, "adapter_not_found", "model")),
    "empty blend": (("tiny", {}), (InvalidBlendError, 422, "invalid_blend", "stances")),
    "more than 8 terms": (("tiny", NINE), (InvalidBlendError, 422, "invalid_blend", "stances")),
    "weight at the bound": (("tiny", {"a1": -16.0}), Stance("blend", ((A1, -16.0),))),
    "weight past the bound": (("tiny", {"a1": 16.5}), (InvalidBlendError, 422, "invalid_blend", "stances.a1")),
    "infinite weight": (("tiny", {"a1": math.inf}), (InvalidBlendError, 422, "invalid_blend", "stances.a1")),
    "nan weight": (("tiny", {"a2": math.nan}), (InvalidBlendError, 422, "invalid_blend", "stances.a2")),
    "boolean weight": (("tiny", {"a1": True}), (InvalidBlendError, 422, "invalid_blend", "stances.a1")),
    "text weight": (("tiny", {"a1": "1"}), (InvalidBlendError, 422, "invalid_blend", "stances.a1")),
    "unknown member": (("tiny", {"a1": 1.0, "zz": 1.0}), (InvalidBlendError, 422, "invalid_blend", "stances.zz")),
    "members checked in order: the first bad one is named": (
        ("tiny", {"zz": 1.0, "a1": math.nan}), (InvalidBlendError, 422, "invalid_blend", "stances.zz")),
    "zero weights are kept": (("tiny", {"a1": 0.0, "a2": 1.0}), Stance("blend", ((A1, 0.0), (A2, 1.0)))),
    "an all-zero blend is still a blend": (("tiny", {"a1": 0}), Stance("blend", ((A1, 0.0),))),
}


@pytest.mark.parametrize(("args", "expected"), list(CASES.values()), ids=list(CASES))
def test_rule(args, expected):
    if isinstance(expected, Stance):
        assert RESOLVER.resolve(*args) == expected
        return
    cls, status, code, param = expected
    with pytest.raises(cls) as info:
        RESOLVER.resolve(*args)
    err = info.value
    assert (type(err), err.status_code, err.code, err.param) == (cls, status, code, param)


def test_two_names_of_one_version_add_their_weights():
    twin = StanceResolver({"tiny"}, lambda n: A1 if n in ("a1", "alias") else lookup(n), max_weight=16.0)
    assert twin.resolve("tiny", {"a1": 0.25, "alias": 0.5}) == Stance("blend", ((A1, 0.75),))


@pytest.mark.parametrize(("stances", "kept"), [
    ({"a1": 0.0, "a2": 0.5}, {"a2": 0.5}), ({"a1": 0, "a2": -0.0}, None), ({"a1": 1.0}, {"a1": 1.0}),
])
def test_without_zero_weights_is_the_one_place_that_drops_them(stances, kept):
    assert without_zero_weights(stances) == kept


def test_size_rule_words_the_limits():
    assert blend_size_problem(0) == "stances must name at least one adapter"
    assert blend_size_problem(8) is None
    assert blend_size_problem(9) == "a blend may combine at most 8 adapters, got 9"
