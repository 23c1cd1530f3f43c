"""The ``stanceserve`` command line.

Commands defined here:

* ``stanceserve serve``: start the HTTP service (uvicorn + :func:`app.main.create_app`).
  Flags mirror :class:`app.config.Settings`; a flag left out falls back to its
  ``STANCESERVE_*`` environment variable, then to the default.
* ``stanceserve fetch-model``: download and cache the embedded base model, so that
  the first ``serve`` starts in about a second.

Other modules add their own commands (``train``, ``eval``, ``inspect``, ``bench``)
through :data:`COMMAND_MODULES`, see the end of this file. This module does no
model or HTTP work itself: heavy imports happen inside the command functions so
``stanceserve --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    name="stanceserve",
    help="Serve one base causal LM with per-request LoRA adapters (stances) and blends.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)  # progress and errors
out = Console()  # results (stdout)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(version("stanceserve"))
        except PackageNotFoundError:
            typer.echo("unknown (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """stanceserve: one resident base model, a LoRA stance (or a blend) per request."""


def _settings(**given: Any):
    """Build :class:`Settings` from the flags actually given (``None`` = not given).

    Exits with status 2 and a readable message on invalid values.
    """
    from pydantic import ValidationError

    from app.config import Settings

    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            console.print(f"[red]invalid {field}:[/red] {err.get('msg')} (got {err.get('input')!r})")
        raise typer.Exit(2) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


@app.command()
def serve(
    model: Annotated[
        str | None, typer.Option(help="HF causal LM id or local folder (default: the embedded SmolLM2-135M-Instruct).")
    ] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Name clients use for the base model.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (auto: cuda when available).")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: bfloat16 on cuda, float32 on cpu).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8000).")] = None,
    adapters_dir: Annotated[Path | None, typer.Option(help="The on-disk adapter store (default ./adapters).")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache of the embedded model (default ~/.cache/stanceserve).")
    ] = None,
    max_loras: Annotated[int | None, typer.Option(help="Adapter slots resident on the compute device.")] = None,
    max_cpu_loras: Annotated[
        int | None, typer.Option(help="Parsed adapters kept in CPU memory (default: all); the rest are read from disk.")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Most sequences decoded in one step.")] = None,
    prefill_chunk_tokens: Annotated[
        int | None, typer.Option(help="Most (padded) prompt tokens prefilled per engine step.")
    ] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="Largest LoRA rank accepted.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug | info | warning | error.")] = None,
) -> None:
    """Start the HTTP service. Unset flags come from STANCESERVE_* variables, then defaults."""
    settings = _settings(
        model=model,
        served_model_name=served_model_name,
        device=device,
        dtype=dtype,
        host=host,
        port=port,
        adapters_dir=adapters_dir,
        cache_dir=cache_dir,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_batch_size=max_batch_size,
        prefill_chunk_tokens=prefill_chunk_tokens,
        max_lora_rank=max_lora_rank,
        log_level=log_level,
    )
    _setup_logging(settings.log_level)

    import uvicorn

    from app.main import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # the client address must stay the TCP peer: app.deps reads proxy headers itself, from trusted_proxies only
        proxy_headers=False,
    )


@app.command("fetch-model")
def fetch_model(
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache root (default: STANCESERVE_CACHE_DIR or ~/.cache/stanceserve).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error.")] = "info",
) -> None:
    """Download and cache the embedded SmolLM2-135M-Instruct (a no-op when already cached)."""
    settings = _settings(cache_dir=cache_dir)
    _setup_logging(log_level)

    from app.engine.model_loader import embedded_model_dir, fetch_embedded_model, is_complete_model_dir
    from app.errors import ModelLoadError

    target = embedded_model_dir(settings.cache_dir)
    cached = is_complete_model_dir(target)
    if not cached:
        console.print(
            f"Fetching the embedded model into [bold]{target}[/bold] (download ~93 MB, convert ~20 s)...", soft_wrap=True
        )
    t0 = time.perf_counter()
    try:
        path = fetch_embedded_model(settings.cache_dir)
    except ModelLoadError as exc:
        console.print(f"[red]fetch-model failed:[/red] {exc.message}", soft_wrap=True)
        raise typer.Exit(1) from None
    seconds = time.perf_counter() - t0
    size_mb = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20
    state = "already cached" if cached else f"fetched in {seconds:.1f} s"
    out.print(f"[green]embedded model {state}[/green]: {path} ({size_mb:.0f} MiB)", soft_wrap=True)


# --------------------------------------------------------------------------- #
# Commands from other modules.
#
# A module listed in COMMAND_MODULES adds its commands to `app` when imported,
# in either way:
#
#     # training/cli.py
#     from app.cli import app
#
#     @app.command()
#     def train(...): ...            # -> stanceserve train
#
#     # or a group:  sub = typer.Typer(help="...");  app.add_typer(sub, name="bench")
#
# Adding a command module (e.g. for `inspect` or `bench`) is one line below. A
# listed module that does not exist yet is skipped; an import error *inside* an
# existing module is raised. The modules are imported when this one is, so
# `from app.cli import app` always has every command (CliRunner tests too). Keep
# torch/transformers/trl imports inside the command functions so that
# `stanceserve --help` stays fast.
# --------------------------------------------------------------------------- #
COMMAND_MODULES: tuple[str, ...] = (
    "app.bench.cli",  # bench
    "training.cli",  # train, eval, inspect
)


def _load_command_modules() -> None:
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main() -> None:
    """Entry point of the ``stanceserve`` console script."""
    app()


if __name__ == "__main__":
    # Run as `python -m app.cli`: hand over to the importable module `app.cli`,
    # on whose `app` the command modules register.
    from app.cli import main as _main

    _main()
else:
    _load_command_modules()
