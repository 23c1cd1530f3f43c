"""``stanceserve train | eval | inspect | scheduling-data``: the researcher's loop on the command line.

Registered on the ``stanceserve`` typer app (see :data:`app.cli.COMMAND_MODULES`).
Heavy imports happen inside the commands. Results go to stdout as JSON (or a
rich table for ``inspect``); progress and errors to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli import app, console


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="JSONL dataset (SFT: messages or prompt/completion; DPO: prompt/chosen/rejected).")],
    name: Annotated[str, typer.Option(help="Stance name (the adapter's name on the server).")],
    method: Annotated[str, typer.Option(help="sft | dpo")] = "dpo",
    base: Annotated[str | None, typer.Option(help="HF causal LM id or path (default: the embedded SmolLM2 the server uses).")] = None,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 16,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scaling alpha/r).")] = 32.0,
    targets: Annotated[str, typer.Option(help="Comma-separated target modules.")] = "q_proj,k_proj,v_proj,o_proj",
    epochs: Annotated[float, typer.Option(help="Training epochs.")] = 5.0,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 5e-5,
    batch_size: Annotated[int, typer.Option(help="Per-step batch size.")] = 2,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 4,
    beta: Annotated[float, typer.Option(help="DPO beta.")] = 0.1,
    sft_weight: Annotated[float, typer.Option(help="DPO: weight of an extra NLL loss on the chosen answers (RPO); 0 = plain DPO.")] = 0.0,
    max_length: Annotated[int, typer.Option(help="Longest example in tokens.")] = 384,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimizer steps (-1: run all epochs).")] = -1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/NAME).")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | auto")] = "float32",
    register: Annotated[str | None, typer.Option(help="Upload the result to this server URL, e.g. http://127.0.0.1:8000.")] = None,
    admin_key: Annotated[str | None, typer.Option(help="Admin key for --register (or STANCESERVE_ADMIN_KEY).", envvar="STANCESERVE_ADMIN_KEY")] = None,
    description: Annotated[str | None, typer.Option(help="Description stored with the adapter.")] = None,
    replace: Annotated[bool, typer.Option(help="With --register: replace an existing adapter of that name.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a LoRA stance adapter with TRL (SFT or DPO) and optionally register it with a running server."""
    from training.datasets import DatasetError
    from training.trainers import TrainConfig, train_adapter

    if method not in ("sft", "dpo"):
        _fail(f"--method must be sft or dpo, got {method!r}")
    cfg = TrainConfig(method=method, rank=rank, alpha=alpha, targets=tuple(t for t in targets.split(",") if t),
                      epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum, beta=beta,
                      max_length=max_length, seed=seed, max_steps=max_steps, sft_weight=sft_weight)
    out_dir = out or Path("runs") / name
    try:
        # the trainer prints its log lines to stdout: keep stdout for the JSON result
        with contextlib.redirect_stdout(sys.stderr):
            result = train_adapter(data, name, out_dir, cfg, base=base, device=device, dtype=dtype, progress=not quiet)
    except DatasetError as e:
        _fail(str(e))
    summary = result.metrics["summary"]
    report = {"adapter_dir": str(result.out_dir), "summary": summary,
              "trainable_parameters": result.metrics["parameters"]["trainable"]}
    if register:
        from training.register import RegistrationError, register_adapter

        try:
            report["registered"] = register_adapter(register, name, result.out_dir, admin_key=admin_key,
                                                    description=description or f"{method} stance adapter {name}",
                                                    replace=replace)
        except RegistrationError as e:
            _fail(str(e))
    typer.echo(json.dumps(report, indent=2))


@app.command("eval")
def eval_cmd(
    adapter: Annotated[str | None, typer.Option(help="Adapter name (on the server or in the store) or folder path.")] = None,
    probes: Annotated[Path | None, typer.Option(help="JSONL probe prompts (field 'prompt').")] = None,
    stance: Annotated[str | None, typer.Option(help="Stance the scorers measure (default: the adapter's name, if a known stance).")] = None,
    task: Annotated[str | None, typer.Option(help="'scheduling' for the meeting-room task instead of probes.")] = None,
    n: Annotated[int, typer.Option(help="Scheduling problems.")] = 150,
    seed: Annotated[int, typer.Option(help="Scheduling generator seed.")] = 123,
    url: Annotated[str | None, typer.Option(help="Evaluate through a running server at this URL instead of loading the model.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model for local evaluation (default: embedded SmolLM2).")] = None,
    adapters_dir: Annotated[Path | None, typer.Option(help="Adapter store for names (default ./adapters).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 96,
    likelihood: Annotated[bool, typer.Option(help="Also run the likelihood-based stance scorer (loads the base model).")] = True,
    out: Annotated[Path | None, typer.Option(help="Report (Markdown) or result (JSON) path.")] = None,
    reference: Annotated[Path | None, typer.Option(
        help="Training JSONL whose chosen answers (DPO) or completions (SFT) calibrate the scorers.")] = None,
) -> None:
    """Compare an adapter with the base model: stance probes (report) or the scheduling task (accuracy)."""
    from training.evaluate import HttpGenerator, LocalGenerator, evaluate_scheduling, evaluate_stance

    if task not in (None, "scheduling"):
        _fail(f"unknown --task {task!r} (only 'scheduling')")
    if task is None and (adapter is None or probes is None):
        _fail("give --adapter and --probes (or --task scheduling)")
    gen = HttpGenerator(url) if url else LocalGenerator(base, adapters_dir=adapters_dir)
    try:
        if task == "scheduling":
            res = evaluate_scheduling(gen, adapter, n=n, seed=seed, max_tokens=max(max_tokens, 160))
            if out:
                out.write_text(json.dumps(res, indent=2) + "\n")
        else:
            from training.datasets import DatasetError, load_probes, load_reference_answers
            from training.scoring import MARKERS

            st = stance or Path(adapter).name
            if st not in MARKERS:
                _fail(f"--stance must be one of {sorted(MARKERS)} (could not infer it from {adapter!r})")
            try:
                prompts = load_probes(probes)
                ref = load_reference_answers(reference) if reference else None
            except DatasetError as e:
                _fail(str(e))
            lm = tok = None
            if likelihood:
                if isinstance(gen, LocalGenerator):  # idle engine: no adapter is routed, so this is the base model
                    lm, tok = gen.loaded.model, gen.loaded.tokenizer
                else:
                    from app.config import EMBEDDED_MODEL, Settings
                    from app.engine.model_loader import load_base_model

                    loaded = load_base_model(Settings(model=base or EMBEDDED_MODEL, device="cpu"))
                    lm, tok = loaded.model, loaded.tokenizer
            res = evaluate_stance(gen, adapter, prompts, st, report_path=out or Path(f"eval-{Path(adapter).name}.md"),
                                  max_tokens=max_tokens, likelihood_model=lm, likelihood_tokenizer=tok,
                                  reference=ref)
    finally:
        gen.close()
    typer.echo(json.dumps(res, indent=2))


@app.command()
def inspect(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (adapter_config.json + adapter_model.safetensors).")],
    png: Annotated[Path | None, typer.Option(help="Heatmap path (default ADAPTER/update_norms.png).")] = None,
) -> None:
    """Per-layer, per-projection norms of the adapter's weight update B·A (scaled), as a table and a heatmap."""
    from rich.console import Console

    from training.inspect_adapter import adapter_update_norms, norms_table, plot_heatmap

    if not (adapter / "adapter_config.json").exists():
        _fail(f"{adapter} is not an adapter folder")
    rows = adapter_update_norms(adapter)
    Console().print(norms_table(rows))
    path = plot_heatmap(rows, png or adapter / "update_norms.png", title=f"‖ΔW‖_F of {adapter.name}")
    console.print(f"heatmap: {path}")


@app.command("scheduling-data")
def scheduling_data(
    n: Annotated[int, typer.Option(help="Problems.")] = 100,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 42,
    out: Annotated[Path, typer.Option(help="SFT JSONL to write.")] = Path("training/data/scheduling/train.sft.jsonl"),
) -> None:
    """Write generated meeting-room problems with worked answers as an SFT dataset."""
    from training.tasks.scheduling import generate, to_sft_rows, write_jsonl

    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(to_sft_rows(generate(n, seed)), out)
    typer.echo(json.dumps({"out": str(out), "n": n, "seed": seed}))
