"""Train a stance adapter: LoRA (peft) with TRL's ``SFTTrainer`` or ``DPOTrainer``, on the served base model.

:func:`train_adapter` loads the same base model the server holds (the embedded
SmolLM2 by default), trains a LoRA adapter on a stance dataset, and writes a
servable peft folder: ``adapter_config.json``, ``adapter_model.safetensors``
(bf16 by default), ``training_metrics.json`` (every logged step, timings,
parameter counts, hyperparameters, dataset hash) and ``training_curves.png``.
The training loop is TRL's; this module configures it and records what it did.
It does not evaluate (see :mod:`training.evaluate`) or upload (:mod:`training.register`).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, set_seed

from app.config import EMBEDDED_MODEL, Settings
from app.model_loader import load_base_model
from app.redaction import redact_command, redact_json, redact_text
from training.datasets import Method, load_dataset

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TrainConfig:
    """Hyperparameters of one run (the defaults of ``stanceserve train``).

    Attributes:
        rank, alpha: LoRA rank ``r`` and ``lora_alpha`` (scaling alpha/r, Hu et al. 2021).
        targets: target module names.
        epochs, lr, batch_size, grad_accum: optimisation (AdamW, linear decay, TRL defaults otherwise).
        beta: DPO's KL strength (Rafailov et al. 2023, arXiv:2305.18290); unused by SFT.
        max_length: longest tokenised example, in tokens (longer ones are truncated).
        dropout: LoRA dropout.
        seed: RNG seed of the run.
        save_dtype: dtype of the saved adapter tensors.
        bf16_autocast: train fp32 weights under bf16 autocast (faster on CPUs with AVX512-BF16 / AMX).
        precompute_ref: DPO: compute the reference model's log-probs once before training.
        save_every: also save the adapter every this many optimiser steps, to
            ``OUT/checkpoints/step-N`` (same format as the final adapter; a learning curve from one run); 0 = never.
        gradient_checkpointing: recompute activations in the backward pass instead of keeping them (TRL's default:
            less memory, about a third more compute); off is faster where memory is not short (``--quick``).
        sft_weight: DPO: add this weight times the NLL of the chosen answer to the DPO loss (TRL's
            ``loss_type=["sigmoid", "sft"]``; the RPO objective of Pang et al. 2024, arXiv:2404.19733),
            which teaches the chosen answers' form, not only the preference; 0 = plain DPO.
    """

    method: Method = "dpo"
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    epochs: float = 5.0
    lr: float = 5e-5
    batch_size: int = 2
    grad_accum: int = 4
    beta: float = 0.1
    max_length: int = 384
    dropout: float = 0.05
    seed: int = 42
    save_dtype: str = "bfloat16"
    max_steps: int = -1
    bf16_autocast: bool = False
    precompute_ref: bool = True
    sft_weight: float = 0.0
    save_every: int = 0
    gradient_checkpointing: bool = True


@dataclass
class TrainResult:
    """What a run produced: the adapter folder and its metrics (the content of ``training_metrics.json``)."""

    out_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def _save_adapter(model: Any, out_dir: Path, base_name: str, dtype: torch.dtype) -> None:
    """Write a peft model's adapter to ``out_dir`` (config + safetensors cast to ``dtype``)."""
    cfg = model.peft_config["default"]
    cfg.base_model_name_or_path = base_name
    out_dir.mkdir(parents=True, exist_ok=True)
    # peft's "auto" looks the base model's config up (on the Hub, for a served name) only to decide whether to save
    # embedding layers; they are saved only when targeted, so say it: no lookup, no warning
    targets = cfg.target_modules if isinstance(cfg.target_modules, (list, set, tuple)) else [cfg.target_modules or ""]
    embeddings = any("embed" in t or "lm_head" in t for t in targets)
    model.save_pretrained(str(out_dir), save_embedding_layers="auto" if embeddings else False)
    _cast_safetensors(out_dir / "adapter_model.safetensors", dtype)


def _callback(records: list[dict[str, Any]], on_step: Callable[[Any, int], None] | None = None):
    """A TrainerCallback that appends each log line, with its optimiser step's wall time, to ``records``,
    and calls ``on_step(model, global_step)`` after each optimiser step (outside the timed span)."""
    class Recorder(TrainerCallback):
        """Keeps every log line with the wall time of each optimiser step; runs ``on_step`` after each."""

        def __init__(self) -> None:
            self.t_last = time.perf_counter()
            self.step_times: list[float] = []

        def on_step_end(self, args, state, control, model=None, **kw):
            now = time.perf_counter()
            self.step_times.append(now - self.t_last)
            if on_step is not None and model is not None:
                on_step(model, state.global_step)
            self.t_last = time.perf_counter()  # checkpoint writing is not part of the step's time

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                rec = {"step": state.global_step, "epoch": round(float(state.epoch or 0), 4)}
                rec.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
                rec["step_time_s"] = round(self.step_times[-1], 4) if self.step_times else None
                records.append(rec)

    return Recorder()


def train_adapter(
    data: Path,
    name: str,
    out_dir: Path,
    config: TrainConfig,
    *,
    base: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    progress: bool = True,
    command: str | None = None,
    secrets: Iterable[str] = (),
) -> TrainResult:
    """Train a LoRA adapter on ``data`` and write it to ``out_dir``.

    Args:
        data: JSONL dataset in ``config.method``'s format (:mod:`training.datasets`).
        name: the stance name (recorded in the metrics; the server name at registration).
        base: HF model id or path; ``None`` = the embedded SmolLM2-135M-Instruct the server uses.
        device: where the base model trains (``cpu`` by default).
        dtype: the precision it trains in (default ``auto``: the server's rule,
            :func:`app.model_loader.resolve_dtype`, bfloat16 on CPUs with native bf16, else float32); the
            resolved device and dtype are recorded in ``machine``.
        command: the command line to record for reproduction (default: ``sys.argv``); recorded with the values
            of secret options (``--admin-key``...) replaced by ``***`` (:mod:`app.redaction`).
        secrets: secret values (the admin key in use) that must appear nowhere in what is written.

    Returns:
        The output folder and the metrics written to ``training_metrics.json``.

    Raises:
        DatasetError: malformed dataset (file, line, field named).
        ModelLoadError: the base model cannot be loaded.
    """
    from datasets import Dataset  # [train] extra (with TRL): kept out of the server

    ds = load_dataset(data, config.method)
    set_seed(config.seed)
    settings_kw: dict[str, Any] = {"model": base or EMBEDDED_MODEL, "device": device, "dtype": dtype}
    if cache_dir is not None:
        settings_kw["cache_dir"] = cache_dir
    loaded = load_base_model(Settings(**settings_kw))
    model, tok = loaded.model, loaded.tokenizer
    model.train()
    total_params = sum(p.numel() for p in model.parameters())
    peft_cfg = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets), lora_dropout=config.dropout,
        bias="none", task_type="CAUSAL_LM",
    )
    out_dir = Path(out_dir)
    work = out_dir / ".trainer"
    common = dict(
        output_dir=str(work), num_train_epochs=config.epochs, max_steps=config.max_steps,
        learning_rate=config.lr, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, logging_steps=1, save_strategy="no", report_to="none",
        seed=config.seed, disable_tqdm=not progress, use_cpu=(loaded.device.type == "cpu"),
        bf16=(loaded.dtype == torch.bfloat16) or config.bf16_autocast, max_length=config.max_length, remove_unused_columns=True,
        dataloader_num_workers=0, gradient_checkpointing=config.gradient_checkpointing,
    )
    records: list[dict[str, Any]] = []
    save_dtype = getattr(torch, config.save_dtype)

    def save_checkpoint(m: Any, step: int) -> None:
        if step % config.save_every == 0:
            _save_adapter(m, out_dir / "checkpoints" / f"step-{step}", loaded.name, save_dtype)

    recorder = _callback(records, save_checkpoint if config.save_every else None)
    train_ds = Dataset.from_list(ds.rows)
    if config.method == "dpo":
        from trl import DPOConfig, DPOTrainer  # [train] extra: kept out of the server

        # the reference log-probs (adapter off) are computed once, not in every epoch
        loss = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, config.sft_weight]} if config.sft_weight else {}
        args = DPOConfig(beta=config.beta, precompute_ref_log_probs=config.precompute_ref, **loss, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                             peft_config=peft_cfg, callbacks=[recorder])
    else:
        from trl import SFTConfig, SFTTrainer  # [train] extra: kept out of the server

        args = SFTConfig(**common)  # prompt-completion rows: loss on the completion only (TRL default)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok,
                             peft_config=peft_cfg, callbacks=[recorder])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    logger.info("training %s (%s) on %d rows: %d trainable of %d parameters", name, config.method, len(ds),
                trainable, total_params)
    t0 = time.perf_counter()
    trainer.train()
    total_s = time.perf_counter() - t0

    _save_adapter(trainer.model, out_dir, loaded.name, save_dtype)
    _remove_tree(work)

    metrics = {
        "name": name,
        "method": config.method,
        "base_model": loaded.name,
        "base_source": loaded.source,
        "dataset": {"path": str(data), "sha256": ds.sha256, "rows": len(ds)},
        "hyperparameters": {**asdict(config), "targets": list(config.targets)},
        "parameters": {"trainable": trainable, "total": total_params},
        "steps": records,
        "total_time_s": round(total_s, 2),
        "time_per_step_s": round(total_s / max(1, len(records)), 3),
        "machine": {"device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()},
        "command": redact_text(command, secrets) if command else redact_command(["stanceserve", *sys.argv[1:]], secrets),
        "summary": summarize(records, config.method, ds.sha256, loaded.name, total_s),
    }
    metrics = redact_json(metrics, secrets)  # no secret is ever written (app.redaction)
    (out_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    plot_curves(records, config.method, out_dir / "training_curves.png", title=f"{name} ({config.method})")
    return TrainResult(out_dir, metrics)


def summarize(records: list[dict[str, Any]], method: str, sha256: str, base: str, total_s: float) -> dict[str, Any]:
    """The short provenance kept in the registry's metadata: method, base, dataset hash, final metrics."""
    last = records[-1] if records else {}
    first = records[0] if records else {}
    s: dict[str, Any] = {"method": method, "base_model": base, "dataset_sha256": sha256, "steps": len(records),
                         "train_time_s": round(total_s, 1), "first_loss": first.get("loss"), "final_loss": last.get("loss")}
    if method == "dpo":
        s["final_reward_margin"] = last.get("rewards/margins")
        s["final_reward_accuracy"] = last.get("rewards/accuracies")
    return s


def plot_curves(records: list[dict[str, Any]], method: str, path: Path, title: str) -> Path:
    """``training_curves.png``: loss against step and, for DPO, the reward margin against step."""
    import matplotlib  # [train] extra: kept out of the server (and the backend is chosen before pyplot loads)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    panels = 2 if method == "dpo" else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [r.get("loss") for r in records], marker=".", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{method.upper()} loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    if method == "dpo":
        ax2 = axes[0][1]
        ax2.plot(steps, [r.get("rewards/margins") for r in records], marker=".", color="tab:green", label="margin")
        ax2.plot(steps, [r.get("rewards/accuracies") for r in records], marker=".", color="tab:orange",
                 alpha=0.6, label="accuracy")
        ax2.axhline(0, color="grey", lw=0.8)
        ax2.set_xlabel("optimizer step")
        ax2.set_title("reward margin (chosen - rejected)")
        ax2.legend()
        ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cast_safetensors(path: Path, dtype: torch.dtype) -> None:

    tensors = load_file(str(path))
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _remove_tree(path: Path) -> None:

    shutil.rmtree(path, ignore_errors=True)
