"""``stanceserve train | eval | inspect | scheduling-data | export-blend``: the researcher's loop on the command line.

A typer app of its own, run by the thin commands of :mod:`app.cli` (which import
this module only when one of these commands runs, so the server never imports
``training``). ``train``'s hyperparameter options are generated from
:class:`training.trainers.TrainConfig` (defaults and help from its fields, see
:func:`app.cli_options.dataclass_options`); its run options (data, output,
device, registration) are declared here. Everything the commands use is imported at
the top of this module; TRL, ``datasets`` and matplotlib load only inside the functions of
:mod:`training.trainers`, :mod:`training.compare`, :mod:`training.inspect_adapter` and
:mod:`training.sweep_report` that use them, so a command that does not train or plot
never imports them. Results go to stdout as JSON (or a rich table for ``inspect``);
progress and errors to stderr. This module does not import :mod:`app.cli`.
"""

from __future__ import annotations

import contextlib
import inspect as _inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.cli_options import dataclass_options, from_cli, with_options
from app.config import EMBEDDED_MODEL, Settings
from app.errors import AdapterLookupError
from app.model_loader import load_base_model
from training import quick as presets
from training.adapter_lookup import resolve_adapter, store_help
from training.cli_support import (
    check_local_adapters,
    console,
    fail,
    free_dir,
    free_file,
    given_on_command_line,
    parse_floats,
    read_admin_key,
    recorded_command,
    run_folder,
)
from training.compare import (
    COLUMNS,
    RunError,
    compare_table,
    load_run,
    plot_compare,
    table_cells,
    write_compare_markdown,
)
from training.datasets import DatasetError, load_probes, load_reference_answers
from training.evaluate import BASE, HttpGenerator, LocalGenerator, evaluate_stance, runtime_of
from training.export_blend import export_blend, parity, parse_stances
from training.inspect_adapter import adapter_update_norms, norms_table, plot_heatmap
from training.outputs import default_out
from training.progress import ProgressGenerator, progress_bars
from training.quick import QUICK_DATA, QUICK_STANCE
from training.register import RegistrationError, register_adapter
from training.scoring import MARKERS, LikelihoodScorer
from training.sweep import TS as SWEEP_TS, WEIGHTS as SWEEP_WEIGHTS, run_sweep, write_answers
from training.sweep_report import curve_filename, plot_curve, write_sweep_report
from training.tasks import scheduling_eval as se
from training.tasks.scheduling import generate, to_sft_rows, write_jsonl
from training.tasks.scheduling_eval import check_disjoint
from training.tasks.sweep_trace import STYLES, to_trace_sft_rows
from training.trainers import TrainConfig, train_adapter

app = typer.Typer(name="stanceserve", add_completion=False, pretty_exceptions_show_locals=False)
#: The stances of the shipped adapters (app.registry.seed.shipped_adapters_dir), each with held-out probes.
SHIPPED = ("curious-uncertainty", "confident-expertise", "engaged-difficulty")
STANCE_DATA = Path(__file__).resolve().parent / "data" / "stances"

#: Help of the TrainConfig fields its docstring does not document.
# TODO(training.trainers owner): move these into TrainConfig (field(metadata={"help": ...}) or its docstring).
_EXTRA_HELP = {
    "method": "sft (supervised fine-tuning) or dpo (preference pairs).",
    "max_steps": "Stop after this many optimizer steps (-1: run all epochs).",
}
#: train_adapter's own defaults (device, dtype), so they are declared once, there.
_RUN_DEFAULTS = {n: p.default for n, p in _inspect.signature(train_adapter).parameters.items()}


_DTYPE_HELP = ("float32 | bfloat16 | float16 | auto (the server's rule: bfloat16 on CUDA and on CPUs with native "
               "bf16, else float32; the dtype used is recorded in every output).")


_OVERWRITE_HELP = "Replace outputs that exist already (by default an existing output is kept and the command stops)."


@app.command()
@with_options(dataclass_options(TrainConfig, extra_help=_EXTRA_HELP, panel="Hyperparameters (TrainConfig)"))
def train(
    ctx: typer.Context,
    runs: Annotated[list[Path] | None, typer.Argument(help="With --compare: run folders (each with training_metrics.json) or adapter names (store, then shipped).",
                                                       show_default=False)] = None,
    data: Annotated[Path | None, typer.Option(help="JSONL dataset (SFT: messages or prompt/completion; DPO: prompt/chosen/rejected).")] = None,
    name: Annotated[str | None, typer.Option(help="Stance name (the adapter's name on the server).")] = None,
    quick: Annotated[bool, typer.Option(
        help="A first run in about a minute on 2 CPU cores: 8 DPO steps (--max-steps 8 --batch-size 2 --grad-accum 1 "
             "--max-length 192 --lr 1e-3 --no-precompute-ref --no-gradient-checkpointing), on the shipped curious-uncertainty data unless --data "
             "is given. Options you give win.")] = False,
    compare: Annotated[bool, typer.Option(
        help="Compare finished runs instead of training: stanceserve train --compare runs/a runs/b ... "
             "(overlaid curves PNG + table; --out is the output folder, default runs/compare).")] = False,
    base: Annotated[str | None, typer.Option(help="HF causal LM id or path (default: the embedded SmolLM2 the server uses).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/NAME; must be missing or empty "
                                                  "unless --overwrite).")] = None,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = _RUN_DEFAULTS["device"],
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = _RUN_DEFAULTS["dtype"],
    register: Annotated[str | None, typer.Option(help="Upload the result to this server URL, e.g. http://127.0.0.1:8000.")] = None,
    admin_key_file: Annotated[Path | None, typer.Option(
        help="With --register: a file whose first line is the server's admin key (preferred, with "
             "STANCESERVE_ADMIN_KEY).")] = None,
    admin_key: Annotated[str | None, typer.Option(
        help="With --register: the admin key itself. Prefer STANCESERVE_ADMIN_KEY or --admin-key-file: a key on "
             "the command line is readable by other local users (ps) and stays in shell history. Never recorded.",
        envvar="STANCESERVE_ADMIN_KEY", show_envvar=True)] = None,
    description: Annotated[str | None, typer.Option(help="Description stored with the adapter.")] = None,
    replace: Annotated[bool, typer.Option(help="With --register: replace an existing adapter of that name.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    **hyperparameters: Any,
) -> None:
    """Train a LoRA stance adapter with TRL (SFT or DPO) and optionally register it with a running server
    (or, with --compare, compare finished runs)."""
    if compare:
        out = out or default_out("compare")
        for f in ("compare.md", "compare.png"):
            free_file(out / f, overwrite)
        _compare(runs or [], out)
        return
    if runs:
        fail(f"unexpected arguments {[str(r) for r in runs]} (run folders go with --compare)")
    if quick:
        presets.apply(presets.TRAIN, hyperparameters, given_on_command_line(ctx))
        if data is None:
            data = QUICK_DATA
            console.print(f"quick run: DPO on the shipped {QUICK_STANCE} data ({data})", soft_wrap=True)
    if data is None or name is None:
        fail("give --data and --name (or --quick --name NAME, or --compare RUN...)")
    cfg = TrainConfig(**from_cli(TrainConfig, hyperparameters))
    out_dir = free_dir(out or default_out(name), overwrite)
    key = read_admin_key(admin_key, admin_key_file) if register else None
    try:
        # the trainer prints its log lines to stdout: keep stdout for the JSON result
        with contextlib.redirect_stdout(sys.stderr):
            result = train_adapter(data, name, out_dir, cfg, base=base, device=device, dtype=dtype, progress=not quiet,
                                   secrets=[key] if key else ())
    except DatasetError as e:
        fail(str(e))
    summary = result.metrics["summary"]
    report = {"adapter_dir": str(result.out_dir), "summary": summary,
              "trainable_parameters": result.metrics["parameters"]["trainable"]}
    if register:
        try:
            report["registered"] = register_adapter(register, name, result.out_dir, admin_key=key,
                                                    description=description or f"{cfg.method} stance adapter {name}",
                                                    replace=replace)
        except RegistrationError as e:
            fail(str(e))
    typer.echo(json.dumps(report, indent=2))


def _compare(runs: list[Path], out: Path) -> None:
    """``train --compare``: table (stderr, Markdown, JSON on stdout) and overlaid curves of finished runs."""
    if len(runs) < 1:
        fail("--compare needs at least one run folder")
    try:
        loaded = [load_run(run_folder(r)) for r in runs]
    except RunError as e:
        fail(str(e))
    rows = compare_table(loaded)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_compare(loaded, out / "compare.png", title=f"{len(runs)} training runs")
    command = recorded_command("train")
    md = write_compare_markdown(out / "compare.md", rows, png, command)
    table = Table(*COLUMNS, title="training runs")
    for r in rows:
        table.add_row(*table_cells(r))
    console.print(table)
    typer.echo(json.dumps({"png": str(png), "markdown": str(md), "runs": rows}, indent=2))


@app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    adapter: Annotated[str | None, typer.Option(
        help="With --url: an adapter name on that server. Locally: a peft folder path, else a name in "
             "--adapters-dir, else a shipped adapter's name.")] = None,
    probes: Annotated[Path | None, typer.Option(
        help="JSONL probe prompts (field 'prompt'); default: the held-out probes of the stance, for a shipped "
             "stance.")] = None,
    quick: Annotated[bool, typer.Option(
        help="A first evaluation in about a minute on 2 CPU cores: the first 8 probes, --max-tokens 48; with "
             "--sweep: 2 stances, --weights 0,0.5,1 --ts 0,0.5,1 --probes-per-stance 3 --max-tokens 32 "
             "--resamples 200. Options you give win.")] = False,
    stance: Annotated[str | None, typer.Option(help="Stance the scorers measure (default: the adapter's name, if a known stance).")] = None,
    task: Annotated[str | None, typer.Option(help="'scheduling' for the meeting-room task instead of probes.")] = None,
    n: Annotated[int, typer.Option(help="Scheduling problems.")] = 150,
    seed: Annotated[int, typer.Option(help="Scheduling generator seed.")] = 123,
    url: Annotated[str | None, typer.Option(help="Evaluate through a running server at this URL instead of loading the model.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model for local evaluation (default: embedded SmolLM2).")] = None,
    adapters_dir: Annotated[Path | None, typer.Option(help=store_help() + " Ignored with --url.",
                                                      show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 96,
    likelihood: Annotated[bool, typer.Option(help="Also run the likelihood-based stance scorer (loads the base model).")] = True,
    out: Annotated[Path | None, typer.Option(
        help="Report (Markdown) or result (JSON) path (default runs/eval/ADAPTER.md; with --sweep a folder, default "
             "runs/sweep).")] = None,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
    reference: Annotated[Path | None, typer.Option(
        help="Training JSONL whose chosen answers (DPO) or completions (SFT) calibrate the scorers.")] = None,
    sweep: Annotated[bool, typer.Option(
        help="Blend response curves: sweep each stance's weight and each pair's interpolation (writes --out DIR).")] = False,
    stances: Annotated[str, typer.Option(
        help="--sweep: comma-separated adapter names, each a scored stance (looked up like --adapter).")] = ",".join(SHIPPED),
    probes_per_stance: Annotated[int, typer.Option(
        help="--sweep without --probes: the first N probes of each stance's training/data/stances/S/probes.jsonl.")] = 8,
    weights: Annotated[str, typer.Option(help="--sweep: stance weights.")] = ",".join(f"{w:g}" for w in SWEEP_WEIGHTS),
    ts: Annotated[str, typer.Option(help="--sweep: t of (1-t)·A + t·B for each pair.")] = ",".join(f"{t:g}" for t in SWEEP_TS),
    pairs: Annotated[bool, typer.Option(help="--sweep: also sweep every pair of stances.")] = True,
    resamples: Annotated[int, typer.Option(help="--sweep: bootstrap resamples for the CIs.")] = 2000,
    batch: Annotated[int, typer.Option(help="Local engine batch size (sequences per decode step).")] = 16,
    device: Annotated[str, typer.Option(help="Local evaluation: cpu | cuda | auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = "auto",
    trace_style: Annotated[str, typer.Option(
        help="--task scheduling: the trace style the adapter was trained on (sweep or grid; "
             "only the 'trace all correct' column reads it).")] = "sweep",
    with_base: Annotated[bool, typer.Option(help="--task scheduling: also run the base model.")] = True,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Compare an adapter with the base model: stance probes (report) or the scheduling task (accuracy),
    or (--sweep) blend response curves of several stances."""
    probe_limit = None
    if quick:
        o = presets.apply(presets.SWEEP if sweep else presets.EVAL, {}, given_on_command_line(ctx))
        stances, weights, ts = o.get("stances", stances), o.get("weights", weights), o.get("ts", ts)
        probes_per_stance, resamples = o.get("probes_per_stance", probes_per_stance), o.get("resamples", resamples)
        max_tokens, probe_limit = o.get("max_tokens", max_tokens), o.get("probe_limit")
    if sweep:
        _sweep(stances=stances, probes=probes, per_stance=probes_per_stance, weights=weights, ts=ts, pairs=pairs,
               url=url, base=base, adapters_dir=adapters_dir, max_tokens=max_tokens, likelihood=likelihood,
               out=free_dir(out or default_out("sweep"), overwrite), resamples=resamples, batch=batch, quiet=quiet, device=device,
               dtype=dtype)
        return
    if task not in (None, "scheduling"):
        fail(f"unknown --task {task!r} (only 'scheduling')")
    if task is None and adapter is not None and probes is None:
        shipped_probes = STANCE_DATA / (stance or Path(adapter).name) / "probes.jsonl"
        if shipped_probes.is_file():
            probes = shipped_probes
            console.print(f"probes: the held-out probes of {shipped_probes.parent.name} ({probes})", soft_wrap=True)
    if task is None and (adapter is None or probes is None):
        fail("give --adapter and --probes (--probes may be left out for a shipped stance), or --task scheduling")
    if not url and adapter:
        check_local_adapters([adapter], adapters_dir)
    if out is not None:
        free_file(out, overwrite)
    elif task is None:
        out = free_file(default_out("eval", f"{Path(adapter).name}.md"), overwrite)
    raw = HttpGenerator(url) if url else LocalGenerator(base, adapters_dir=adapters_dir, max_batch_size=batch,
                                                        device=device, dtype=dtype)
    with contextlib.ExitStack() as stack:
        stack.callback(raw.close)
        gen = ProgressGenerator(raw, stack.enter_context(progress_bars(enabled=not quiet, console=console)))
        if task == "scheduling":
            if trace_style not in STYLES:
                fail(f"--trace-style must be one of {', '.join(STYLES)}, got {trace_style!r}")
            res = _scheduling_eval(gen, adapter, n=n, seed=seed, max_tokens=max(max_tokens, 360), out=out,
                                   style=trace_style, with_base=with_base)
        else:
            st = stance or Path(adapter).name
            if st not in MARKERS:
                fail(f"--stance must be one of {sorted(MARKERS)} (could not infer it from {adapter!r})")
            try:
                prompts = load_probes(probes)[:probe_limit]
                ref = load_reference_answers(reference) if reference else None
            except DatasetError as e:
                fail(str(e))
            lm = tok = None
            if likelihood:
                if isinstance(raw, LocalGenerator):  # idle engine: no adapter is routed, so this is the base model
                    lm, tok = raw.loaded.model, raw.loaded.tokenizer
                else:
                    loaded = load_base_model(Settings(model=base or EMBEDDED_MODEL, device=device, dtype=dtype))
                    lm, tok = loaded.model, loaded.tokenizer
            res = evaluate_stance(gen, adapter, prompts, st, report_path=out,
                                  max_tokens=max_tokens, likelihood_model=lm, likelihood_tokenizer=tok,
                                  reference=ref)
    typer.echo(json.dumps(res, indent=2))


def _sweep(*, stances: str, probes: Path | None, per_stance: int, weights: str, ts: str, pairs: bool, url: str | None,
           base: str | None, adapters_dir: Path | None, max_tokens: int, likelihood: bool, out: Path, resamples: int,
           batch: int, quiet: bool, device: str = "cpu", dtype: str = "auto") -> None:
    """``eval --sweep``: run :func:`training.sweep.run_sweep`, write JSON, answers, PNGs and the report into ``out``."""
    names = [s.strip() for s in stances.split(",") if s.strip()]
    bad = [s for s in names if s not in MARKERS]
    if bad or not names:
        fail(f"--stances must name scored stances ({sorted(MARKERS)}), got {bad or names}")
    try:
        if probes is not None:
            prompts = load_probes(probes)
        else:
            prompts = [p for s in names for p in load_probes(STANCE_DATA / s / "probes.jsonl")[:per_stance]]
    except DatasetError as e:
        fail(str(e))
    if not url:
        check_local_adapters(names, adapters_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = HttpGenerator(url) if url else LocalGenerator(base, adapters_dir=adapters_dir, max_batch_size=batch,
                                                        device=device, dtype=dtype)
    try:
        scorer = None
        lm = None
        if likelihood:
            if isinstance(gen, LocalGenerator):  # the engine is idle while scoring: no adapter is routed
                lm, tok = gen.loaded.model, gen.loaded.tokenizer
            else:
                loaded = load_base_model(Settings(model=base or EMBEDDED_MODEL, device=device, dtype=dtype))
                lm, tok = loaded.model, loaded.tokenizer
            scorer = LikelihoodScorer(lm, tok, batch_size=16)
        with progress_bars(enabled=not quiet, console=console) as new_task:
            result, answers = run_sweep(gen, names, prompts, weights=parse_floats(weights, "--weights"),
                                        ts=parse_floats(ts, "--ts"), pairs=pairs, max_tokens=max_tokens,
                                        likelihood_scorer=scorer, resamples=resamples, progress=new_task)
        result["runtime"] = runtime_of(gen, lm)
    finally:
        gen.close()
    pngs = {}
    for c in result["curves"]:
        path = plot_curve(c, result["scorers"], out / curve_filename(c["name"]))
        c["png"] = path.name
        pngs[c["name"]] = path.name
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    write_answers(out / "answers.jsonl", prompts, answers)
    command = recorded_command("eval")
    write_sweep_report(out / "sweep_report.md", result, prompts, answers, pngs=pngs, command=command)
    summary = {"out": str(out), "json": str(out / "sweep.json"), "report": str(out / "sweep_report.md"),
               "pngs": sorted(str(out / p) for p in pngs.values()),
               "spearman": {c["name"]: {s: {sc: round(t["rho_means"], 3) for sc, t in v.items()}
                                        for s, v in c["spearman"].items()} for c in result["curves"]}}
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def inspect(
    adapter: Annotated[str, typer.Argument(
        help="A peft folder path, else a name in --adapters-dir, else a shipped adapter's name.")],
    png: Annotated[Path | None, typer.Option(help="Heatmap path (default runs/inspect/NAME.png).")] = None,
    adapters_dir: Annotated[Path | None, typer.Option(help=store_help(), show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
) -> None:
    """Per-layer, per-projection norms of the adapter's weight update B·A (scaled), as a table and a heatmap."""
    try:
        folder = resolve_adapter(adapter, adapters_dir)
    except AdapterLookupError as e:
        fail(e.message)
    name = folder.resolve().name or "adapter"
    target = free_file(png or default_out("inspect", f"{name}.png"), overwrite, "--png")
    rows = adapter_update_norms(folder)
    Console().print(norms_table(rows))
    target.parent.mkdir(parents=True, exist_ok=True)
    path = plot_heatmap(rows, target, title=f"‖ΔW‖_F of {name}")
    console.print(f"heatmap: {path}")


def _scheduling_eval(gen: Any, adapter: str | None, *, n: int, seed: int, max_tokens: int,
                     out: Path | None, style: str = "sweep", with_base: bool = True) -> dict[str, Any]:
    """``eval --task scheduling``: base and adapter on the held-out problems, strict scoring; report or JSON."""
    if not with_base and not adapter:
        fail("--no-with-base needs --adapter")
    base = se.run(gen, BASE, n=n, seed=seed, max_tokens=max_tokens, style=style) if with_base else None
    ad = se.run(gen, adapter, n=n, seed=seed, max_tokens=max_tokens, style=style) if adapter else None
    keep = ("n", "accuracy", "lenient_accuracy", "unparsable", "trace_ok", "by_difficulty", "batches", "generation_s")
    res: dict[str, Any] = {"n": n, "seed": seed, "style": style, "runtime": runtime_of(gen)}
    if base:
        res["base"] = {k: base[k] for k in keep}
    if ad:
        res["adapter"] = {k: ad[k] for k in keep}
        res["adapter_name"] = adapter
    if out and out.suffix == ".md" and ad and base:
        se.write_report(out, adapter=ad, base=base, runtime=res["runtime"])
    elif out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    return res


@app.command("scheduling-data")
def scheduling_data(
    n: Annotated[int, typer.Option(help="Problems.")] = 100,
    seed: Annotated[int, typer.Option(help="Generator seed (refused if a problem is in the held-out seed-123 set).")] = 42,
    out: Annotated[Path, typer.Option(help="SFT JSONL to write.")] = default_out("scheduling-data", "train.sft.jsonl"),
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
    style: Annotated[str, typer.Option(help="trace: the sweep line step by step (training.tasks.sweep_trace); "
                                            "grid: every half hour 08:00-17:30 with its ends, starts and count; "
                                            "worked: a short free-text explanation.")] = "trace",
) -> None:
    """Write generated meeting-room problems with their answers as an SFT dataset."""
    if style not in ("trace", "grid", "worked"):
        fail(f"--style must be trace, grid or worked, got {style!r}")
    free_file(out, overwrite)
    problems = generate(n, seed)
    try:
        check_disjoint(problems)
    except ValueError as e:
        fail(str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = to_sft_rows(problems) if style == "worked" else to_trace_sft_rows(
        problems, "sweep" if style == "trace" else style)
    write_jsonl(rows, out)
    typer.echo(json.dumps({"out": str(out), "n": n, "seed": seed, "style": style}))


@app.command("export-blend")
def export_blend_cmd(
    stances: Annotated[str, typer.Option(
        help="The blend: adapter=weight,... (each a peft folder path, else a name in --adapters-dir, else a shipped "
             "adapter's name).")],
    out: Annotated[Path, typer.Option(help="Folder of the exported peft adapter (missing or empty unless --overwrite).")],
    method: Annotated[str, typer.Option(help="cat (exact, rank = sum of ranks) | svd (approximate, rank --rank).")] = "cat",
    rank: Annotated[int | None, typer.Option(help="svd: target rank (default: the largest member rank).")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the embedded SmolLM2).")] = None,
    adapters_dir: Annotated[Path | None, typer.Option(help=store_help(), show_default=False)] = None,
    check: Annotated[int, typer.Option(
        help="Then measure parity on the first N probes of the shipped stances: the exported adapter in plain peft "
             "vs the engine's live blend (max |logprob difference|, greedy agreement). 0: skip.")] = 0,
    overwrite: Annotated[bool, typer.Option(help=_OVERWRITE_HELP)] = False,
) -> None:
    """Write one ordinary peft LoRA adapter equal to a blend, for servers that cannot blend (vLLM, llama.cpp)."""
    free_dir(out, overwrite)
    try:
        weights = parse_stances(stances)
    except ValueError as e:
        fail(f"--stances: {e}")
    folders = {}
    for name in weights:
        try:
            folders[name] = resolve_adapter(name, adapters_dir)
        except AdapterLookupError as e:
            fail(e.message)
    loaded = load_base_model(Settings(model=base or EMBEDDED_MODEL, device="cpu", dtype="float32"))
    try:
        summary = export_blend(loaded.model, folders, weights, out, method=method, rank=rank)
    except ValueError as e:
        fail(str(e))
    summary.pop("per_module")
    if check > 0:
        prompts = [p for s in SHIPPED for p in load_probes(STANCE_DATA / s / "probes.jsonl")][:check]
        summary["parity"] = parity(loaded, folders, weights, out, prompts)
        full = json.loads((out / "export_blend.json").read_text())
        (out / "export_blend.json").write_text(json.dumps({**full, "parity": summary["parity"]}, indent=2) + "\n")
    typer.echo(json.dumps({"out": str(out), **summary}, indent=2))
