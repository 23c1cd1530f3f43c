"""Secrets out of everything stanceserve records: which command-line options are secret, and redaction.

The one place that says which options carry a secret: :data:`SECRET_OPTIONS` names them
(``--admin-key``), and :func:`is_secret_option` adds every option whose last word is
``key``, ``token``, ``password``, ``passwd``, ``secret`` or ``credentials`` (so
``--api-key`` or ``--hf-token`` of a later command are covered without an edit here).
Options that name a *file* holding a secret (``--admin-key-file``) are not secret: the
path is recorded, the file's content never is.

Everything that records a command line (``training_metrics.json``, reports, comparison
tables, adapter metadata) goes through :func:`redact_argv` / :func:`redact_command`;
JSON written or stored goes through :func:`redact_json`, which also replaces any known
secret *value* (the admin key in use) wherever it appears in a string. The server uses the
same functions on uploaded metadata (:meth:`app.catalog.StanceCatalog.register_upload`)
and on the metadata it serves.

Pure functions over strings and JSON values: no I/O, no logging of the values they hide.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: What a secret is replaced with.
REDACTED = "***"

#: Options whose value is a secret, by name (long form, with the dashes).
SECRET_OPTIONS: frozenset[str] = frozenset({"--admin-key"})

#: An option is secret when its last word is one of these (``--api-key``, ``--hf-token``, ``--db-password``).
_SECRET_WORD = re.compile(r"^--(?:[a-z0-9]+-)*(?:key|token|password|passwd|secret|credentials?)$", re.IGNORECASE)

#: A secret shorter than this is not searched for inside other text (it would hide ordinary words).
MIN_SECRET_LENGTH = 4


def is_secret_option(option: str) -> bool:
    """Whether the value of the long option ``option`` (``--admin-key``, with dashes) is a secret.

    ``--admin-key-file`` and other ``...-file`` / ``...-path`` options are not: their value names a file.
    """
    name = option.split("=", 1)[0].strip().replace("_", "-")
    return name in SECRET_OPTIONS or _SECRET_WORD.fullmatch(name) is not None


def _replace_values(text: str, secrets: Iterable[str]) -> str:
    for s in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True):
        text = text.replace(s, REDACTED)
    return text


def redact_argv(argv: Sequence[str], secrets: Iterable[str] = ()) -> list[str]:
    """``argv`` with the value of every secret option replaced by :data:`REDACTED`.

    Both forms are handled: ``--admin-key VALUE`` (the next argument is replaced) and ``--admin-key=VALUE``.
    Any argument containing one of ``secrets`` (known secret values, e.g. the admin key in use) has it
    replaced too, wherever it appears.
    """
    secrets = list(secrets)
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("--") and is_secret_option(arg):
            if "=" in arg:
                out.append(arg.split("=", 1)[0] + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(_replace_values(arg, secrets))
    return out


def redact_command(argv: Sequence[str], secrets: Iterable[str] = ()) -> str:
    """The shell-quoted command line of :func:`redact_argv` (``argv[0]`` included as given)."""
    return " ".join(shlex.quote(a) for a in redact_argv(argv, secrets))


_IN_TEXT = re.compile(r"""(?P<opt>--[A-Za-z0-9][A-Za-z0-9_-]*)(?P<sep>=|\s+)(?P<val>'[^']*'|"[^"]*"|(?!--)\S+)""")


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` (a recorded command line, a log line) with secret option values and known secrets replaced.

    Reads ``--admin-key VALUE``, ``--admin-key=VALUE`` and quoted values inside free text; used where the
    command is only available as a string (metadata uploaded by an older client).
    """

    def hide(m: re.Match[str]) -> str:
        if not is_secret_option(m.group("opt")):
            return m.group(0)
        return f"{m.group('opt')}{m.group('sep')}{REDACTED}"

    return _replace_values(_IN_TEXT.sub(hide, text), secrets)


def redact_json(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of the JSON value ``value`` with every string passed through :func:`redact_text`.

    Object keys that are secret option names (``"admin_key"``, ``"--admin-key"``, ``"token"``...) get their
    value replaced whole. Non-string scalars are kept.
    """
    secrets = [s for s in secrets if s]
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = redact_text(str(k), secrets)
            if v is not None and is_secret_option("--" + str(k).lstrip("-").replace("_", "-")):
                out[key] = REDACTED
            else:
                out[key] = redact_json(v, secrets)
        return out
    if isinstance(value, (list, tuple)):
        return [redact_json(v, secrets) for v in value]
    return value


def contains_secret(value: Any, secrets: Iterable[str]) -> bool:
    """Whether any string (or object key) in the JSON value ``value`` contains one of ``secrets``."""
    secrets = [s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH]
    if not secrets:
        return False
    if isinstance(value, str):
        return any(s in value for s in secrets)
    if isinstance(value, Mapping):
        return any(contains_secret(str(k), secrets) or contains_secret(v, secrets) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(contains_secret(v, secrets) for v in value)
    return False
