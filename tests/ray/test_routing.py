"""The routing key of a request (no Ray needed): adapter name, a blend's heaviest member, a named blend."""

from __future__ import annotations

import json

from app.ray_serve.routing import Route, heaviest, route_of

BASE = frozenset({"tiny-llama", "tiny"})
CHAT = "/v1/chat/completions"


def body(**kw) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **kw}).encode()


def test_single_adapter_routes_by_its_name():
    assert route_of(CHAT, body(model="calm"), BASE) == Route("calm", ("calm",))
    assert route_of("/v1/completions", body(model="calm"), BASE) == Route("calm", ("calm",))


def test_base_model_goes_anywhere():
    assert route_of(CHAT, body(model="tiny-llama"), BASE) == Route(None, ())


def test_blend_routes_by_its_heaviest_member_by_absolute_weight():
    r = route_of(CHAT, body(model="tiny-llama", stances={"calm": 0.3, "bold": -0.9, "shy": 0.5}), BASE)
    assert r.key == "bold"
    assert set(r.adapters) == {"calm", "bold", "shy"}


def test_blend_ties_break_on_the_smallest_name_whatever_the_order():
    assert heaviest({"b": 0.5, "a": -0.5}) == heaviest({"a": 0.5, "b": 0.5}) == "a"


def test_blend_terms_that_are_not_numbers_are_ignored_and_an_adapter_model_is_checked_too():
    r = route_of(CHAT, body(model="calm", stances={"x": "heavy", "y": True, "z": 0.1}), BASE)
    assert r.key == "z"
    assert r.adapters == ("calm", "x", "y", "z")


def test_a_named_blend_or_unknown_name_routes_by_that_name():
    assert route_of(CHAT, body(model="team-blend"), BASE).key == "team-blend"


def test_other_routes_and_bad_bodies_go_anywhere():
    assert route_of("/v1/adapters", body(model="calm"), BASE) == Route()
    assert route_of(CHAT, b"{not json", BASE) == Route()
    assert route_of(CHAT, b"[1, 2]", BASE) == Route()
    assert route_of(CHAT, b"\xff\xfe", BASE) == Route()
