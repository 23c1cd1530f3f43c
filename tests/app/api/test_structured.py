"""Structured output and tool calls over HTTP, on the tiny Llama, through the official ``openai`` client.

The tiny model's weights are random, so what it says means nothing; what is checked is that every completed
answer matches its constraint (JSON schema, regex, choice, tool-call format), that the client's helpers
(``parse``, streamed tool calls) read the answers unchanged, and that bad constraints get a 400 naming the field
before anything is queued.
"""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
from openai import OpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState
from pydantic import BaseModel, Field

from tests.factories import AUTH, adapter_files, make_client, metric, wait_ready

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
#: Tools with short names and arguments: the tiny tokenizer spends about a token per character, in 512 positions.
WEATHER = {"type": "function", "function": {"name": "wx", "parameters": {
    "type": "object", "properties": {"c": {"enum": ["a", "b"]}}, "required": ["c"]}}}
TIME = {"type": "function", "function": {"name": "tm", "parameters": {
    "type": "object", "properties": {"z": {"type": "integer", "maximum": 9}}, "required": ["z"]}}}


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def client(tmp_path_factory, peft_dirs):
    with make_client(tmp_path_factory.mktemp("structured"), default_max_tokens=64) as c:
        wait_ready(c)
        assert c.post("/v1/adapters", data={"name": "calm"}, files=adapter_files(peft_dirs["calm"]),
                      headers=AUTH).status_code == 201
        assert c.post("/v1/adapters", data={"name": "bold"}, files=adapter_files(peft_dirs["bold"]),
                      headers=AUTH).status_code == 201
        yield c


@pytest.fixture(scope="module")
def oai(client):
    return OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def ask(oai, model="calm", max_tokens=96, **kw):
    return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me."}],
                                       max_tokens=max_tokens, temperature=0.8, seed=7, **kw)


def test_json_schema_in_a_stance_and_a_blend(oai):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for model, extra in (("calm", None), ("tiny-llama", {"stances": {"calm": 0.5, "bold": 0.5}})):
        r = ask(oai, model, response_format=rf, extra_body=extra)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_object(oai):
    r = ask(oai, response_format={"type": "json_object"}, max_tokens=200)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_parse_with_a_pydantic_model(oai):
    r = oai.chat.completions.parse(model="calm", messages=[{"role": "user", "content": "Who?"}],
                                   response_format=Person, max_tokens=96, temperature=0.8, seed=3)
    person = r.choices[0].message.parsed
    assert isinstance(person, Person)


def test_vllm_guided_fields(oai):
    r = ask(oai, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert r.choices[0].message.content in {"yes", "no", "maybe"}
    r = ask(oai, extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", r.choices[0].message.content)
    r = ask(oai, extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = ask(oai, extra_body={"guided_grammar": 'start: "ab" | "cd" "e"'})
    assert r.choices[0].message.content in {"ab", "cde"}
    gbnf = 'root ::= "x" [0-9] [0-9]'
    r = ask(oai, extra_body={"structured_outputs": {"grammar": gbnf}})
    assert re.fullmatch(r"x[0-9]{2}", r.choices[0].message.content)
    r = ask(oai, extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert r.choices[0].message.content in {"left", "right"}


def test_completions_endpoint_is_constrained_too(client):
    r = client.post("/v1/completions", json={"model": "calm", "prompt": "Once", "max_tokens": 20,
                                             "guided_regex": "[A-Z][a-z]{2,5}"})
    assert r.status_code == 200, r.text
    assert re.fullmatch("[A-Z][a-z]{2,5}", r.json()["choices"][0]["text"])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "tm"}}])
def test_tool_calls(oai, choice):
    r = ask(oai, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False, max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    tool = {"wx": WEATHER, "tm": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    if isinstance(choice, dict):
        assert call.function.name == "tm"


def test_tool_choice_auto_is_text_or_a_call(oai):
    kinds = set()
    for seed in range(6):
        r = oai.chat.completions.create(model="calm", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER],
                                        max_tokens=96, temperature=1.0, seed=seed)
        c = r.choices[0]
        if c.finish_reason == "tool_calls":
            kinds.add("call")
            assert c.message.tool_calls[0].function.name == "wx"
        elif c.finish_reason == "stop":
            kinds.add("text")
            assert isinstance(c.message.content, str) and c.message.tool_calls is None
    assert kinds  # every finished answer was one of the two


@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_tool_calls_equal_the_whole_answer(oai, parallel):
    """The client's stream helper assembles from ``delta.tool_calls`` chunks what the non-streamed answer has
    (a random model may go on adding parallel calls until ``max_tokens``: then both are the same raw text)."""
    kw = dict(model="bold", messages=[{"role": "user", "content": "Both"}], tools=[WEATHER, TIME],
              tool_choice="required", max_tokens=80, temperature=0.8, seed=11, parallel_tool_calls=parallel)
    whole = oai.chat.completions.create(**kw)
    if parallel:  # the helper raises on finish_reason "length": assemble the chunks by hand
        chunks = list(oai.chat.completions.create(**kw, stream=True))
        final = ChatCompletionStreamState()
        for chunk in chunks:
            final.handle_chunk(chunk)
        b = final.current_completion_snapshot.choices[0]
    else:
        with oai.beta.chat.completions.stream(**kw) as stream:
            b = stream.get_final_completion().choices[0]
    a = whole.choices[0]
    assert a.finish_reason == b.finish_reason and (a.message.content or "") == (b.message.content or "")
    if not parallel:
        assert a.finish_reason == "tool_calls" and len(a.message.tool_calls) == 1
    if a.finish_reason == "tool_calls":
        assert [(c.function.name, c.function.arguments) for c in b.message.tool_calls] == [
            (c.function.name, c.function.arguments) for c in a.message.tool_calls]


def test_tool_results_go_back_through_the_template(oai):
    first = ask(oai, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    r = oai.chat.completions.create(model="calm", messages=messages, tools=[WEATHER], tool_choice="none",
                                    max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None


def test_max_tokens_cut_is_length_and_raw_text(oai):
    r = ask(oai, tools=[WEATHER], tool_choice="required", max_tokens=4)
    c = r.choices[0]
    assert c.finish_reason == "length" and c.message.tool_calls is None
    assert c.message.content.startswith("{")
    r = ask(oai, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
            max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


@pytest.mark.parametrize(("extra", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_constraints_are_400_naming_the_field(client, extra, param):
    while metric(client.get("/metrics").text, "stanceserve_requests_running"):  # earlier requests have ended
        time.sleep(0.05)
    before = metric(client.get("/metrics").text, "stanceserve_requests_total")
    r = client.post("/v1/chat/completions", json={"model": "calm", "messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert metric(client.get("/metrics").text, "stanceserve_requests_total") == before  # nothing was queued


def test_metrics_count_constrained_requests_and_mask_time(client, oai):
    before = client.get("/metrics").text
    ask(oai, "bold", extra_body={"guided_choice": ["x", "y"]})
    after = client.get("/metrics").text
    key = dict(stance="bold", kind="choice")
    assert metric(after, "stanceserve_constrained_requests_total", **key) == metric(
        before, "stanceserve_constrained_requests_total", **key) + 1
    assert metric(after, "stanceserve_grammar_mask_seconds_total", stance="bold") > metric(
        before, "stanceserve_grammar_mask_seconds_total", stance="bold")
