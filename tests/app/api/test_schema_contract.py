"""Schema contract: schemathesis drives the app in-process against its own OpenAPI document.

* ``test_every_operation_conforms``: every operation of ``/openapi.json`` gets generated requests, valid
  and invalid (schemathesis' coverage and fuzzing phases), with the admin key set so the admin
  routes run, and schemathesis' standard checks on every response: no 5xx, only documented status codes,
  documented content types, bodies (server-sent events included, chunk by chunk) that match their schema,
  the ``Allow`` of a 405, invalid data refused and valid data accepted, and the rest of its built-ins.
* ``test_links_upload_chat_delete``: schemathesis' stateful run over OpenAPI links. The app's schema has
  none; the test adds, to the 201 of ``POST /v1/adapters``, links to chatting (and completing) in the new
  stance, reading it and deleting it; schemathesis infers more (list -> read/delete...).
* ``test_upload_chat_delete_scenario``: the upload -> chat -> delete -> chat (404) sequence, pinned, each
  step a generated case validated against the schema (a stateful run may or may not draw it).

The model is a tiny random Llama (``tiny_factory``). Each request is made cheap and, when valid, made to
fit what only the server knows (``_prepare``): ``max_tokens``/``max_completion_tokens`` at most 4, ``n``
at most 2, the prompt cut to the context; token ids in the vocabulary; stances that exist. A valid upload
carries a real peft adapter (a zip: schemathesis names a binary part ``files.zip`` from its magic bytes,
which is how the server recognises an archive); a valid ``load_lora_adapter`` names a real folder.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.transport.serialization import Binary

from app.api.structured import chat_messages
from app.config import Settings
from app.errors import ContextLengthExceededError
from app.main import create_app
from app.registry.validation import NAME_RE
from app.schemas import SEED_MAX, SEED_MIN, STANCE_NAME_PATTERN, ChatMessage
from tests.factories import AUTH, KEY, tiny_factory, wait_ready, zip_folder

pytestmark = pytest.mark.slow

#: Every generated request stays this cheap on 2 CPU cores.
MAX_TOKENS, MAX_N = 4, 2
_INT32 = 2**31 - 1
BASE = "tiny-llama"
#: An adapter registered before the run and never deleted, so valid requests can name a stance that exists.
RESIDENT = "resident"
GENERATION = ("/v1/chat/completions", "/v1/completions")


def _settings(max_examples: int, **kwargs: Any) -> hypothesis.settings:
    """Bounded and deterministic (the same cases every run); schema-sized inputs may be slow or large to draw."""
    return hypothesis.settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.large_base_example],
        **kwargs,
    )


# ---------------------------------------------------------------------------- the app and its schema
#: Built at import so schemathesis can collect one test per operation; the model loads when ``served`` starts
#: the lifespan, after pointing the adapter store at a pytest temporary folder. (``schemathesis.pytest.from_fixture``
#: would avoid the import-time app, but its lazy loader reads ``Function._nodeid``, which pytest 9.2 no longer has.)
_SETTINGS = Settings(admin_key=KEY, max_loras=4, default_max_tokens=MAX_TOKENS)  # for requests that name no max
APP = create_app(_SETTINGS, model_factory=tiny_factory)
#: What valid requests need at run time: a real adapter, zipped and as a folder.
_RUNTIME: dict[str, Any] = {}


async def TESTED_APP(scope, receive, send):  # noqa: N802  (an ASGI app)
    """APP as schemathesis reaches it: requests pass through, lifespan events are answered here.

    schemathesis' pytest plugin ends an ASGI app's lifespan after every test item, and each start of APP's
    lifespan loads the model again (503 ``not_ready`` meanwhile); ``served`` runs the real lifespan once for
    the whole module instead.
    """
    if scope["type"] != "lifespan":
        return await APP(scope, receive, send)
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


@pytest.fixture(scope="module")
def served(tmp_path_factory, peft_dirs):
    """APP started (lifespan) on a fresh store and ready, with the resident adapter; stopped at the end."""
    _SETTINGS.adapters_dir = tmp_path_factory.mktemp("store")
    _RUNTIME["zip"] = zip_folder(peft_dirs["calm"])
    _RUNTIME["folder"] = str(peft_dirs["bold"])
    with TestClient(APP) as client:
        wait_ready(client, timeout=60)
        files = [("files", ("adapter.zip", _RUNTIME["zip"], "application/zip"))]
        r = client.post("/v1/adapters", data={"name": RESIDENT}, files=files, headers=AUTH)
        assert r.status_code == 201, r.text
        _RUNTIME["client"] = client
        yield client


def _with_links(raw: dict) -> dict:
    """The app's OpenAPI plus links from an upload (test-only): chat and complete in the new stance, read it,
    delete it. Links are what schemathesis' stateful testing follows; the app's schema has none."""
    raw = copy.deepcopy(raw)
    ids = {(p, m): op["operationId"] for p, ops in raw["paths"].items() for m, op in ops.items()}
    name = "$response.body#/name"
    raw["paths"]["/v1/adapters"]["post"]["responses"]["201"]["links"] = {
        "ChatWithAdapter": {"operationId": ids["/v1/chat/completions", "post"], "requestBody": {"model": name}},
        "CompleteWithAdapter": {"operationId": ids["/v1/completions", "post"], "requestBody": {"model": name}},
        "GetAdapter": {"operationId": ids["/v1/adapters/{name}", "get"], "parameters": {"path.name": name}},
        "DeleteAdapter": {"operationId": ids["/v1/adapters/{name}", "delete"], "parameters": {"path.name": name}},
    }
    return raw


def _schema():
    schema = schemathesis.openapi.from_dict(_with_links(APP.openapi()), config=SchemathesisConfig())
    schema.app = TESTED_APP
    schema.config.update(headers=AUTH)  # the admin key on every request (schemathesis also tries without)
    return schema


schema = _schema()


# ---------------------------------------------------------------------------- making a case cheap and valid
def _clamp(body: dict, key: str, most: int) -> None:
    v = body.get(key)
    # only valid values above the bound (an integer, maybe written 5.0): an invalid one must stay invalid
    if type(v) in (int, float) and v == int(v) and most < v <= _INT32:
        body[key] = most


def _registered() -> set[str]:
    return {r.name for r in APP.state.service.catalog.list()}


def _pick(generated: str, *known: str) -> str:
    """A name that exists, or (one time in len(known) + 1) the generated one: 404s stay covered."""
    return (*known, generated)[len(generated) % (len(known) + 1)]


def _unreserved(body: dict, key: str) -> dict:
    """``{key: name}`` for a stance name to register: the base model's served name is the server's, reserved (the
    server rightly refuses it with 422, which schemathesis would report as valid data rejected). Hypothesis draws
    string constants from the project's own modules, so it does draw ``BASE``."""
    name = body.get(key)
    return {key: f"{name}-adapter"} if name == BASE else {}


def _to_server_state(body: dict, steer: bool) -> None:
    """What the schema cannot say, because it is the server's: its stances, its vocabulary, its blend bound. A
    valid request names ones that exist (the server rightly refuses others with 422, which schemathesis would
    report as valid data rejected). With ``steer``, ``model`` too is mostly one that exists (else 404 mostly)."""
    engine = APP.state.service.engine
    model = body.get("model")
    if steer and isinstance(model, str) and model not in _registered() | {BASE}:
        body["model"] = _pick(model, BASE, RESIDENT)
    if isinstance(body.get("stop_token_ids"), list):
        body["stop_token_ids"] = [t % engine.vocab_size for t in body["stop_token_ids"]]
    if isinstance(body.get("logit_bias"), dict):
        body["logit_bias"] = {str(int(k) % engine.vocab_size): v for k, v in body["logit_bias"].items()}
    if isinstance(body.get("stances"), dict) and body["stances"]:
        weight = next(iter(body["stances"].values()))
        body["stances"] = {RESIDENT: max(-engine.max_blend_weight, min(engine.max_blend_weight, weight))}
    # which schemas, regular expressions, grammars and tool lists compile is the grammar compiler's to say (a bad one
    # is refused with 400, tested in tests/app/api/test_structured.py): valid requests here leave the output free
    for field in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "tools",
                  "tool_choice"):
        body.pop(field, None)
    if body.get("response_format") not in (None, {"type": "text"}):
        body.pop("response_format")
    seed = body.get("seed")
    if type(seed) is int and not SEED_MIN <= seed <= SEED_MAX:
        # schemathesis compares integers past 2**53 as floats: it takes 2**64 + 383 for a valid seed
        # (maximum 2**64 - 1), which the server rightly refuses; keep the seed it meant, the maximum
        body["seed"] = SEED_MAX


def _prompt_fits(body: dict, chat: bool) -> bool:
    engine = APP.state.service.engine
    try:
        if chat:
            messages = [ChatMessage.model_validate(m) for m in body["messages"]]
            ids = engine.chat_prompt_ids(chat_messages(messages, None))
        else:
            ids = engine.text_prompt_ids(body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0])
    except ContextLengthExceededError:
        return False
    return len(ids) + MAX_TOKENS < engine.max_model_len


def _fit_prompt(body: dict, chat: bool) -> None:
    """Halve the longest text of the prompt (then drop the first message) until it fits the model's context:
    a longer prompt rightly gets 400 ``context_length_exceeded``."""
    while not _prompt_fits(body, chat):
        if chat:
            body["messages"] = messages = [dict(m) for m in body["messages"]]
            slots = [(m, "content") for m in messages if isinstance(m.get("content"), str)]
            for m in messages:
                if isinstance(m.get("content"), list):
                    m["content"] = [dict(p) for p in m["content"]]
                    slots += [(p, "text") for p in m["content"] if isinstance(p.get("text"), str)]
        else:
            if isinstance(body["prompt"], list):
                body["prompt"] = list(body["prompt"])
            slots = [(body, "prompt")] if isinstance(body["prompt"], str) else [(body["prompt"], 0)]
        slots = [(holder, key) for holder, key in slots if holder[key]]
        calls = [m for m in body["messages"] if m.get("tool_calls")] if chat else []
        if calls:  # earlier tool calls are written into the prompt as JSON: drop them first
            for m in calls:
                m["tool_calls"] = None
        elif slots:
            holder, key = max(slots, key=lambda slot: len(slot[0][slot[1]]))
            holder[key] = holder[key][: len(holder[key]) // 2]
        else:
            assert chat and len(body["messages"]) > 1, "the prompt does not fit, and has nothing left to cut"
            del body["messages"][0]


def _prepare(case, *, steer: bool = True) -> None:
    """Make ``case`` cheap to serve and, if it is valid, valid for this server too; right before the call.

    Done here rather than in generation hooks so it reaches the cases of every phase alike, and runs once the
    server (its vocabulary, its adapters) exists. A body is replaced, never edited: generated cases may share one.
    An invalid part of a case stays invalid. ``steer``: make most names (``model``, the adapter read) ones that
    exist, so the 200s are exercised too (not in stateful runs: there the links name them). The resident adapter
    is never deleted: valid requests name it.
    """
    op = case.operation
    valid = case.meta is not None and not case.meta.is_negative_at(ParameterLocation.BODY)
    name = case.path_parameters.get("name") if case.path_parameters else None
    if op.path == "/v1/adapters/{name}" and name == RESIDENT and op.method.upper() == "DELETE":
        case.path_parameters = {**case.path_parameters, "name": f"{RESIDENT}-kept"}
    elif op.path == "/v1/adapters/{name}" and op.method.upper() == "GET" and steer and name not in _registered():
        case.path_parameters = {**case.path_parameters, "name": _pick(name, RESIDENT)}
    body = case.body
    if not isinstance(body, dict):
        return
    if op.path in GENERATION:
        body = dict(body)
        _clamp(body, "max_tokens", MAX_TOKENS)
        _clamp(body, "max_completion_tokens", MAX_TOKENS)
        _clamp(body, "n", MAX_N)
        if valid:
            _to_server_state(body, steer)
            _fit_prompt(body, chat=op.path == "/v1/chat/completions")
        case.body = body
    elif not valid:
        return
    elif op.path == "/v1/adapters" and op.method.upper() == "POST":
        # Set past the case's change tracking: schemathesis re-judges an edited body that holds binary as invalid
        # (it cannot validate binary), and would then report this valid upload as "invalid data accepted".
        object.__setattr__(case, "body", {**body, **_unreserved(body, "name"), "files": [Binary(_RUNTIME["zip"])]})
    elif op.path == "/v1/load_lora_adapter":
        # the schema cannot say which folders on the server hold an adapter: a valid request names one
        case.body = {**body, **_unreserved(body, "lora_name"), "lora_path": _RUNTIME["folder"]}
    elif op.path in ("/v1/stances", "/v1/export-blend") and op.method.upper() == "POST":
        # a blend's members (named or exported) must be registered adapters (else 409 / 422) and its weights within
        # the server's bound (else 422); "base" and "blend" are the shared metric labels, refused with 422
        engine = APP.state.service.engine
        stances = body.get("stances")
        weight = next(iter(stances.values())) if isinstance(stances, dict) and stances else 1.0
        renamed = {BASE: f"{BASE}-blend", "base": "base-blend", "blend": "blend-named"}
        named = {"name": renamed.get(body["name"], body["name"])} if "name" in body else {}
        case.body = {**body, **named,
                     "stances": {RESIDENT: max(-engine.max_blend_weight, min(engine.max_blend_weight, weight))}}
    elif op.path == "/v1/unload_lora_adapter" and body.get("lora_name") == RESIDENT:
        case.body = {**body, "lora_name": f"{RESIDENT}-kept"}


# ---------------------------------------------------------------------------- the tests
@schema.parametrize()
@_settings(75)
def test_every_operation_conforms(case, served):
    _prepare(case)
    case.call_and_validate()


def test_links_upload_chat_delete(served):
    class Workflow(schema.as_state_machine()):
        def setup(self) -> None:
            # every scenario starts from the same server (the resident adapter only): which links schemathesis
            # follows depends on the answers, and Hypothesis needs a scenario to draw the same steps when run again
            for blend in APP.state.service.catalog.list_blends():  # named blends first: they pin their members
                assert _RUNTIME["client"].delete(f"/v1/stances/{blend.name}", headers=AUTH).status_code == 200
            for name in _registered() - {RESIDENT}:
                assert _RUNTIME["client"].delete(f"/v1/adapters/{name}", headers=AUTH).status_code == 200

        def before_call(self, case) -> None:
            _prepare(case, steer=False)

    # generate only, as schemathesis runs its state machines: which links it follows depends on what earlier
    # scenarios did, so a replay (shrinking) would not draw the same steps
    Workflow.run(settings=_settings(30, stateful_step_count=10, phases=[hypothesis.Phase.generate]))


def test_documented_stance_names_are_the_registry_s():
    assert STANCE_NAME_PATTERN == NAME_RE.pattern


_NAMES = itertools.count()


@_settings(6)
@given(data=st.data())
def test_upload_chat_delete_scenario(served, data):
    """Upload a stance, chat in it (streamed or not), delete it; then it is gone for chat and reads alike."""
    name = f"flow-{next(_NAMES)}"

    def step(path: str, method: str, *, body: dict | None = None, **parts: Any):
        case = data.draw(schema[path][method].as_strategy(GenerationMode.POSITIVE, **parts), label=f"{method} {path}")
        _prepare(case, steer=False)
        if body is not None:
            # the name under test; past the change tracking, which would take an upload (binary) for invalid
            object.__setattr__(case, "body", {**case.body, **body})
        return case.call_and_validate()

    r = step("/v1/adapters", "POST", body={"name": name}, query={"replace": False})
    assert r.status_code == 201, r.text
    assert name in {m["id"] for m in step("/v1/models", "GET").json()["data"]}
    for path in GENERATION:
        r = step(path, "POST", body={"model": name})
        assert r.status_code == 200, r.text
    assert step("/v1/adapters/{name}", "DELETE", path_parameters={"name": name}).status_code == 200
    r = step("/v1/chat/completions", "POST", body={"model": name})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
    assert step("/v1/adapters/{name}", "GET", path_parameters={"name": name}).status_code == 404
