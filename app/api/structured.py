"""Structured output and tool calls: OpenAI's and vLLM's request fields turned into one grammar, and back.

What a request may constrain its output with (one of them per request):

| field | grammar |
|---|---|
| ``response_format: {"type": "json_object"}`` | any JSON object |
| ``response_format: {"type": "json_schema", "json_schema": {"schema": ...}}`` | that JSON schema |
| ``tools`` with ``tool_choice`` ``auto`` / ``required`` / a named function | the generic tool-call format below |
| vLLM's ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (Lark or GBNF) | that |
| vLLM's ``structured_outputs: {"json" / "regex" / "choice" / "grammar" / "json_object": ...}`` | the same |

**The generic tool-call format.** Every chat template is served the same way: the tools are described in a
system message (:func:`tool_system_prompt`), and the model answers with one JSON object, which the grammar
enforces:

- a call: ``{"tool_calls": [{"name": "<function>", "arguments": {...}}]}`` (one call unless
  ``parallel_tool_calls``), returned as OpenAI ``tool_calls`` with ``finish_reason: "tool_calls"``; the
  arguments match the function's ``parameters`` and, where that schema leaves ``additionalProperties`` unset,
  hold only the properties it declares;
- with ``tool_choice: "auto"`` only, a plain answer: ``{"response": "<text>"}``, returned as ``content``.

Earlier turns go back through the chat template in the same format: an assistant message with ``tool_calls``
becomes that JSON object, and a ``role: "tool"`` message keeps its role (a template that refuses the role gets
it as a user turn, ``Tool result (<id>): <content>``).

A completion cut by ``max_tokens`` (``finish_reason: "length"``) is returned as the raw text it produced:
partial JSON is never parsed into ``tool_calls``.

This module holds no engine state: grammar text is compiled by :class:`~app.engine.grammar.GrammarCompiler`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import llguidance

from app.errors import InvalidConstraintError

#: llguidance's JSON options for every JSON grammar: no free whitespace (a model cannot stall on blanks),
#: ``", "`` and ``": "`` between items as ``json.dumps`` writes them.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class ToolSpec:
    """One function a model may call: its name, description and JSON schema of arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass
class Constraint:
    """What one request's output must match.

    Attributes:
        grammar: llguidance grammar text.
        kind: ``json``, ``regex``, ``choice``, ``grammar`` or ``tools`` (metrics label).
        param: the request field it came from (named in errors).
        tools: the callable functions when the output is a tool call (``kind == "tools"``).
        allow_text: with tools, whether ``{"response": ...}`` is allowed (``tool_choice: "auto"``).
        system_prompt: the tool description to add to the conversation, if any.
    """

    grammar: str
    kind: str
    param: str
    tools: list[ToolSpec] = field(default_factory=list)
    allow_text: bool = False
    system_prompt: str | None = None


def _json_grammar(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidConstraintError(f"{param} is not valid JSON: {e}", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidConstraintError(f"{param} must be a JSON schema (an object)", param=param)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise InvalidConstraintError(f"invalid {param}: {e}", param=param) from None


def _response_format(rf: Any) -> Constraint | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or "type" not in rf:
        raise InvalidConstraintError("response_format must be an object with a 'type'", param="response_format")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint(_json_grammar({"type": "object"}, "response_format"), "json", "response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise InvalidConstraintError("response_format.json_schema needs a 'schema'",
                                      param="response_format.json_schema")
        param = "response_format.json_schema.schema"
        return Constraint(_json_grammar(js["schema"], param), "json", param)
    raise InvalidConstraintError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema",
                              param="response_format.type")


def _guided(kind: str, value: Any, param: str) -> Constraint:
    if kind in ("json", "guided_json"):
        return Constraint(_json_grammar(value, param), "json", param)
    if kind == "json_object":
        return Constraint(_json_grammar({"type": "object"}, param), "json", param)
    if kind in ("regex", "guided_regex"):
        if not isinstance(value, str):
            raise InvalidConstraintError(f"{param} must be a string", param=param)
        return Constraint(llguidance.LLMatcher.grammar_from_regex(value), "regex", param)
    if kind in ("choice", "guided_choice"):
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise InvalidConstraintError(f"{param} must be a non-empty list of strings", param=param)
        return Constraint(llguidance.grammar_from("choice", json.dumps(value)), "choice", param)
    if kind in ("grammar", "guided_grammar"):
        if not isinstance(value, str):
            raise InvalidConstraintError(f"{param} must be a string (a Lark or GBNF grammar)", param=param)
        try:
            return Constraint(llguidance.grammar_from("grammar", value), "grammar", param)
        except ValueError as e:
            raise InvalidConstraintError(f"invalid {param}: {e}", param=param) from None
    raise InvalidConstraintError(f"{param} is not supported: use json, regex, choice, grammar or json_object",
                              param=param)


def _tools(tools: list[Any], choice: Any, parallel: bool) -> Constraint | None:
    specs: list[ToolSpec] = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidConstraintError("each tool must be {'type': 'function', 'function': {...}}", param=f"tools[{i}]")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidConstraintError("a function needs a 'name'", param=f"tools[{i}].function.name")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise InvalidConstraintError("parameters must be a JSON schema object", param=f"tools[{i}].function.parameters")
        specs.append(ToolSpec(name, str(fn.get("description") or ""), params))
    if len({s.name for s in specs}) != len(specs):
        raise InvalidConstraintError("tool names must be unique", param="tools")
    if choice in (None, "auto"):
        mode, allowed = "auto", specs
    elif choice == "none":
        return None
    elif choice == "required":
        mode, allowed = "required", specs
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        allowed = [s for s in specs if s.name == name]
        if not allowed:
            raise InvalidConstraintError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        mode = "named"
    else:
        raise InvalidConstraintError("tool_choice must be none, auto, required or {'type': 'function', 'function': "
                                  "{'name': ...}}", param="tool_choice")
    call = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": s.name}, "arguments": _declared_only(s.parameters)},
        "required": ["name", "arguments"], "additionalProperties": False,
    } for s in allowed]}
    calls: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    schema: dict[str, Any] = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                              "additionalProperties": False}
    if mode == "auto":
        text = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                "additionalProperties": False}
        schema = {"anyOf": [schema, text]}
    return Constraint(_json_grammar(schema, "tools"), "tools", "tools", tools=allowed, allow_text=mode == "auto",
                      system_prompt=tool_system_prompt(allowed, mode == "auto", parallel))


def _declared_only(schema: dict[str, Any]) -> dict[str, Any]:
    """A function's arguments take only the properties it declares, unless its schema says otherwise (as
    OpenAI's strict function calling does)."""
    if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def tool_system_prompt(tools: list[ToolSpec], allow_text: bool, parallel: bool) -> str:
    """The system message that describes ``tools`` in the generic format (see the module docstring)."""
    listing = "\n".join(json.dumps({"name": t.name, **({"description": t.description} if t.description else {}),
                                    "parameters": t.parameters}) for t in tools)
    many = "one or more calls" if parallel else "one call"
    lines = [
        "Tools (name, description, JSON schema of the arguments):",
        listing,
        "Answer with one JSON object only.",
        f'To call tools ({many}): {{"tool_calls": [{{"name": "<tool>", "arguments": {{...}}}}]}}',
    ]
    if allow_text:
        lines.append('To answer directly: {"response": "<answer>"}')
    return "\n".join(lines)


def constraint_for(body: Any) -> Constraint | None:
    """The constraint a chat or completion request asks for, or ``None`` when its output is free.

    Raises:
        InvalidConstraintError: a malformed field, or two fields that both constrain the output (``param`` names
            the second).
    """
    found: list[Constraint] = []
    rf = _response_format(getattr(body, "response_format", None))
    if rf is not None:
        found.append(rf)
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        value = getattr(body, name, None)
        if value is not None:
            found.append(_guided(name, value, name))
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        if not isinstance(so, dict):
            raise InvalidConstraintError("structured_outputs must be an object", param="structured_outputs")
        for key, value in so.items():
            if value is None or value is False or key in ("disable_any_whitespace", "disable_fallback",
                                                          "disable_additional_properties", "whitespace_pattern"):
                continue
            found.append(_guided(key, value, f"structured_outputs.{key}"))
    tools = getattr(body, "tools", None)
    if tools:
        c = _tools(tools, getattr(body, "tool_choice", None), getattr(body, "parallel_tool_calls", True) is not False)
        if c is not None:
            found.append(c)
    elif getattr(body, "tool_choice", None) not in (None, "none", "auto"):
        raise InvalidConstraintError("tool_choice needs tools", param="tool_choice")
    if len(found) > 1:
        raise InvalidConstraintError(
            f"{found[0].param} and {found[1].param} both constrain the output; use one", param=found[1].param)
    return found[0] if found else None


def chat_messages(messages: list[Any], constraint: Constraint | None) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: text contents, earlier tool calls written in the
    generic format, and the tool description as a system message (after the caller's own system message)."""
    out: list[dict[str, str]] = []
    for m in messages:
        calls = getattr(m, "tool_calls", None)
        if m.role == "assistant" and calls:
            content = json.dumps({"tool_calls": [
                {"name": c.function.name, "arguments": _loads_or_text(c.function.arguments)} for c in calls]})
        else:
            content = m.text()
        out.append({"role": m.role, "content": content})
    if constraint is not None and constraint.system_prompt:
        at = 1 if out and out[0]["role"] in ("system", "developer") else 0
        out.insert(at, {"role": "system", "content": constraint.system_prompt})
    return out


def tool_turns_as_user(messages: list[dict[str, str]], tool_call_ids: list[str | None]) -> list[dict[str, str]]:
    """``role: "tool"`` turns as user turns, for chat templates that refuse the role."""
    return [
        {"role": "user", "content": f"Tool result ({cid or 'call'}): {m['content']}"} if m["role"] == "tool" else m
        for m, cid in zip(messages, tool_call_ids)
    ]


def _loads_or_text(s: Any) -> Any:
    if not isinstance(s, str):
        return s
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def parse_tool_output(text: str, constraint: Constraint) -> tuple[str | None, list[dict[str, Any]] | None]:
    """A completed tool-format answer as OpenAI's ``(content, tool_calls)``.

    ``{"tool_calls": [...]}`` gives ``(None, [{"id", "type": "function", "function": {"name", "arguments"}}])``
    with ``arguments`` a JSON string; ``{"response": "..."}`` gives ``("...", None)``; anything else (it can only
    happen when the grammar was cut short) is returned as text.
    """
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
        calls = [{
            "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": c.get("name", ""), "arguments": json.dumps(c.get("arguments", {}))},
        } for c in obj["tool_calls"] if isinstance(c, dict)]
        return None, calls
    if isinstance(obj, dict) and isinstance(obj.get("response"), str):
        return obj["response"], None
    return text, None
