"""Pieces every training command shares: failing with a message, keeping existing outputs, the recorded command
line, the admin key, and finding adapters and run folders before any model loads.

Used by :mod:`training.cli` only. Each failure prints ``error: ...`` on stderr and exits with status 1
(:func:`fail`); nothing here trains, evaluates or writes an output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from app.errors import AdapterLookupError
from app.redaction import redact_command
from training.adapter_lookup import resolve_adapter
from training.outputs import OutputExistsError, check_dir, check_file
from training.register import RegistrationError, admin_key_from

console = Console(stderr=True)  # progress and errors


def given_on_command_line(ctx: typer.Context) -> Any:
    """``given(name)``: whether the option ``name`` was set on the command line or by its environment variable."""

    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)  # an enum of the click typer runs on (typer may vendor its own)
        return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")

    return given


def fail(message: str) -> None:
    """Print ``error: MESSAGE`` on stderr and exit with status 1 (``typer.Exit``)."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(1)


def free_file(path: Path, overwrite: bool, option: str = "--out") -> Path:
    """``path``, or exit 1 when it exists and ``--overwrite`` was not given (:func:`training.outputs.check_file`)."""
    try:
        return check_file(path, overwrite=overwrite, option=option)
    except OutputExistsError as e:
        fail(str(e))
        raise  # unreachable


def free_dir(path: Path, overwrite: bool, option: str = "--out") -> Path:
    """``path``, or exit 1 when it holds anything and ``--overwrite`` was not given (:func:`training.outputs.check_dir`)."""
    try:
        return check_dir(path, overwrite=overwrite, option=option)
    except OutputExistsError as e:
        fail(str(e))
        raise  # unreachable


def read_admin_key(key: str | None, key_file: Path | None) -> str | None:
    """The admin key for ``--register`` (``--admin-key-file``, else ``--admin-key`` / ``$STANCESERVE_ADMIN_KEY``).

    Warns when the key itself was typed on the command line (where ``ps`` and shell history show it).
    """
    if key_file is None and any(a == "--admin-key" or a.startswith("--admin-key=") for a in sys.argv):
        console.print("[yellow]warning:[/yellow] --admin-key on the command line is visible to other local users "
                      "and kept in shell history; prefer STANCESERVE_ADMIN_KEY or --admin-key-file "
                      "(the key is never recorded either way)", soft_wrap=True)
    try:
        return admin_key_from(key, key_file)
    except RegistrationError as e:
        fail(str(e))
        raise  # unreachable


def recorded_command(command: str) -> str | None:
    """``stanceserve COMMAND ...`` as run (from ``sys.argv``), secret option values redacted; None if unknown."""
    return redact_command(["stanceserve", command, *sys.argv[2:]]) if len(sys.argv) > 2 else None


def run_folder(run: Path) -> Path:
    """A ``--compare`` argument as a folder: the path if it exists, else the adapter of that name (store, then
    shipped: :func:`training.adapter_lookup.resolve_adapter`), else the path as given (for the error message)."""
    if run.exists():
        return run
    try:
        return resolve_adapter(str(run))
    except AdapterLookupError:
        return run


def check_local_adapters(adapters: list[str], adapters_dir: Path | None) -> None:
    """Fail (exit 1, naming every folder looked at) unless each adapter resolves locally, before the model loads."""
    for a in adapters:
        try:
            resolve_adapter(a, adapters_dir)
        except AdapterLookupError as e:
            fail(e.message)


def parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} must be comma-separated numbers, got {text!r}")
        raise  # unreachable
