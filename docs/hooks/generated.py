"""MkDocs hook: the parts of pages generated from the code at build time.

A page asks for a generated block with an HTML comment on a line of its own:

* ``<!-- generated: http-routes -->``: every route of ``app.main.create_app().openapi()`` (method, path,
  summary, description, parameters, request body fields with their types, ranges and defaults, and the
  statuses it answers);
* ``<!-- generated: error-codes -->``: every error ``code`` of :mod:`app.errors` with its HTTP status, its
  meaning (the class docstring) and what to do about it (:data:`ADVICE`).

The hook builds the app object but never starts it (no model is loaded). It does not write any file:
the Markdown is replaced in memory, so the site always matches the code it was built from.
:func:`error_codes` is also what ``tests/docs`` checks (every code has advice).
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the checkout's app/, not another installed copy
    sys.path.insert(0, str(REPO))

MARK = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)

#: What a client or an operator does about each error code (the meaning comes from the class docstring).
ADVICE: dict[str, str] = {
    "bad_request": "Fix the request as the message says.",
    "invalid_request": "Fix the field named in `param` (`error.details` lists every violation); "
                       "the ranges are in the request schema below.",
    "invalid_blend": "Name only registered adapters in `stances` (`GET /v1/models`), at most 8 of them, with "
                     "finite weights no larger than `max_blend_weight` in absolute value.",
    "adapter_not_found": "Check the name with `GET /v1/models`; register the adapter first (upload, or "
                         "`/v1/load_lora_adapter`). From the training tools: pass a folder path, or the name "
                         "of an adapter in the store (`--adapters-dir`).",
    "adapter_exists": "Upload again with `?replace=true` to publish a new version, or pick another name.",
    "invalid_adapter": "The message names the file at fault: upload a peft LoRA adapter trained on this base "
                       "model (same layer shapes), safetensors only, rank at most `max_lora_rank`, no DoRA, "
                       "bias training or `modules_to_save`.",
    "adapter_too_large": "Shrink the adapter (lower rank, fewer target modules, bf16) or raise "
                         "`STANCESERVE_MAX_ADAPTER_BYTES`.",
    "stance_not_found": "Check the name with `GET /v1/stances`; create the named blend with `POST /v1/stances`.",
    "stance_exists": "Adapters and named blends share one namespace: choose another name, or pass "
                     "`?replace=true` to replace a named blend.",
    "blend_member_missing": "Register the adapter named in `param` (`stances.<name>`) again, or replace the "
                            "named blend with a recipe of registered adapters.",
    "adapter_in_use": "Delete or replace the named blends listed in the message first, then delete the adapter.",
    "queue_full": "Retry after the `Retry-After` seconds; if it persists, add replicas or raise "
                  "`STANCESERVE_MAX_WAITING` (a longer queue means longer waits).",
    "unauthorized": "Send `Authorization: Bearer <STANCESERVE_ADMIN_KEY>` with the server's admin key.",
    "forbidden": "Set `STANCESERVE_ADMIN_KEY` on the server and send it as a bearer token, or call from the "
                 "server host itself (loopback); behind a reverse proxy, list it in `STANCESERVE_TRUSTED_PROXIES`.",
    "context_length_exceeded": "Shorten the prompt or lower `max_tokens`; the limits are `max_model_len` and "
                               "`max_prompt_tokens`.",
    "invalid_constraint": "Fix the constraint named in `param`: a valid JSON schema, regular expression, Lark or "
                          "GBNF grammar, or tool list, and only one of `response_format`, `tools` (with a "
                          "`tool_choice` other than none), `guided_*` and `structured_outputs` per request.",
    "unsupported_parameter": "Remove the field named in `param`: stanceserve refuses OpenAI fields it does not "
                             "implement rather than ignore them.",
    "request_too_large": "Send a smaller body, or raise `STANCESERVE_MAX_REQUEST_BYTES`.",
    "generation_failed": "This request alone failed (for example, a blend whose weights overflow the logits); "
                         "other requests are unaffected. Retry with smaller blend weights or other sampling settings.",
    "internal_error": "A bug: the message carries a request id; find it in the server log and report it.",
    "not_ready": "Wait until `GET /ready` answers 200 (the model is still loading), then retry.",
    "not_found": "Check the path and the method against this page (the route does not exist).",
    "method_not_allowed": "Use one of the methods the `Allow` header lists.",
    "unsupported_media_type": "Send the body type the route expects (`application/json`, or `multipart/form-data` "
                              "for uploads).",
    "rate_limited": "Retry after the `Retry-After` seconds.",
    "model_load_failed": "The server could not load its base model at start-up: check `STANCESERVE_MODEL`, "
                         "the cache folder and network access to the model files (see Troubleshooting).",
}


#: Meanings of the codes the framework itself answers with (``app.errors._HTTP_CODES``), which have no class.
FRAMEWORK_MEANING: dict[str, str] = {
    "not_found": "No route at this path.",
    "method_not_allowed": "The path exists, but not with this method; `Allow` lists the methods it takes.",
    "unsupported_media_type": "The body's content type is not one the route reads.",
    "rate_limited": "Too many requests.",
    "bad_request": "The request is malformed (the base of every domain error that names no other code).",
}


def _first_paragraph(doc: str | None) -> str:
    text = inspect.cleandoc(doc or "").split("\n\n")[0]
    return " ".join(text.split())


def error_codes() -> list[dict[str, Any]]:
    """Every error code of :mod:`app.errors`, sorted by status then code.

    Returns:
        One dict per distinct ``code``: ``code``, ``status`` (int), ``classes`` (names), ``meaning`` (the first
        paragraph of the first class's docstring) and ``advice`` (``None`` when :data:`ADVICE` lacks it).
    """
    import app.errors as errors

    found: dict[str, dict[str, Any]] = {}
    for name, cls in vars(errors).items():
        if not (isinstance(cls, type) and issubclass(cls, errors.StanceServeError)):
            continue
        row = found.setdefault(cls.code, {"code": cls.code, "status": cls.status_code, "classes": [],
                                          "meaning": FRAMEWORK_MEANING.get(cls.code) or _first_paragraph(cls.__doc__),
                                          "advice": ADVICE.get(cls.code)})
        row["classes"].append(name)
    for status, code in errors._HTTP_CODES.items():
        found.setdefault(code, {"code": code, "status": status, "classes": [],
                                "meaning": FRAMEWORK_MEANING.get(code, ""), "advice": ADVICE.get(code)})
    return sorted(found.values(), key=lambda r: (r["status"], r["code"]))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_error_codes() -> str:
    """The Markdown table of :func:`error_codes`."""
    lines = ["| status | `code` | meaning | what to do |", "|---|---|---|---|"]
    for r in error_codes():
        meaning = _cell(r["meaning"].replace("``", "`"))
        lines.append(f"| {r['status']} | `{r['code']}` | {meaning} | {_cell(r['advice'] or '')} |")
    return "\n".join(lines)


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        parts = [_type(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(parts) + (" or null" if len(parts) < len(schema["anyOf"]) else "")
    if "const" in schema:
        return f"`{schema['const']!r}`"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    t = schema.get("type", "any")
    if t == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if t == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return f"object of {_type(schema['additionalProperties'])}"
    return str(t)


def _range(schema: dict[str, Any]) -> str:
    for s in schema.get("anyOf", [schema]):
        bits = []
        for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
            if key in s and abs(s[key]) < 1e15:
                v = s[key]
                bits.append(f"{sign} {int(v) if float(v).is_integer() else v}")
        for key, what in (("maxLength", "chars ≤"), ("maxItems", "items ≤")):
            if key in s:
                bits.append(f"{what} {s[key]}")
        if bits:
            return ", ".join(bits)
    return ""


def _fields(schema: dict[str, Any]) -> list[str]:
    props = schema.get("properties", {})
    if not props:
        return []
    required = set(schema.get("required", []))
    lines = ["| field | type | range | default | meaning |", "|---|---|---|---|---|"]
    for name, s in props.items():
        default = "required" if name in required else (f"`{s['default']!r}`" if "default" in s else "")
        lines.append(f"| `{name}` | {_cell(_type(s))} | {_range(s)} | {_cell(default)} | "
                     f"{_cell(s.get('description', ''))} |")
    return lines


def render_routes(spec: dict[str, Any] | None = None) -> str:
    """Markdown for every route of the OpenAPI ``spec`` (default: the app's own)."""
    if spec is None:
        from app.main import create_app

        spec = create_app().openapi()
    schemas = spec.get("components", {}).get("schemas", {})
    out: list[str] = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            out += [f"### `{method.upper()} {path}`", "", op.get("summary", ""), ""]
            if op.get("description"):
                out += [inspect.cleandoc(op["description"]).replace("``", "`"), ""]
            params = op.get("parameters", [])
            if params:
                out += ["| parameter | in | type | meaning |", "|---|---|---|---|"]
                out += [f"| `{p['name']}` | {p['in']} | {_type(p.get('schema', {}))} | "
                        f"{_cell(p.get('description', ''))} |" for p in params]
                out.append("")
            body = op.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                schema = content.get("schema", {})
                name = _type(schema)
                schema = schemas.get(name, schema)
                out += [f"Request body (`{media}`, {name}):", ""]
                out += _fields(schema) or ["(see the description)"]
                out.append("")
            out += ["| status | when |", "|---|---|"]
            out += [f"| {code} | {_cell(r.get('description', ''))} |" for code, r in op.get("responses", {}).items()]
            out.append("")
    return "\n".join(out)


GENERATORS = {"http-routes": render_routes, "error-codes": render_error_codes}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each ``<!-- generated: NAME -->`` line with the output of ``GENERATORS[NAME]``."""

    def sub(m: re.Match) -> str:
        if m.group(1) not in GENERATORS:
            raise ValueError(f"{page.file.src_uri}: unknown generated block {m.group(1)!r}")
        return GENERATORS[m.group(1)]()

    return MARK.sub(sub, markdown)
