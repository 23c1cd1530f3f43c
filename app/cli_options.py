"""Command-line options generated from configuration models, so each option is declared once.

:func:`settings_options` turns the fields of a pydantic settings model
(:class:`app.config.Settings`) into typer options whose default is "not given",
so that an unset flag falls back to the environment and then to the field's
default; :func:`dataclass_options` does the same for a dataclass of
hyperparameters (``training.trainers.TrainConfig``), with its real defaults.
Help texts are the field descriptions (pydantic ``description``, dataclass
``metadata["help"]`` or the class docstring's ``Attributes:`` entry).
:func:`with_options` appends the generated options to a command function's
signature, which typer reads. Sequences (``list``/``tuple`` fields) are given
comma-separated; :func:`from_cli` turns them back into sequences.

This module imports neither :mod:`app.cli` nor any model code (only the light
:mod:`app.config`): command modules import it without importing the
``stanceserve`` command line a second time.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined
from rich.markup import escape

from app.config import show_value

F = TypeVar("F", bound=Callable[..., Any])

_SCALARS = (bool, int, float, str, Path)


def _strip_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (and ``Annotated[X, ...]`` -> ``X``)."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return annotation


def is_sequence(annotation: Any) -> bool:
    """Whether a field of this type is a list or tuple (given comma-separated on the command line)."""
    return typing.get_origin(_strip_optional(annotation)) in (list, tuple)


def _option_type(annotation: Any) -> Any:
    """The type typer sees for a field: scalars and ``Literal`` choices as they are, sequences and secrets as text."""
    ann = _strip_optional(annotation)
    if typing.get_origin(ann) is Literal or ann in _SCALARS:
        return ann
    if is_sequence(ann) or ann is SecretStr:
        return str
    raise TypeError(f"no command-line type for {annotation!r}")


def _help(text: str) -> str:
    """A field description as rich help: one line, ``rst`` literals as plain backticks, markup escaped."""
    return escape(" ".join(text.replace("``", "`").split()))


def _parameter(
    name: str, annotation: Any, default: Any, help_text: str, show_default: str | bool, panel: str | None
) -> inspect.Parameter:
    py_type = _option_type(annotation)
    kind = py_type if default is not None else py_type | None
    option = typer.Option(help=_help(help_text), show_default=show_default, rich_help_panel=panel)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option])


def _pydantic_default(field: Any) -> Any:
    """A pydantic field's default, calling its ``default_factory`` if it has one."""
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def settings_options(
    model: type[BaseModel],
    *,
    env_prefix: str = "",
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    panel: str | None = None,
) -> list[inspect.Parameter]:
    """One option per field of ``model`` (``--max-loras`` for ``max_loras``), all defaulting to ``None``.

    ``None`` means "not given": build the model from the non-``None`` values only and the field falls back to
    its environment variable (``env_prefix`` + name, upper case, named in the help) and then to its default
    (shown in the help). ``only`` restricts and orders the fields; ``skip`` leaves some out; ``panel`` names
    the help section they are listed in.
    """
    fields = model.model_fields
    names = list(only) if only is not None else [n for n in fields if n not in set(skip)]
    params = []
    for name in names:
        f = fields[name]
        env = f" Env: {env_prefix}{name.upper()}." if env_prefix else ""
        params.append(_parameter(name, f.annotation, None, f"{f.description or ''}{env}", show_value(_pydantic_default(f)), panel))
    return params


_ATTRIBUTE = re.compile(r"^(\s*)([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s*(.*)$")


def attribute_docs(cls: type) -> dict[str, str]:
    """Field help from a Google-style ``Attributes:`` docstring section.

    ``name: text`` documents one field; ``a, b: text`` documents both (each gets ``a, b: text``).
    Indented lines continue the entry above; the section ends at a blank or less indented line.
    """
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
    except StopIteration:
        return {}
    docs: dict[str, str] = {}
    current: list[str] = []
    indent = None
    for line in lines[start:]:
        if not line.strip():
            break
        m = _ATTRIBUTE.match(line)
        if m and (indent is None or len(m.group(1)) <= indent):
            indent = len(m.group(1))
            current = [n.strip() for n in m.group(2).split(",")]
            text = m.group(3).strip()
            for n in current:  # a shared entry keeps its list of names, so each option's help still reads right
                docs[n] = f"{', '.join(current)}: {text}" if len(current) > 1 else text
        elif current and indent is not None and len(line) - len(line.lstrip()) > indent:
            for n in current:
                docs[n] += " " + line.strip()
        else:
            break
    return docs


def dataclass_options(
    cls: type, *, extra_help: Mapping[str, str] | None = None, panel: str | None = None
) -> list[inspect.Parameter]:
    """One option per field of the dataclass ``cls``, with the field's default.

    Help comes from ``field.metadata["help"]``, else the class docstring's ``Attributes:`` entry, else
    ``extra_help``; a field with none raises ``ValueError`` (so every option is documented).
    """
    hints = typing.get_type_hints(cls)
    docs = {**(extra_help or {}), **attribute_docs(cls)}
    params = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        help_text = f.metadata.get("help") or docs.get(f.name)
        if not help_text:
            raise ValueError(f"{cls.__name__}.{f.name} has no help text")
        if is_sequence(hints[f.name]):
            help_text += " Comma-separated."
            default = ",".join(map(str, default)) if default is not None else None
        params.append(_parameter(f.name, hints[f.name], default, help_text, default is not None, panel))
    return params


def from_cli(model: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The given values (``None`` dropped), comma-separated sequences split into lists/tuples per ``model``'s types."""
    hints = typing.get_type_hints(model)
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, str) and is_sequence(hints[name]):
            items = [v.strip() for v in value.split(",") if v.strip()]
            value = tuple(items) if typing.get_origin(_strip_optional(hints[name])) is tuple else items
        out[name] = value
    return out


def with_options(params: Iterable[inspect.Parameter]) -> Callable[[F], F]:
    """Decorator: append ``params`` to a command's signature; the function receives them in ``**kwargs``.

    The function's own parameters (typer ``Annotated`` options) come first; its ``**kwargs`` is replaced.
    """
    extra = list(params)

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        clash = {p.name for p in own} & {p.name for p in extra}
        if clash:
            raise ValueError(f"options declared twice: {sorted(clash)}")
        func.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return func

    return decorate
