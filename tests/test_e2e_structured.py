"""Structured output and tool calls on the embedded SmolLM2 (its own chat template, which has no tool format),
through the official ``openai`` client against the app in-process.

* Tool calls, streamed and not, with a real model: the call names a function the request offered, its arguments
  validate against that function's schema, and the streamed answer equals the whole one.
* Random JSON schemas (hypothesis) in concurrent requests, beside free-running requests in other stances:
  every completed answer validates, and each free answer equals the one it gets alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from openai import OpenAI

from app.config import Settings
from tests.factories import AUTH, adapter_files, make_client, wait_ready, write_peft_adapter
from tests.factories.schemas import SCHEMAS

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}},
                   "required": ["zone"]}}}


def smol_factory(settings):
    from app.model_loader import load_base_model

    return load_base_model(Settings(device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def oai(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-structured")
    with make_client(root, model_factory=smol_factory) as c:
        wait_ready(c, timeout=300)
        base = smol_factory(None).model
        d = write_peft_adapter(root / "curious", "llama", model=base, rank=8, alpha=16, seed=5, scale=0.06)
        assert c.post("/v1/adapters", data={"name": "curious"}, files=adapter_files(d), headers=AUTH).status_code == 201
        yield OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=c, max_retries=0)


@pytest.mark.parametrize("model", ["SmolLM2-135M-Instruct", "curious"])
def test_tool_calls_streamed_and_not(oai, model):
    kw = dict(model=model, messages=[{"role": "user", "content": "What is the weather in Paris, in celsius?"}],
              tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False, max_tokens=64,
              temperature=0)
    whole = oai.chat.completions.create(**kw)
    c = whole.choices[0]
    assert c.finish_reason == "tool_calls", c.message.content
    (call,) = c.message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    with oai.beta.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(t.function.name, t.function.arguments) for t in final.message.tool_calls] == [
        (call.function.name, call.function.arguments)]


def test_auto_tool_choice_and_the_tool_turn(oai):
    messages = [{"role": "user", "content": "What time is it in Tokyo?"}]
    r = oai.chat.completions.create(model="curious", messages=messages, tools=[WEATHER, CLOCK], max_tokens=64,
                                    temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("tool_calls", "stop")
    if c.finish_reason == "tool_calls":
        call = c.message.tool_calls[0]
        messages += [c.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "09:30"}]
        r = oai.chat.completions.create(model="curious", messages=messages, tools=[WEATHER, CLOCK],
                                        max_tokens=48, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "tool_calls", "length")
    else:
        assert isinstance(c.message.content, str)


@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schemas=st.lists(SCHEMAS, min_size=2, max_size=2))
def test_random_schemas_beside_free_requests(oai, schemas):
    def constrained(i, schema):
        return oai.chat.completions.create(
            model=["curious", "SmolLM2-135M-Instruct"][i % 2], max_tokens=120, temperature=0.7, seed=i,
            messages=[{"role": "user", "content": "Describe a cat as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
            extra_body={"stances": {"curious": 0.5}} if i == 1 else None)

    def free(model):
        return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a color."}],
                                           max_tokens=12, temperature=0).choices[0].message.content

    alone = {m: free(m) for m in ("curious", "SmolLM2-135M-Instruct")}
    with cf.ThreadPoolExecutor(4) as pool:
        cons = [pool.submit(constrained, i, s) for i, s in enumerate(schemas)]
        frees = {m: pool.submit(free, m) for m in alone}
        for f, schema in zip(cons, schemas):
            c = f.result().choices[0]
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.message.content), schema)
        assert {m: f.result() for m, f in frees.items()} == alone
